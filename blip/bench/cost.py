"""``blip bench cost``: what the uncertainty costs, as ratios to the noise-free pass of the same model.

    blip bench cost --out docs/results/cost        # PaiNN and MACE on acac, Si 64 and Si 1000
    blip bench cost --backbone chgnet --sets acac,Si64 --out docs/results/cost/chgnet  # pretrained CHGNet
    blip bench cost --quick --out /tmp/cost        # tiny models and systems, seconds

For every backbone and system, in one process and thread setting, with the methods timed
in interleaved repetitions (each timing paired with a MAP timing just before it, so a
shared machine's drifts cancel): ``predict`` of BLIP and MC dropout for each K, of the
5-member ensemble, over ``predict(samples=0)`` (the MAP pass) of the BLIP model; the
per-sample marginal cost (least-squares slope of the ratio in K, K >= 4); peak memory;
one training step (BLIP, MC dropout) over the deterministic model's at batch sizes 8 and 32;
and ``blip md`` with the uncertainty watch over MD driven by the MAP forces alone. Models are
untrained: cost does not depend on the weights. Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from .._files import write_text_atomic
from ..allocator import release_freed_memory
from ..backbones.base import DatasetSummary
from ..build import build_potential, weight_noise
from ..data import all_periodic, read_structures
from ..predictor import BlipModel
from ..uq.recalibration import NOVELTY_KEYS, WIDENING_SETTINGS
from .results import write_json
from .runner import log

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SAMPLES = (1, 4, 8, 16, 32)
#: batch sizes of the training-step timing: BLIP's extra cost per step is mostly a fixed number of small
#: operations (rate heads, statistics, KL, noise), so its ratio falls as batches grow
TRAIN_BATCH_SIZES = (8, 32)
ELEMENTS = [1, 6, 8, 14]
CHGNET = {"backbone": "chgnet", "model_name": "0.3.0", "pretrained": True, "cutoff": 6.0}  # examples/si/finetune.yaml
MODELS = {  # the example configs' models (examples/acac/config.yaml, mace.yaml, si/finetune.yaml)
    "painn": {"backbone": "painn", "cutoff": 5.0, "features": 64, "interactions": 3, "radial": 20},
    "mace": {"backbone": "mace", "cutoff": 5.0, "num_channels": 32, "max_L": 1, "correlation": 3,
             "num_interactions": 2, "num_radial": 8, "max_ell": 3, "radial_mlp": [32, 32], "mlp_irreps": "16x0e"},
    "chgnet": CHGNET,
}
QUICK_MODELS = {
    "painn": {"backbone": "painn", "cutoff": 4.0, "features": 8, "interactions": 2, "radial": 6},
    "mace": {"backbone": "mace", "cutoff": 4.0, "hidden_irreps": "4x0e + 4x1o", "correlation": 2,
             "num_interactions": 2, "num_radial": 4, "max_ell": 1, "radial_mlp": [8], "mlp_irreps": "4x0e"},
    "chgnet": CHGNET,  # the pretrained architecture has one size: --quick shortens only the systems and K
}


def systems(quick: bool) -> dict[str, list]:
    """name -> structures timed together: 8 acetylacetone molecules (15 atoms), Si cells."""
    from ase.build import bulk

    def silicon(repeat: int):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
        atoms.rattle(0.05, seed=0)
        return [atoms]

    acac = read_structures(EXAMPLES / "acac" / "test_MD_300K.xyz")
    if quick:
        return {"acac": acac[:2], "Si8": silicon(1)}
    return {"acac": acac[:8], "Si64": silicon(2), "Si1000": silicon(5)}


def _config(model: dict, method: str, quick: bool) -> dict:
    uq = {"method": method, "samples": 16}
    if quick:
        uq["ensemble_size"] = 2
    return config_mod.resolve({"model": dict(model), "uq": uq})


def build_models(model: dict, quick: bool, seed: int = 0, periodic: bool = False) -> dict[str, BlipModel]:
    """Untrained BLIP, MC dropout and ensemble models of one backbone (float32, CPU); ``periodic``:
    as if trained on periodic cells (BLIP's ``uq.distance_metric: auto`` then resolves for crystals)."""
    summary = DatasetSummary(elements=ELEMENTS, periodic=periodic)
    out = {}
    for method in ("blip", "mc_dropout", "ensemble"):
        cfg = _config(model, method, quick)
        members = []
        for k in range(config_mod.networks_of(cfg)):
            torch.manual_seed(seed + k)
            members.append(build_potential(cfg, summary))
        out[method] = BlipModel(members, cfg, summary, calibration=default_calibration(cfg, members[0]))
    return out


def default_calibration(cfg: dict, member) -> dict:
    """Unit factors, and for BLIP the default widenings' b (so that predict records each atom's
    feature distance as a recalibrated model does; the centres do not change the cost)."""
    calibration = {"energy": 1.0, "forces": 1.0}
    if member.wants_novelty:
        for target, key in WIDENING_SETTINGS.items():
            setting, (b_key, centre_key) = cfg["uq"][key], NOVELTY_KEYS[target]
            if setting:  # a fitted b (true) counts as the default's size
                calibration.update({b_key: 0.1 if setting is True else float(setting), centre_key: 0.0})
    return calibration


def acac_blip_model(backbone: str) -> tuple[BlipModel, list]:
    """An untrained BLIP model of ``backbone``'s example config (cost does not depend on the
    weights) with its feature statistics fitted, and the acetylacetone structures they were fitted on."""
    model = build_models(MODELS[backbone], False)["blip"]
    acac = systems(False)["acac"]
    fit_statistics(model, acac)
    return model, acac


def fit_statistics(model: BlipModel, structures) -> None:
    """Fit every member's feature statistics exactly on ``structures`` (one batch, on the CPU)."""
    from ..data import build_graph, collate

    graphs = [build_graph(a, model.cutoff, index=i) for i, a in enumerate(structures)]
    for m in model.members:
        m.fit_feature_statistics([collate(graphs, dtype=model.dtype)])


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def predict_ratios(models: dict[str, BlipModel], structures, samples: tuple[int, ...], repeats: int) -> list[dict]:
    """Rows {method, samples, ratio} of predict time over the MAP predict of the BLIP model.

    Each timing is paired with a MAP timing just before it; the ratio is the median over
    ``repeats`` of the paired ratios (order of the configurations rotating)."""
    blip = models["blip"]
    configs = [("blip", k) for k in samples] + [("mc_dropout", k) for k in samples] + [("ensemble", None)]
    blip.predict(structures, samples=2, seed=0)  # warm-up
    ratios = paired_ratios(configs, lambda c: blip.predict(structures, samples=0, seed=0),
                           lambda c: models[c[0]].predict(structures, samples=c[1], seed=0), repeats)
    return [{"method": m, "samples": k if k is not None else len(models[m].members),
             "ratio": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)} for (m, k), r in ratios.items()]


def paired_ratios(configs: list, reference, timed, repeats: int) -> dict:
    """``{config: [timed(config) / reference(config) seconds, one per repeat]}``: each timing paired with
    a reference timing just before it, the order of the configurations rotating over the repeats."""
    ratios = {c: [] for c in configs}
    for rep in range(repeats):
        for c in configs[rep % len(configs):] + configs[:rep % len(configs)]:
            t_reference = _seconds(lambda: reference(c))
            ratios[c].append(_seconds(lambda: timed(c)) / t_reference)
    return ratios


def marginal_cost(rows: list[dict], method: str) -> dict:
    """Least-squares line ratio = intercept + slope * K over K >= 4: slope = MAP passes per sample."""
    pts = [(r["samples"], r["ratio"]) for r in rows if r["method"] == method and r["samples"] >= 4]
    if len(pts) < 2:
        return {"slope": None, "intercept": None}
    k, y = np.array(pts, dtype=float).T
    slope, intercept = np.polyfit(k, y, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def peak_memory_mb(fn) -> float | None:
    """Peak resident memory (MiB) reached while ``fn`` runs, above the resident memory before it.

    Linux only (resets the kernel's high-water mark through /proc/self/clear_refs); None elsewhere.
    Freed heap memory is given back first (:func:`blip.allocator.release_freed_memory`), so memory
    kept from earlier calls does not hide this one's.
    """
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not (status.is_file() and clear.exists()):
        return None

    def read(key):
        for line in status.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return None

    release_freed_memory()
    try:
        clear.write_text("5")
    except OSError:
        return None
    before = read("VmRSS:")
    fn()
    peak = read("VmHWM:")
    return None if before is None or peak is None else max(peak - before, 0.0)


#: training-step variants of :func:`train_step_ratios`: name -> (uq.method, other uq settings)
TRAIN_STEP_METHODS = {m: (m, {}) for m in ("deterministic", "blip", "mc_dropout")}


def training_epoch(model: dict, method: str, uq: dict, steps: int, batch_size: int, output_dir: str,
                   device: str = "cpu", train_file: str | None = None):
    """One network of ``method`` ready to train: ``(run, n_steps)`` where ``run(epoch)`` trains one
    epoch of ``n_steps`` steps of ``batch_size`` acetylacetone structures (or those of the labelled
    extxyz ``train_file``, isolated-atom energies fitted). One warm-up epoch has run (graphs built)."""
    from ..train.datasets import prepare_data
    from ..train.loop import GraphSet, Trainer, _sizes

    data = ({"train_file": str(train_file)} if train_file else
            {"train_file": str(EXAMPLES / "acac" / "train_300K.xyz"), "e0s": str(EXAMPLES / "acac" / "isolated_atoms.xyz")})
    cfg = config_mod.resolve({
        "data": {**data, "max_train": steps * batch_size, "valid_fraction": 0.1},
        "model": dict(model), "uq": {"method": method, "samples": 16, **uq},
        "training": {"batch_size": batch_size, "seed": 0, "device": device}, "output_dir": output_dir})
    trainer = Trainer(cfg, progress=False)
    prepared = prepare_data(cfg)
    train_set, sizes = GraphSet(prepared.train, float(cfg["model"]["cutoff"])), _sizes(prepared.train)
    net, opt, ema = trainer._new_member(prepared, 0)
    rng = np.random.default_rng(0)

    def run(epoch: int) -> None:
        trainer._train_epoch(net, opt, ema, train_set, sizes, rng, epoch=epoch)

    run(0)
    return run, -(-len(train_set) // batch_size)


def train_step_ratios(model: dict, repeats: int, steps: int, batch_size: int, device: str = "cpu",
                      variants: dict[str, tuple[str, dict]] | None = None, train_file: str | None = None) -> list[dict]:
    """Median time of one training step (forward, forces, loss, backward, optimiser; BLIP's KL and
    noise-contrastive pass) of each variant over the first one's (by default BLIP and MC dropout over
    the deterministic model), on batches of :func:`training_epoch`, on ``device``.

    ``variants``: name -> (uq.method, uq settings) or (uq.method, uq settings, model settings over
    ``model``), default ``TRAIN_STEP_METHODS``. Rows {method (the variant's name), batch_size,
    seconds_per_step, ratio (of medians), ratio_min (of the fastest repeats)}."""
    variants = variants or TRAIN_STEP_METHODS
    with tempfile.TemporaryDirectory() as tmp:
        setups = [(name, *training_epoch({**model, **(extra[0] if extra else {})}, method, uq, steps, batch_size,
                                         tmp, device, train_file))
                  for name, (method, uq, *extra) in variants.items()]
        times = {name: [] for name in variants}
        for rep in range(repeats):
            turn = rep % len(setups)
            for name, run, n_steps in setups[turn:] + setups[:turn]:
                times[name].append(_seconds(lambda: run(rep + 1)) / n_steps)
    first = next(iter(variants))
    base, fastest = statistics.median(times[first]), min(times[first])
    return [{"method": name, "batch_size": batch_size, "seconds_per_step": statistics.median(t),
             "ratio": statistics.median(t) / base, "ratio_min": min(t) / fastest} for name, t in times.items()]


def md_ratios(model: BlipModel, atoms, steps: int, repeats: int, watches: list[tuple[int, int]]) -> list[dict]:
    """Wall time of ``blip md`` (NVT) with the uncertainty watch (K samples every M steps) over
    the same run with no check after step 0; rows {samples, every, ratio}."""
    from ..md import MDSettings, run_md

    def run(samples, every):
        run_md(model, atoms, MDSettings(steps=steps, every=every, samples=samples, seed=0))

    run(2, steps + 1)  # warm-up
    ratios = {w: [] for w in watches}
    for _ in range(repeats):
        for k, every in watches:
            t_plain = _seconds(lambda: run(1, steps + 1))
            ratios[(k, every)].append(_seconds(lambda: run(k, every)) / t_plain)
    return [{"samples": k, "every": every, "ratio": statistics.median(r)} for (k, every), r in ratios.items()]


def run(out: Path, backbones: list[str], quick: bool = False, repeats: int | None = None,
        system_names: list[str] | None = None) -> dict:
    """Measure everything for each backbone; write OUT/results.json and OUT/results.md."""
    start = time.time()
    repeats = repeats or (1 if quick else 3)
    samples = (1, 2) if quick else SAMPLES
    all_systems = systems(quick)
    chosen = {k: v for k, v in all_systems.items() if system_names is None or k in system_names}
    md_steps = 10 if quick else 200
    train_batches = (4,) if quick else TRAIN_BATCH_SIZES
    # (K, every M) of the watch; (8, 20) is blip md's default
    watches = [(2, 5)] if quick else [(16, 10), (16, 20), (16, 60), (8, 20), (8, 30), (4, 20)]
    rows, slopes, memory, train_rows, md_rows = [], [], [], [], []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"protocol": "cost", "quick": quick, "repeats": repeats, "samples": list(samples),
                "backbones": backbones, "systems": {k: len(v[0]) for k, v in chosen.items()},
                "md_steps": md_steps, "train_batch_sizes": list(train_batches),
                "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform()}, "torch": torch.__version__}
    data = {"predict": rows, "marginal": slopes, "memory": memory, "train_step": train_rows, "md": md_rows}

    def write(complete: bool) -> None:  # after every system, so an interrupted run keeps what it measured
        settings.update(wall_seconds=time.time() - start, complete=complete,
                        finished=datetime.datetime.now().isoformat(timespec="seconds") if complete else None)
        write_json(out, rows, {**settings, **{k: v for k, v in data.items() if k != "predict"}})
        write_text_atomic(out / "results.md", markdown(data, settings))

    for name in backbones:
        model_cfg = (QUICK_MODELS if quick else MODELS)[name]
        built: dict[bool, dict] = {}  # models as trained on molecules (False) or periodic cells (True)
        for system, structures in chosen.items():
            periodic = all_periodic(structures)
            if periodic not in built:
                built[periodic] = build_models(model_cfg, quick, periodic=periodic)
            models = built[periodic]
            settings.setdefault("distance_metric", {})[f"{name} {system}"] = \
                models["blip"].members[0].inference.metric
            settings.setdefault("weight_noise", {})[f"{name} {system}"] = \
                weight_noise(models["blip"].config, DatasetSummary(elements=ELEMENTS, periodic=periodic))
            fit_statistics(models["blip"], structures)
            n_atoms = sum(len(a) for a in structures)
            log(f"cost: {name} {system} ({len(structures)} x {n_atoms // len(structures)} atoms), {repeats} repeats")
            new = predict_ratios(models, structures, samples, repeats)
            rows += [{"backbone": name, "system": system, "n_atoms": n_atoms, **r} for r in new]
            for method in ("blip", "mc_dropout"):
                slopes.append({"backbone": name, "system": system, "method": method, **marginal_cost(new, method)})
            k_mem = samples[-2] if len(samples) > 2 else samples[-1]
            memory.append({"backbone": name, "system": system, "samples": k_mem,
                           "map_mb": peak_memory_mb(lambda: models["blip"].predict(structures, samples=0, seed=0)),
                           "blip_mb": peak_memory_mb(lambda: models["blip"].predict(structures, samples=k_mem, seed=0)),
                           "ensemble_mb": peak_memory_mb(lambda: models["ensemble"].predict(structures, seed=0))})
            write(False)
        log(f"cost: {name} training step and MD")
        for batch_size in train_batches:
            train_rows += [{"backbone": name, **r}
                           for r in train_step_ratios(model_cfg, repeats, 4 if quick else 8, batch_size)]
        md_model = built.get(False) or build_models(model_cfg, quick)
        fit_statistics(md_model["blip"], all_systems["acac"])
        md_rows += [{"backbone": name, **r} for r in md_ratios(md_model["blip"], all_systems["acac"][0], md_steps,
                                                              repeats, watches)]
        write(False)
    write(True)
    log(f"cost: done in {(time.time() - start) / 60:.1f} min; wrote {out / 'results.md'}")
    return {**data, "settings": settings}


def _fmt(v, digits=2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(data: dict, s: dict) -> str:
    lines = ["# blip bench cost", "",
             "Ratios to the noise-free (MAP) `predict` of the same BLIP model, same process and threads "
             f"(median of {s['repeats']} interleaved repeats, each paired with its own MAP timing). "
             "Untrained models (cost does not depend on the weights); BLIP's `predict` includes its MAP pass "
             "(`uq.predict_mean: map`).", "",
             f"* machine: {s['machine']['cpu_count']} CPU cores, torch threads {s['machine']['torch_threads']}, "
             f"torch {s['torch']}; wall time {s['wall_seconds'] / 60:.1f} min",
             "* systems: " + ", ".join(f"{k} ({v} atoms per structure)" for k, v in s["systems"].items()),
             "* BLIP's feature distance (`uq.distance_metric: auto`, as for a model trained on such structures): "
             + ", ".join(f"{k} {v}" for k, v in s.get("distance_metric", {}).items()),
             "* BLIP's weight noise (`uq.weight_noise: auto`, likewise): "
             + ", ".join(f"{k} {v}" for k, v in s.get("weight_noise", {}).items()), ""]
    systems_ = list(s["systems"])
    for backbone in s["backbones"]:
        lines += [f"## {backbone}", "", "### predict [× MAP]", "",
                  "| method | K | " + " | ".join(systems_) + " |", "|---|---:|" + "---:|" * len(systems_)]
        keyed = {(r["method"], r["samples"], r["system"]): r["ratio"] for r in data["predict"] if r["backbone"] == backbone}
        for method, k in dict.fromkeys((r["method"], r["samples"]) for r in data["predict"] if r["backbone"] == backbone):
            lines.append(f"| {method} | {k} | " + " | ".join(_fmt(keyed.get((method, k, sy))) for sy in systems_) + " |")
        lines += ["", "Marginal cost per sample (slope of the ratio in K, K >= 4) [MAP passes]:", "",
                  "| method | " + " | ".join(systems_) + " |", "|---|" + "---:|" * len(systems_)]
        for method in ("blip", "mc_dropout"):
            sl = {r["system"]: r["slope"] for r in data["marginal"] if r["backbone"] == backbone and r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(_fmt(sl.get(sy)) for sy in systems_) + " |")
        lines += ["", "Peak resident memory of one predict above the memory before it [MiB]:", "",
                  "| system | MAP | BLIP (K) | ensemble |", "|---|---:|---:|---:|"]
        for r in (r for r in data["memory"] if r["backbone"] == backbone):
            lines.append(f"| {r['system']} | {_fmt(r['map_mb'], 0)} | {_fmt(r['blip_mb'], 0)} ({r['samples']}) | "
                         f"{_fmt(r['ensemble_mb'], 0)} |")
        lines += ["", "Training step on acetylacetone [× deterministic at the same batch size]:", "",
                  "| method | batch | ms / step | ratio |", "|---|---:|---:|---:|"]
        for r in (r for r in data["train_step"] if r["backbone"] == backbone):
            lines.append(f"| {r['method']} | {r['batch_size']} | {1000 * r['seconds_per_step']:.1f} | "
                         f"{r['ratio']:.2f} |")
        lines += ["", f"`blip md` ({s['md_steps']} NVT steps, acetylacetone) with the watch (K samples every M "
                      "steps) [× MD without checks]:", "", "| K | every M | ratio |", "|---:|---:|---:|"]
        for r in (r for r in data["md"] if r["backbone"] == backbone):
            lines.append(f"| {r['samples']} | {r['every']} | {r['ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)
