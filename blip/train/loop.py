"""The training loop shared by every method: BLIP, deterministic, MC dropout, ensembles."""

from __future__ import annotations

import csv
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .. import config as config_mod
from .._files import write_text_atomic
from ..build import build_potential, dtype_of
from ..data import build_graph, collate
from ..errors import CheckpointError, ConfigError
from ..io import atomic_torch_save, save_model
from ..predictor import BlipModel
from ..bayes import kl_divergence
from .contrastive import perturbed_batch
from .datasets import PreparedData, prepare_data
from .loss import data_loss

LOG_FIELDS = ["member", "epoch", "lr", "train_loss", "train_data_loss", "kl", "mean_p", "contrastive_kl",
              "contrastive_mean_p",
              "valid_loss", "valid_energy_rmse_per_atom", "valid_forces_rmse", "time_s"]


def _mean_rate(rates: dict) -> float:
    """Mean dropout rate over the rows of every noisy layer (each layer weighs the same)."""
    return float(torch.stack([p.detach().mean() for p in rates.values()]).mean())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _graphs(structures, cutoff, stress: bool = False):
    """Training graphs; ``stress``: every graph carries a stress label, NaN where it has none."""
    missing = np.full((3, 3), np.nan)
    return [build_graph(s.atoms, cutoff, index=i, energy=s.energy, forces=s.forces,
                        stress=(missing if s.stress is None else s.stress) if stress else None)
            for i, s in enumerate(structures)]


def ema_update_fn(decay: float):
    """EMA with warm-up: the decay is min(decay, (1 + n) / (10 + n)) after n updates."""

    @torch.no_grad()
    def update(averaged: list, current: list, n_averaged) -> None:
        d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def _lr_factor(epoch: int, tcfg: dict) -> float:
    """Multiplier of the base LR at ``epoch``: linear warm-up, then cosine (or constant)."""
    warm = int(tcfg["warmup_epochs"])
    if warm and epoch < warm:
        return (epoch + 1) / (warm + 1)
    if tcfg["scheduler"] != "cosine":
        return 1.0
    span = max(1, int(tcfg["epochs"]) - warm)
    t = min(1.0, (epoch - warm) / span)
    lo = float(tcfg["min_lr_ratio"])
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


class Trainer:
    """Trains the member networks of one config and writes OUT/model.pt, log.csv, checkpoint.pt."""

    def __init__(self, cfg: dict, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.tcfg, self.uq = cfg["training"], cfg["uq"]
        self.out = Path(cfg["output_dir"])
        self.device = torch.device(self.tcfg["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("training.device is 'cuda' but no CUDA device is available")
        self.dtype = dtype_of(cfg)
        self.start_time = self.member_start = time.time()
        self.budget_s = None if self.tcfg["max_minutes"] is None else 60.0 * float(self.tcfg["max_minutes"])

    # -- set-up ---------------------------------------------------------------------
    def n_members(self) -> int:
        return int(self.uq["ensemble_size"]) if self.uq["method"] == "ensemble" else 1

    def _new_member(self, data: PreparedData, member: int):
        seed_everything(int(self.tcfg["seed"]) + 1000 * member)
        model = build_potential(self.cfg, data.summary).to(self.device)
        groups = [{"params": list(model.backbone.parameters()), "lr": float(self.tcfg["lr"])}]
        if model.inference is not None:
            lr_inf = self.tcfg["inference_lr"] or self.tcfg["lr"]
            groups.append({"params": list(model.inference.parameters()), "lr": float(lr_inf)})
        for g in groups:
            g["base_lr"] = g["lr"]
        opt = torch.optim.AdamW(groups, weight_decay=float(self.tcfg["weight_decay"]))
        ema = AveragedModel(model, multi_avg_fn=ema_update_fn(float(self.tcfg["ema_decay"])))
        return model, opt, ema

    def out_of_time(self) -> bool:
        """True once this member used its share of ``training.max_minutes`` (split evenly over members)."""
        if self.budget_s is None:
            return False
        return time.time() - self.member_start > self.budget_s / self.n_members()

    # -- one epoch ------------------------------------------------------------------
    def _contrastive_kl(self, model, batch, rng):
        """KL of the noise rates of perturbed, unlabelled copies of ``batch`` towards the
        contrastive prior (see :mod:`blip.train.contrastive`); trains the inference net only."""
        ncp = self.uq["contrastive"]
        rates = model.rates(batch, transform=lambda b: perturbed_batch(b, rng, tuple(ncp["rattle"]),
                                                                       tuple(ncp["strain"])))
        return kl_divergence(rates, float(ncp["prior_p"])), _mean_rate(rates)

    def _train_epoch(self, model, opt, ema, graphs, rng) -> dict:
        model.train()
        order = rng.permutation(len(graphs))
        bs = int(self.tcfg["batch_size"])
        blip = model.method == "blip"
        beta = float(self.uq["beta"]) if blip else 0.0
        ncp_weight = float(self.uq["contrastive"]["weight"]) if blip else 0.0
        ncp_every = int(self.uq["contrastive"]["every"])
        totals = {"train_loss": 0.0, "train_data_loss": 0.0, "kl": 0.0, "mean_p": 0.0, "contrastive_kl": 0.0,
                  "contrastive_mean_p": 0.0}
        steps = ncp_steps = 0
        for start in range(0, len(order), bs):
            batch = collate([graphs[i] for i in order[start:start + bs]], dtype=self.dtype, device=self.device)
            out = model(batch, sample=True, training=True, stress="stress" in batch)
            loss_data = self._data_loss(out, batch)
            loss = loss_data + beta * out["kl"] if "kl" in out else loss_data
            if ncp_weight > 0 and steps % ncp_every == 0:  # weighted by `every`: the same objective on average
                ncp_kl, ncp_p = self._contrastive_kl(model, batch, rng)
                loss = loss + ncp_every * ncp_weight * ncp_kl
                totals["contrastive_kl"] += float(ncp_kl.detach())
                totals["contrastive_mean_p"] += ncp_p
                ncp_steps += 1
            if not torch.isfinite(loss):
                raise FloatingPointError("training loss (data, KL or contrastive KL) became NaN/inf; "
                                         "lower training.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.tcfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.tcfg["grad_clip"]))
            opt.step()
            ema.update_parameters(model)
            totals["train_loss"] += float(loss.detach())
            totals["train_data_loss"] += float(loss_data.detach())
            if "kl" in out:
                totals["kl"] += float(out["kl"].detach())
                totals["mean_p"] += _mean_rate(out["rates"])
            steps += 1
            if self.out_of_time():
                break
        return {k: v / max(ncp_steps if k.startswith("contrastive") else steps, 1) for k, v in totals.items()}

    @property
    def stress_weight(self) -> float:
        return float(self.tcfg["stress_weight"])

    def _data_loss(self, out: dict, batch: dict) -> torch.Tensor:
        return data_loss(out, batch, self.tcfg["loss"], float(self.tcfg["energy_weight"]),
                         float(self.tcfg["forces_weight"]), self.stress_weight)

    def _validate(self, model, graphs) -> dict:
        """MAP (noise-free) validation loss and RMSEs: energy per atom (eV), forces (eV/A)."""
        model.eval()
        se_e, se_f, n_f, loss, n_g = 0.0, 0.0, 0, 0.0, 0
        bs = max(1, 4 * int(self.tcfg["batch_size"]))
        for start in range(0, len(graphs), bs):
            batch = collate(graphs[start:start + bs], dtype=self.dtype, device=self.device)
            out = {k: v.detach() for k, v in model(batch, stress="stress" in batch).items()}
            g = batch["n_atoms"].shape[0]
            loss += g * float(self._data_loss(out, batch))
            n = batch["n_atoms"].to(out["energy"].dtype)
            se_e += float((((out["energy"] - batch["energy"]) / n) ** 2).sum())
            se_f += float(((out["forces"] - batch["forces"]) ** 2).sum())
            n_f += batch["forces"].numel()
            n_g += g
        return {"valid_loss": loss / n_g, "valid_energy_rmse_per_atom": math.sqrt(se_e / n_g),
                "valid_forces_rmse": math.sqrt(se_f / n_f)}

    # -- the run --------------------------------------------------------------------
    def run(self, data: PreparedData | None = None) -> BlipModel:
        self.out.mkdir(parents=True, exist_ok=True)
        data = data or prepare_data(self.cfg)
        cutoff = float(self.cfg["model"]["cutoff"])
        fit_stress = self.stress_weight > 0
        if fit_stress and not any(s.stress is not None for s in data.train):
            raise ConfigError(f"training.stress_weight is {self.stress_weight:g} but no periodic training structure "
                              f"has a stress label '{self.cfg['data']['stress_key']}' (data.stress_key)")
        train_graphs = _graphs(data.train, cutoff, fit_stress)
        valid_graphs = _graphs(data.valid, cutoff, fit_stress)
        config_mod.dump(self.cfg, self.out / "config.yaml")
        state = self._load_resume() if self.tcfg["resume"] else None
        finished = state["finished"] if state else []
        log_path = self.out / "log.csv"
        if not state:
            with open(log_path, "w", newline="") as fh:
                csv.DictWriter(fh, LOG_FIELDS).writeheader()
        members_best = [self._state_to(s) for s in finished]
        for member in range(len(finished), self.n_members()):
            best = self._train_member(member, data, train_graphs, valid_graphs, log_path,
                                      state if state and state["member"] == member else None, members_best)
            members_best.append(best)
            state = None
        return self._final_model(members_best, data, train_graphs)

    def _state_to(self, s):
        return {k: v.to(self.device) for k, v in s.items()}

    def _train_member(self, member, data, train_graphs, valid_graphs, log_path, resume, finished):
        self.member_start = time.time()
        model, opt, ema = self._new_member(data, member)
        epochs = int(self.tcfg["epochs"])
        first_epoch, best_loss, best_state, bad_epochs = 0, float("inf"), None, 0
        rng = np.random.default_rng(int(self.tcfg["seed"]) + 7919 * member)
        if resume:
            model.load_state_dict(resume["model"])
            ema.load_state_dict(resume["ema"])
            opt.load_state_dict(resume["optimizer"])
            first_epoch, best_loss, bad_epochs = resume["epoch"] + 1, resume["best_loss"], resume["bad_epochs"]
            best_state = resume["best_state"]
            rng.bit_generator.state = resume["rng"]
            torch.set_rng_state(resume["torch_rng"])
            if resume.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resume["cuda_rng"])
        if epochs == 0:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar = tqdm(range(first_epoch, epochs), desc=f"train member {member}" if self.n_members() > 1 else "train",
                   disable=not self.progress, unit="epoch", initial=first_epoch, total=epochs)
        for epoch in bar:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _lr_factor(epoch, self.tcfg)
            t0 = time.time()
            stats = self._train_epoch(model, opt, ema, train_graphs, rng)
            stats.update(self._validate(ema.module, valid_graphs))
            improved = stats["valid_loss"] < best_loss
            if improved:
                best_loss, bad_epochs = stats["valid_loss"], 0
                best_state = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
                self._save_model(finished + [best_state], data, partial=True)
            else:
                bad_epochs += 1
            row = {"member": member, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "time_s": time.time() - t0,
                   **stats}
            with open(log_path, "a", newline="") as fh:
                csv.DictWriter(fh, LOG_FIELDS).writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})
            bar.set_postfix(loss=f"{stats['train_loss']:.4g}", F_rmse=f"{stats['valid_forces_rmse']:.4g}",
                            p=f"{stats['mean_p']:.3g}")
            stop = bad_epochs >= int(self.tcfg["patience"]) or self.out_of_time()
            self._save_checkpoint(member, epoch, model, ema, opt, best_loss, best_state, bad_epochs, rng,
                                  finished)
            if stop:
                break
        bar.close()
        if best_state is None:
            raise FloatingPointError(f"member {member}: every validation loss was NaN or inf, so there is no "
                                     "model to keep; lower training.lr or check the data")
        return best_state

    def _save_checkpoint(self, member, epoch, model, ema, opt, best_loss, best_state, bad_epochs, rng, finished):
        atomic_torch_save({
            "format": "blip-checkpoint", "member": member, "epoch": epoch,
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "best_loss": best_loss, "best_state": best_state, "bad_epochs": bad_epochs,
            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "finished": finished,
        }, self.out / "checkpoint.pt")

    def _load_resume(self):
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)  # moved to the device when used
        except Exception as exc:
            raise CheckpointError(f"{path}: corrupt checkpoint ({type(exc).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != "blip-checkpoint":
            raise CheckpointError(f"{path}: not a BLIP training checkpoint")
        return state

    def _blip_model(self, states, data, train_graphs=None) -> BlipModel:
        """Model from member states; with ``train_graphs`` BLIP's feature statistics are refitted
        exactly on the training set for the final weights."""
        members = []
        for s in states:
            m = build_potential(self.cfg, data.summary).to(self.device)
            m.load_state_dict(s)
            if train_graphs is not None:
                m.fit_feature_statistics(self._batches(train_graphs), seed=int(self.tcfg["seed"]))
            members.append(m)
        info = {"trained_seconds": time.time() - self.start_time, "n_train": len(data.train),
                "n_valid": len(data.valid)}
        return BlipModel(members, self.cfg, data.summary, info=info).to(self.device)

    def _save_model(self, states, data, partial=False):
        if partial and len(states) < self.n_members():
            return  # an ensemble is written once all its members exist
        save_model(self._blip_model(states, data), self.out / "model.pt")

    def _batches(self, graphs):
        bs = max(1, 4 * int(self.tcfg["batch_size"]))
        for start in range(0, len(graphs), bs):
            yield collate(graphs[start:start + bs], dtype=self.dtype, device=self.device)

    def _final_model(self, states, data, train_graphs) -> BlipModel:
        model = self._blip_model(states, data, train_graphs)
        save_model(model, self.out / "model.pt")
        return model


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def write_test_metrics(model: BlipModel, data: PreparedData, out: Path, progress: bool = True) -> dict:
    """Evaluate every test set with ``uq.samples`` samples; write OUT/test_metrics.json."""
    from ..evaluate import evaluate_structures

    results = {}
    seed = int(model.config["training"]["seed"])
    for name, structures in data.tests.items():
        results[name], _ = evaluate_structures(model, structures, seed=seed, progress=progress, source=name)
    write_text_atomic(out / "test_metrics.json", json.dumps(results, indent=2))
    return results
