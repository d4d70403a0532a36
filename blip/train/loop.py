"""The training loop shared by every method: BLIP, deterministic, MC dropout, ensembles."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import config as config_mod
from .. import distributed
from ..bayes import density
from ..bayes.inference import kl_sums
from .._files import write_text_atomic
from ..build import backbone_training, build_potential, contrastive_removal, dtype_of
from ..data import build_graph, collate
from ..errors import CheckpointError, ConfigError
from ..io import atomic_torch_save, save_model
from ..predictor import BlipModel
from ..bayes import kl_divergence
from .contrastive import draws_of_graphs, perturbation_draws, perturbed_batch
from .datasets import PreparedData, prepare_data
from .ema import ExponentialAverage
from .loss import data_loss_sums, stress_loss_sum
from .sampler import GlobalBatchSampler, shard

logger = logging.getLogger("blip")

LOG_FIELDS = ["member", "epoch", "lr", "train_loss", "train_data_loss", "kl", "mean_p", "contrastive_kl",
              "contrastive_mean_p",
              "valid_loss", "valid_energy_rmse_per_atom", "valid_forces_rmse", "time_s"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        if self.device.type == "cuda" and distributed.active():
            self.device = torch.device("cuda", torch.cuda.current_device())  # one device per local rank
        self.board = None
        self.dtype = dtype_of(cfg)
        self.start_time = self.member_start = time.time()
        self.budget_s = None if self.tcfg["max_minutes"] is None else 60.0 * float(self.tcfg["max_minutes"])

    # -- set-up ---------------------------------------------------------------------
    def n_members(self) -> int:
        """Networks to train: an ensemble's members, or BLIP's / MC dropout's ``uq.networks``."""
        return config_mod.networks_of(self.cfg)

    def _new_member(self, data: PreparedData, member: int):
        seed_everything(int(self.tcfg["seed"]) + 1000 * member)
        self.removal = contrastive_removal(self.cfg, data.summary)  # uq.contrastive.remove, auto resolved
        model = build_potential(self.cfg, data.summary).to(self.device)
        distributed.broadcast_module(model)  # identical already (same seed); rank 0's weights to be sure
        groups = [{"params": list(model.backbone.parameters()), "lr": float(self.tcfg["lr"])}]
        if model.inference is not None:
            lr_inf = self.tcfg["inference_lr"] or self.tcfg["lr"]
            groups.append({"params": list(model.inference.parameters()), "lr": float(lr_inf)})
        for g in groups:
            g["base_lr"] = g["lr"]
        opt = torch.optim.AdamW(groups, weight_decay=float(self.tcfg["weight_decay"]), **_adam_kernel(self.device))
        ema = ExponentialAverage(model, float(self.tcfg["ema_decay"]))
        return model, opt, ema

    def out_of_time(self) -> bool:
        """True once this member used its share of ``training.max_minutes`` (split evenly over members)."""
        if self.budget_s is None:
            return False
        return time.time() - self.member_start > self.budget_s / self.n_members()

    # -- one epoch ------------------------------------------------------------------
    def _collective_out_of_time(self) -> bool:
        """``out_of_time`` as decided by rank 0, on every rank (wall clocks differ between ranks)."""
        return False if self.budget_s is None else distributed.broadcast_flag(self.out_of_time())

    def _batches_of(self, dataset, index_lists):
        """Collated batches (on the device) of ``dataset`` for each list of indices; with
        ``training.num_workers`` > 0 graphs are built and collated in DataLoader worker processes."""
        workers = int(self.tcfg["num_workers"])
        if workers == 0:
            for idx in index_lists:
                yield collate([dataset[i] for i in idx], dtype=self.dtype, device=self.device)
            return
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=list(index_lists), num_workers=workers,
                                             collate_fn=functools.partial(collate, dtype=self.dtype))
        for batch in loader:
            yield {k: v.to(self.device) for k, v in batch.items()}

    def _step_seed(self, member: int, epoch: int, step: int, stream: int = 0) -> int:
        """Seed of the counter-based training noise of one step: each structure's noise depends on
        (seed, member, epoch, step, structure), not on which rank or which batch position holds it."""
        return int(np.random.SeedSequence([int(self.tcfg["seed"]), member, epoch, step, stream]).generate_state(1)[0] % 2**31)

    def _train_epoch(self, model, opt, ema, train_set, sizes, rng, member=0, epoch=0) -> dict:
        """One epoch of data-parallel steps (one process: the same with one rank).

        Each rank's loss is its part of the global batch's loss (sums divided by global counts),
        so the gradients summed over ranks are the global batch's; see :mod:`blip.distributed`.
        BLIP with ``uq.backbone_training: noise_free`` takes two kinds of step on a batch: the
        backbone on the noise-free pass (as the plain model), and every ``uq.rate_every``-th batch
        the inference network alone on a sampled pass (data loss, KL, contrastive KL)."""
        model.train()
        sampler = GlobalBatchSampler(len(train_set), int(self.tcfg["batch_size"]), distributed.rank(),
                                     distributed.world_size(), int(self.tcfg["seed"]), member)
        sampler.set_epoch(epoch)
        steps = sampler.steps()
        split = model.method == "blip" and backbone_training(self.cfg) == "noise_free"
        rate_every = int(self.uq["rate_every"]) if split else 1
        keys = ["train_loss", "train_data_loss", "kl", "mean_p", "contrastive_kl", "contrastive_mean_p"]
        partial = dict.fromkeys(keys, 0.0)  # this rank's parts of the global values, summed at the end
        n_steps = kl_steps = ncp_steps = 0
        batches = self._batches_of(train_set, [st.indices for st in steps])
        for step_no, (step, batch) in enumerate(zip(steps, batches)):
            w = step.weight
            density.set_contribution(w)
            seed = self._step_seed(member, epoch, step_no)
            if split:
                loss, loss_data, _ = self._step_loss(model, batch, w, seed, sample=False)
                self._optimizer_step(model, opt, loss)
            if not split or step_no % rate_every == 0:
                contrastive = None
                if step_no % int(self.uq["contrastive"]["every"]) == 0:  # the same steps on every rank
                    contrastive = functools.partial(self._contrastive_rates, model, batch, rng, step, sizes,
                                                    self._step_seed(member, epoch, step_no, stream=1))
                rate_loss, rate_data, parts = self._step_loss(model, batch, w, seed, sample=True,
                                                              contrastive_rates=contrastive)
                self._optimizer_step(model, opt, rate_loss, only=model.inference if split else None)
                if not split:
                    loss, loss_data = rate_loss, rate_data
                for k, v in parts.items():
                    partial[k] += v
                kl_steps += "kl" in parts
                ncp_steps += "contrastive_kl" in parts
            ema.update_parameters(model)
            partial["train_loss"] += float(loss.detach())
            partial["train_data_loss"] += float(loss_data.detach())
            n_steps += 1
            if self._collective_out_of_time():
                break
        density.set_contribution(1.0)
        totals = dict(zip(keys, distributed.sum_floats([partial[k] for k in keys])))
        counts = {"kl": kl_steps, "mean_p": kl_steps, "contrastive_kl": ncp_steps, "contrastive_mean_p": ncp_steps}
        return {k: v / max(counts.get(k, n_steps), 1) for k, v in totals.items()}

    def _step_loss(self, model, batch, w, seed, sample: bool, contrastive_rates=None):
        """Loss of one pass over ``batch`` (this rank's part of the global batch's, weight ``w``):
        (loss, data loss, {log key: this rank's part}). A sampled BLIP pass adds the KL of its rates
        and, given ``contrastive_rates() -> rates`` of perturbed copies, their contrastive KL."""
        blip = model.method == "blip"
        sw = self.stress_weight
        ew, fw, kind = float(self.tcfg["energy_weight"]), float(self.tcfg["forces_weight"]), self.tcfg["loss"]
        ncp = self.uq["contrastive"]
        ncp_weight = float(ncp["weight"]) if blip and sample else 0.0
        ncp_every = int(ncp["every"])
        out = model(batch, sample=sample, training=True, seed=seed, stress=sw > 0)
        sum_e, sum_f = data_loss_sums(out, batch, kind)
        sum_s, n_s = stress_loss_sum(out, batch, kind)
        kls = kl_sums(out["rates"], float(self.uq["prior_p"])) if "rates" in out else []
        ncp_kls = []
        if ncp_weight > 0 and contrastive_rates is not None:
            ncp_kls = kl_sums(contrastive_rates(), float(ncp["prior_p"]))
        counts = distributed.sum_floats([w * batch["n_atoms"].shape[0], w * batch["forces"].numel(), w * n_s]
                                        + [w * s.rows for s in kls + ncp_kls])
        n_graphs, n_forces, n_stress, rows = counts[0], counts[1], counts[2], counts[3:]
        loss_data = w * (ew * sum_e / n_graphs + fw * sum_f / n_forces)
        if n_stress > 0:  # the same on every rank: the counts are global
            loss_data = loss_data + w * sw * sum_s / n_stress
        loss, parts = loss_data, {}
        if kls:
            kl = w * torch.cat([s.kl / r for s, r in zip(kls, rows[:len(kls)])]).mean()
            loss = loss + float(self.uq["beta"]) * kl
            parts["kl"] = float(kl.detach())
            parts["mean_p"] = _partial_mean_rate(kls, rows[:len(kls)], w)
        if ncp_kls:
            ncp_rows = rows[len(kls):]
            ncp_kl = w * torch.cat([s.kl / r for s, r in zip(ncp_kls, ncp_rows)]).mean()
            loss = loss + ncp_every * ncp_weight * ncp_kl  # weighted by `every`: the same objective on average
            parts["contrastive_kl"] = float(ncp_kl.detach())
            parts["contrastive_mean_p"] = _partial_mean_rate(ncp_kls, ncp_rows, w)
        return loss, loss_data, parts

    def _optimizer_step(self, model, opt, loss, only: torch.nn.Module | None = None) -> None:
        """Backward, all-reduce, clip and step; ``only``: the parameters of this module alone get
        gradients (the others keep none, so AdamW leaves them and their moments as they are)."""
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(only.parameters()) if only is not None else None)
        total = distributed.reduce_gradients(model.parameters(), extra=loss.detach().reshape(1))
        if not torch.isfinite(total).all():
            raise FloatingPointError("training loss (data, KL or contrastive KL) became NaN/inf; "
                                     "lower training.lr")
        if self.tcfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.tcfg["grad_clip"]))
        opt.step()

    def _contrastive_rates(self, model, batch, rng, step, sizes, seed):
        """Rates of perturbed, unlabelled copies of ``batch`` (see :mod:`blip.train.contrastive`); the
        perturbations are drawn for the global batch on every rank, each rank uses its graphs' draws."""
        ncp = self.uq["contrastive"]
        rattle, strain = tuple(ncp["rattle"]), tuple(ncp["strain"])
        remove = self.removal
        n_atoms = sizes[step.global_indices]
        local = draws_of_graphs(perturbation_draws(rng, n_atoms, rattle, strain, remove), n_atoms, step.positions)
        return model.rates(batch, seed=seed, transform=lambda b: perturbed_batch(b, None, rattle, strain, draws=local))

    @property
    def stress_weight(self) -> float:
        return float(self.tcfg["stress_weight"])

    def _validate(self, model, valid_set) -> dict:
        """MAP (noise-free) validation loss and RMSEs: energy per atom (eV), forces (eV/A).

        The loss is the data loss of the whole validation set as one batch (independent of how it
        is batched or split over ranks); each rank scores its share and the sums are all-reduced."""
        model.eval()
        ew, fw, kind = float(self.tcfg["energy_weight"]), float(self.tcfg["forces_weight"]), self.tcfg["loss"]
        # penalty E, penalty F, squared error E/n, squared error F, force components, graphs,
        # penalty S, labelled stress components
        sums = np.zeros(8)
        bs = max(1, 4 * int(self.tcfg["batch_size"]))
        idx = shard(len(valid_set), distributed.rank(), distributed.world_size())
        for batch in self._batches_of(valid_set, [idx[i:i + bs] for i in range(0, len(idx), bs)]):
            out = {k: v.detach() for k, v in model(batch, stress=self.stress_weight > 0).items()}
            pen_e, pen_f = data_loss_sums(out, batch, kind)
            pen_s, n_s = stress_loss_sum(out, batch, kind)
            n = batch["n_atoms"].to(out["energy"].dtype)
            sums += [float(pen_e), float(pen_f), float((((out["energy"] - batch["energy"]) / n) ** 2).sum()),
                     float(((out["forces"] - batch["forces"]) ** 2).sum()), batch["forces"].numel(),
                     batch["n_atoms"].shape[0], float(pen_s), n_s]
        pen_e, pen_f, se_e, se_f, n_f, n_g, pen_s, n_s = distributed.sum_floats(sums.tolist())
        stress_term = self.stress_weight * pen_s / n_s if n_s else 0.0
        return {"valid_loss": ew * pen_e / n_g + fw * pen_f / n_f + stress_term,
                "valid_energy_rmse_per_atom": math.sqrt(se_e / n_g), "valid_forces_rmse": math.sqrt(se_f / n_f)}

    # -- the run --------------------------------------------------------------------
    def run(self, data: PreparedData | None = None) -> BlipModel:
        """Train every member; in a ``torch.distributed`` process group every rank calls this with
        the same config and data, and rank 0 alone writes the output files."""
        with density.synchronised():
            return self._run(data)

    def _run(self, data):
        main = distributed.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        data = data or prepare_data(self.cfg)
        cutoff = float(self.cfg["model"]["cutoff"])
        fit_stress = self.stress_weight > 0
        if fit_stress and not getattr(data.train, "streaming", False) and all(s.stress is None for s in data.train):
            raise ConfigError(f"training.stress_weight is {self.stress_weight:g} but no periodic training structure "
                              f"has a stress label '{self.cfg['data']['stress_key']}' (data.stress_key)")
        train_set, valid_set = GraphSet(data.train, cutoff, fit_stress), GraphSet(data.valid, cutoff, fit_stress)
        if main:
            config_mod.dump(self.cfg, self.out / "config.yaml")
        if self.n_members() > 1 and distributed.active():
            return self._run_members_over_ranks(data, train_set, valid_set)
        members_best = self._train_members(list(range(self.n_members())), data, train_set, valid_set)
        return self._final_model(members_best, data, train_set)

    def _train_members(self, members: list[int], data, train_set, valid_set) -> list:
        """Train ``members`` one after the other (from OUT/checkpoint.pt with ``training.resume``);
        their best states, in order (fewer when ``training.max_epochs`` pauses the run)."""
        main = distributed.is_main()
        state = self._load_resume() if self.tcfg["resume"] else None
        if main and not state:
            write_text_atomic(self.out / "log.csv", ",".join(LOG_FIELDS) + "\n")
        self.board = _board(self.out, self.tcfg) if main else None
        finished = state["finished"] if state else []
        members_best = [self._state_to(s) for s in finished]
        try:
            for member in members[len(finished):]:
                best = self._train_member(member, data, train_set, valid_set,
                                          state if state and state["member"] == member else None, members_best)
                members_best.append(best)
                state = None
        except _Paused as paused:  # training.max_epochs reached: the checkpoint lets --resume go on
            members_best.append(paused.best_state)
        finally:
            if self.board is not None:
                self.board.close()
        return members_best

    def _run_members_over_ranks(self, data, train_set, valid_set) -> BlipModel:
        """An ensemble with several ranks: rank r trains members r, r + W, ... on its own (each on
        the whole training set, no gradient exchange; the members equal those of one process) in
        OUT/rank{r}/ (its log.csv and checkpoint.pt, for ``--resume`` with the same number of
        ranks); the members are gathered into OUT/model.pt and their log rows into OUT/log.csv."""
        rank, world = distributed.rank(), distributed.world_size()
        mine = list(range(rank, self.n_members(), world))
        top = self.out
        self.out = top / f"rank{rank}"
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            with distributed.local():
                best = self._train_members(mine, data, train_set, valid_set)
        finally:
            self.out = top
        gathered = distributed.all_gather_objects(
            {m: {k: v.detach().cpu() for k, v in s.items()} for m, s in zip(mine, best)})
        states = {m: s for part in gathered for m, s in part.items()}
        members_best = [self._state_to(states[m]) for m in sorted(states)]
        if distributed.is_main():
            rows = []
            for r in range(world):
                log = top / f"rank{r}" / "log.csv"
                rows += log.read_text().splitlines()[1:] if log.is_file() else []
            rows.sort(key=lambda line: [float(x) for x in line.split(",")[:2]])  # member, epoch
            write_text_atomic(top / "log.csv", "\n".join([",".join(LOG_FIELDS)] + rows) + "\n")
        return self._final_model(members_best, data, train_set)

    def _state_to(self, s):
        return {k: v.to(self.device) for k, v in s.items()}

    def _log(self, row: dict) -> None:
        """Append one row to OUT/log.csv (rank 0; the whole file is rewritten atomically)."""
        if not distributed.is_main():
            return
        path = self.out / "log.csv"
        buf = io.StringIO()
        csv.DictWriter(buf, LOG_FIELDS, lineterminator="\n").writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})
        old = path.read_text() if path.is_file() else ",".join(LOG_FIELDS) + "\n"
        write_text_atomic(path, old + buf.getvalue())
        if self.board is not None:
            prefix = f"member{row['member']}/" if self.n_members() > 1 else ""
            epoch = int(row["epoch"])
            for key, tag in _BOARD_TAGS.items():
                value = row.get(key)
                if isinstance(value, float) and math.isfinite(value):
                    self.board.add_scalar(prefix + tag, value, epoch)
            self.board.flush()

    def _train_member(self, member, data, train_set, valid_set, resume, finished):
        self.member_start = time.time()
        model, opt, ema = self._new_member(data, member)
        epochs = int(self.tcfg["epochs"])
        stop_at = self.tcfg["max_epochs"]
        first_epoch, best_loss, best_state, bad_epochs = 0, float("inf"), None, 0
        rng = np.random.default_rng(int(self.tcfg["seed"]) + 7919 * member)
        if resume:
            model.load_state_dict(resume["model"])
            ema.load_state_dict(resume["ema"])
            opt.load_state_dict(resume["optimizer"])
            first_epoch, best_loss, bad_epochs = resume["epoch"] + 1, resume["best_loss"], resume["bad_epochs"]
            best_state = resume["best_state"]
            if best_state is not None:
                best_state = self._state_to(best_state)
            rng.bit_generator.state = resume["rng"]
            torch.set_rng_state(resume["torch_rng"])
            if resume.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resume["cuda_rng"])
        if epochs == 0:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sizes = _sizes(data.train)
        bar = tqdm(range(first_epoch, epochs), desc=f"train member {member}" if self.n_members() > 1 else "train",
                   disable=not (self.progress and distributed.is_main()), unit="epoch", initial=first_epoch,
                   total=epochs)
        for epoch in bar:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _lr_factor(epoch, self.tcfg)
            t0 = time.time()
            stats = self._train_epoch(model, opt, ema, train_set, sizes, rng, member, epoch)
            stats.update(self._validate(ema.module, valid_set))
            improved = stats["valid_loss"] < best_loss
            if improved:
                best_loss, bad_epochs = stats["valid_loss"], 0
                best_state = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
                if distributed.is_main():
                    self._save_model(finished + [best_state], data, partial=True)
            else:
                bad_epochs += 1
            self._log({"member": member, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
                       "time_s": time.time() - t0, **stats})
            bar.set_postfix(loss=f"{stats['train_loss']:.4g}", F_rmse=f"{stats['valid_forces_rmse']:.4g}",
                            p=f"{stats['mean_p']:.3g}")
            # validation is all-reduced (patience agrees on every rank); the clock is rank 0's
            stop = bad_epochs >= int(self.tcfg["patience"]) or self._collective_out_of_time()
            if distributed.is_main():
                self._save_checkpoint(member, epoch, model, ema, opt, best_loss, best_state, bad_epochs, rng,
                                      finished)
            distributed.barrier()  # the checkpoint exists before any rank goes on (or stops)
            if stop:
                break
            if stop_at is not None and epoch + 1 >= int(stop_at) and epoch + 1 < epochs:
                bar.close()
                raise _Paused(best_state)
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

    def _batches(self, train_set):
        """Batches of this rank's share of ``train_set`` (the exact statistics are summed over ranks)."""
        bs = max(1, 4 * int(self.tcfg["batch_size"]))
        idx = shard(len(train_set), distributed.rank(), distributed.world_size())
        return self._batches_of(train_set, [idx[i:i + bs] for i in range(0, len(idx), bs)])

    def _final_model(self, states, data, train_set) -> BlipModel:
        model = self._blip_model(states, data, train_set)
        if distributed.is_main():
            save_model(model, self.out / "model.pt")
        distributed.barrier()
        return model


class _Paused(Exception):
    """training.max_epochs reached before training.epochs: the run stops after its checkpoint."""

    def __init__(self, best_state):
        super().__init__("paused")
        self.best_state = best_state


_BOARD_TAGS = {"train_loss": "train/loss", "train_data_loss": "train/data_loss", "kl": "train/kl",
               "mean_p": "train/mean_noise_rate", "contrastive_kl": "train/contrastive_kl",
               "contrastive_mean_p": "train/contrastive_mean_noise_rate", "valid_loss": "valid/loss",
               "valid_energy_rmse_per_atom": "valid/energy_rmse_per_atom", "valid_forces_rmse": "valid/forces_rmse",
               "lr": "lr"}


def _board(out: Path, tcfg: dict):
    """A TensorBoard SummaryWriter writing beside log.csv, or None (off, or tensorboard missing)."""
    if not tcfg["tensorboard"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("blip: training.tensorboard: tensorboard is not installed, so no event files "
              "(pip install 'blip-mlip[tensorboard]')", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(out))


def _adam_kernel(device) -> dict:
    """AdamW's implementation: the fused kernel (one kernel for all tensors of a parameter group)
    on CPU and CUDA, else the multi-tensor one. The default loops over tensors in Python on a
    CPU, and even the multi-tensor path reads every tensor's step count back to the host: each
    a few small kernels per tensor and step, milliseconds per step for BLIP's many small rate heads."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


def _sizes(structures) -> np.ndarray:
    """Atoms per structure (without building graphs; streamed data sets know them from their index)."""
    sizes = getattr(structures, "n_atoms", None)
    if sizes is not None:
        return np.asarray(sizes, dtype=np.int64)
    return np.array([len(s.atoms) for s in structures], dtype=np.int64)


def _partial_mean_rate(sums: list, rows: list, weight: float) -> float:
    """This rank's part of the mean rate over the global batch's rows (each layer weighs the same);
    ``sums``: the :class:`~blip.bayes.inference.LayerSums` of the pass, ``rows`` their global rows."""
    return weight * float(torch.cat([s.rate / r for s, r in zip(sums, rows)]).mean())


class GraphSet(torch.utils.data.Dataset):
    """Graphs of a sequence of structures, built on first use (cached for in-memory lists; streamed
    data sets build them anew, in the DataLoader workers with ``training.num_workers``)."""

    MISSING_STRESS = np.full((3, 3), np.nan)

    def __init__(self, structures, cutoff: float, stress: bool = False):
        """``stress``: every graph carries a stress label (eV/A^3), NaN where its structure has none."""
        self.structures, self.cutoff, self.stress = structures, float(cutoff), bool(stress)
        self.cache = None if getattr(structures, "streaming", False) else {}

    def __len__(self) -> int:
        return len(self.structures)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        s = self.structures[i]
        stress = (self.MISSING_STRESS if s.stress is None else s.stress) if self.stress else None
        graph = build_graph(s.atoms, self.cutoff, index=i, energy=s.energy, forces=s.forces, stress=stress)
        if self.cache is not None:
            self.cache[i] = graph
        return graph


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
