"""``blip bench active``: does uncertainty-driven selection need fewer labels than random?

A mixed ethanol pool of what a campaign meets, labelled once with GFN2-xTB (tblite; labels
stay hidden until a structure is picked), and test sets of every regime:

    equilibrium   rMD17 ethanol MD geometries (ethanol/train.xyz, test_MD.xyz)
    hot_md        GFN2-xTB Langevin MD of ethanol at 1200 K (own trajectories for pool and test)
    rattled       equilibrium geometries with Gaussian displacements (sigma 0.05-0.15 A)
    stretched     one X-H bond stretched 1.2-1.7x, and the O-H removal path (test_H_removal.xyz)
    methanol      methanol MD geometries (ethanol/train_eth_meth.xyz, test_eth_meth.xyz)
    dimers        HH ... OO dissociation curves (ethanol/test_dimers.xyz)

The initial labelled set is drawn from equilibrium structures only. For every seed one
active-learning run compares the selectors ``uncertainty`` (BLIP's calibrated force sigma
with model-feature batch diversity), ``random``, ``fps`` (farthest-point sampling in the
model's feature space) and ``ensemble`` (a 5-member deep ensemble's sigma as the selector);
every curve is the test force RMSE of a BLIP model trained on the selected labels. A second
run per seed repeats ``uncertainty`` with warm-started rounds. Geometries whose largest
GFN2-xTB force exceeds FORCE_CAP are left out (they would dominate every RMSE).

Writes OUT/results.json, OUT/results.md and OUT/plots/*.png; data and runs go to OUT/data
and OUT/runs (or --runs-dir).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

REGIMES = ("equilibrium", "hot_md", "rattled", "stretched", "methanol", "dimers")
SELECTORS = ("uncertainty", "random", "fps", "ensemble")
FORCE_CAP = 20.0  # eV/A: largest per-atom force norm kept
#: structures per regime: pool / test (full run) and the smoke test (--quick)
POOL_SIZES = {"equilibrium": 400, "hot_md": 150, "rattled": 100, "stretched": 100, "methanol": 100, "dimers": 50}
TEST_SIZE = 50
QUICK_POOL, QUICK_TEST = 6, 3
N_INITIAL_CANDIDATES = 100


def log(message: str) -> None:
    import sys

    print(f"[blip bench active] {message}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------
def _xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def _label(atoms_list, regime: str) -> list:
    """GFN2-xTB energy/forces on copies of ``atoms_list``; failures and force-cap outliers dropped."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for a in atoms_list:
        b = a.copy()
        b.info = {"regime": regime}
        b.arrays = {k: v for k, v in b.arrays.items() if k in ("numbers", "positions")}
        b.calc = _xtb()
        try:
            e, f = float(b.get_potential_energy()), np.array(b.get_forces())
        except Exception:  # SCF failures: leave the geometry out
            continue
        if not np.isfinite(e) or not np.all(np.isfinite(f)) or np.linalg.norm(f, axis=1).max() > FORCE_CAP:
            continue
        b.calc = SinglePointCalculator(b, energy=e, forces=f)
        out.append(b)
    return out


def _hot_md(start, n_frames: int, seed: int, temperature: float = 1200.0, every: int = 10, equil: int = 100):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    a = start.copy()
    a.info, a.calc = {}, _xtb()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(a, temperature_K=temperature, rng=rng)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng)
    dyn.run(equil)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frames.append(a.copy())
    return frames


def _stretch(a, rng):
    """Stretch one X-H bond of ``a`` by 1.2-1.7x (the H moves along the bond)."""
    b = a.copy()
    z, pos = b.numbers, b.positions
    pairs = [(i, j) for i in range(len(b)) for j in range(len(b))
             if z[i] != 1 and z[j] == 1 and np.linalg.norm(pos[j] - pos[i]) < 1.25]
    i, j = pairs[rng.integers(len(pairs))]
    pos[j] = pos[i] + (pos[j] - pos[i]) * rng.uniform(1.2, 1.7)
    b.positions = pos
    return b


def build_data(root: Path, folder: Path, quick: bool = False, seed: int = 1234) -> dict:
    """Write (or reuse) OUT/data: initial.xyz, pool.xyz, test_<regime>.xyz, e0s.json; return paths."""
    import ase.io

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "data.json"
    if done.is_file():
        return json.loads(done.read_text())
    eth = root / "ethanol"
    rng = np.random.default_rng(seed)
    n_pool = {k: (QUICK_POOL if quick else v) for k, v in POOL_SIZES.items()}
    n_test = QUICK_TEST if quick else TEST_SIZE
    t0 = time.time()
    train = ase.io.read(eth / "train.xyz", ":")
    test_md = ase.io.read(eth / "test_MD.xyz", ":")
    order = rng.permutation(len(train))
    used = iter(order)
    take = lambda n: [train[next(used)] for _ in range(n)]  # noqa: E731 (disjoint draws from train.xyz)
    geo = {"pool": {}, "test": {}}
    initial = take(QUICK_POOL if quick else N_INITIAL_CANDIDATES)
    geo["pool"]["equilibrium"] = take(n_pool["equilibrium"])
    geo["test"]["equilibrium"] = [test_md[i] for i in rng.permutation(len(test_md))[:n_test]]
    # hot MD: separate trajectories for pool (3) and test (1)
    starts = take(4)
    per = -(-n_pool["hot_md"] // 3)
    geo["pool"]["hot_md"] = sum((_hot_md(starts[k], per, seed + k) for k in range(3)), [])[: n_pool["hot_md"]]
    geo["test"]["hot_md"] = _hot_md(starts[3], n_test, seed + 3)
    for split, n in (("pool", n_pool["rattled"]), ("test", n_test)):
        frames = []
        for a in take(n):
            b = a.copy()
            b.positions = b.positions + rng.normal(0.0, rng.uniform(0.05, 0.15), b.positions.shape)
            frames.append(b)
        geo[split]["rattled"] = frames
    h_removal = ase.io.read(eth / "test_H_removal.xyz", ":")
    h_pool, h_test = h_removal[0::2], h_removal[1::2]
    n_path_pool = min(len(h_pool), n_pool["stretched"] // 3)
    n_path_test = min(len(h_test), n_test // 3)
    geo["pool"]["stretched"] = ([h_pool[i] for i in rng.permutation(len(h_pool))[:n_path_pool]]
                                + [_stretch(a, rng) for a in take(n_pool["stretched"] - n_path_pool)])
    geo["test"]["stretched"] = ([h_test[i] for i in rng.permutation(len(h_test))[:n_path_test]]
                                + [_stretch(a, rng) for a in take(n_test - n_path_test)])
    meth_train = [a for a in ase.io.read(eth / "train_eth_meth.xyz", ":") if len(a) == 6]
    meth_test = [a for a in ase.io.read(eth / "test_eth_meth.xyz", ":") if len(a) == 6]
    geo["pool"]["methanol"] = [meth_train[i] for i in rng.permutation(len(meth_train))[:n_pool["methanol"]]]
    geo["test"]["methanol"] = [meth_test[i] for i in rng.permutation(len(meth_test))[:n_test]]
    dimers = [a for a in ase.io.read(eth / "test_dimers.xyz", ":") if float(a.info.get("distance", 0)) >= 0.6]
    pick = rng.permutation(len(dimers))
    geo["pool"]["dimers"] = [dimers[i] for i in pick[: n_pool["dimers"]]]
    geo["test"]["dimers"] = [dimers[i] for i in pick[n_pool["dimers"]: n_pool["dimers"] + n_test]]
    # labels (GFN2-xTB), written as extxyz with energy/forces
    paths = {"initial": str(folder / "initial.xyz"), "pool": str(folder / "pool.xyz"), "tests": {}}
    counts = {"pool": {}, "test": {}}
    ase.io.write(paths["initial"], _label(initial, "equilibrium"), format="extxyz")
    pool = []
    for regime in REGIMES:
        labelled = _label(geo["pool"][regime], regime)
        counts["pool"][regime] = len(labelled)
        pool += labelled
    ase.io.write(paths["pool"], pool, format="extxyz")
    for regime in REGIMES:
        labelled = _label(geo["test"][regime], regime)
        counts["test"][regime] = len(labelled)
        path = folder / f"test_{regime}.xyz"
        ase.io.write(path, labelled, format="extxyz")
        paths["tests"][regime] = str(path)
    e0s = {}
    from ase import Atoms

    for sym in ("H", "C", "O"):
        a = Atoms(sym, positions=[[0, 0, 0]])
        a.calc = _xtb()
        e0s[sym] = float(a.get_potential_energy())
    paths.update(e0s=e0s, counts=counts, force_cap_eV_A=FORCE_CAP, label_seconds=time.time() - t0,
                 reference="GFN2-xTB (tblite), labels computed once; hidden from the selectors until picked")
    done.write_text(json.dumps(paths, indent=1))
    log(f"data: pool {sum(counts['pool'].values())} ({counts['pool']}), test {counts['test']}, "
        f"{time.time() - t0:.0f} s")
    return paths


def _write_e0s(e0s: dict, path: Path) -> str:
    """The GFN2-xTB isolated-atom energies as an extxyz file (what data.e0s reads)."""
    import ase.io
    from ase import Atoms

    frames = []
    for sym, e in e0s.items():
        a = Atoms(sym, positions=[[0.0, 0.0, 0.0]])
        a.info.update(config_type="isolated_atom", energy=float(e))
        frames.append(a)
    ase.io.write(path, frames, format="extxyz")
    return str(path.resolve())


# -- runs ---------------------------------------------------------------------------------
def al_user_config(data: dict, out: Path, seed: int, settings: dict, warm: bool, warm_epochs=None) -> dict:
    s = settings
    return {
        "active_learning": {
            "initial_file": data["initial"], "initial_size": s["initial"], "initial_pick": "random",
            "pool_file": data["pool"], "oracle": "pool", "rounds": s["rounds"], "n_select": s["n_select"],
            "strategies": ["uncertainty"] if warm else list(s["selectors"]), "score": "max_force_std",
            "diversity": s.get("diversity", "weighted"), "diversity_space": "features", "diversity_threshold": s["diversity_threshold"],
            "samples": s["samples"], "ensemble_size": s["ensemble_size"], "warm_start": warm,
            "warm_start_epochs": (warm_epochs or s["warm_start_epochs"]) if warm else None, "seed": seed,
        },
        "data": {"valid_fraction": 0.1, "test_files": dict(data["tests"]), "e0s": data["e0s_file"]},
        "model": dict(s["model"]),
        "uq": {"method": "blip", "samples": s["samples"]},
        "training": {"epochs": s["epochs"], "batch_size": 8, "lr": 5e-3, "patience": s["epochs"] + 1,
                     "seed": seed, "device": "cpu"},
        "output_dir": str(out),
    }


def overall_rmse(rows: list[dict], counts: dict) -> float:
    """Force RMSE over every test atom of every regime, from the per-regime RMSEs (meV/A)."""
    num = den = 0.0
    for row in rows:
        n = counts[row["test"]]
        num += n * row["forces_rmse_meV_A"] ** 2
        den += n
    return float(np.sqrt(num / den))


def regime_geomean(rows: list[dict]) -> float:
    """Geometric mean over regimes of the per-regime force RMSEs (each regime weighs the same)."""
    return float(np.exp(np.mean([np.log(row["forces_rmse_meV_A"]) for row in rows])))


#: all-regime force errors: the headline (every test force component) and two secondary views
METRICS = {
    "forces_rmse_meV_A": "RMSE over every force component of the 6 test sets (headline)",
    "forces_rmse_no_dimers_meV_A": "the same without the dimer test set",
    "forces_rmse_regime_geomean_meV_A": "geometric mean over the 6 regimes of their force RMSEs",
}


def curve_of(rows: list[dict], strategy: str, counts: dict) -> dict:
    by_round: dict[int, list] = {}
    for row in rows:
        if row["strategy"] == strategy:
            by_round.setdefault(int(row["round"]), []).append(row)
    rounds = sorted(by_round)
    return {
        "round": rounds,
        "n_labelled": [int(by_round[r][0]["n_labelled"]) for r in rounds],
        "forces_rmse_meV_A": [overall_rmse(by_round[r], counts) for r in rounds],
        "forces_rmse_no_dimers_meV_A": [overall_rmse([x for x in by_round[r] if x["test"] != "dimers"], counts)
                                        for r in rounds],
        "forces_rmse_regime_geomean_meV_A": [regime_geomean(by_round[r]) for r in rounds],
        "per_regime_forces_rmse_meV_A": {t: [next(x["forces_rmse_meV_A"] for x in by_round[r] if x["test"] == t)
                                             for r in rounds] for t in counts},
        "energy_per_atom_rmse_meV": [float(np.mean([x["energy_per_atom_rmse_meV"] for x in by_round[r]]))
                                     for r in rounds],
        "train_seconds": [float(by_round[r][0]["train_seconds"]) for r in rounds],
        "pool_max_force_std": [by_round[r][0].get("pool_max_force_std") for r in rounds],
    }


def labels_to_reach(n: list, rmse: list, target: float, cap: float) -> float:
    """Labels at which the curve first reaches ``target`` (linear interpolation between rounds);
    beyond the curve: linear extrapolation of its last segment when it still falls, capped at ``cap``."""
    for k in range(len(n)):
        if rmse[k] <= target:
            if k == 0:
                return float(n[0])
            x0, x1, y0, y1 = n[k - 1], n[k], rmse[k - 1], rmse[k]
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    if len(n) >= 2 and rmse[-1] < rmse[-2]:
        slope = (rmse[-1] - rmse[-2]) / (n[-1] - n[-2])
        return float(min(cap, n[-1] + (target - rmse[-1]) / slope))
    return float(cap)


def run(out: Path, root: Path, seeds: list[int], quick: bool = False, epochs: int | None = None,
        runs_dir: Path | None = None, progress: bool = False, selectors=SELECTORS, warm: bool = True,
        warm_epochs: list[int] | None = None, diversity: str = "weighted") -> dict:
    """All seeds of the benchmark. ``warm_epochs``: epochs of the warm-started rounds, one
    warm-start run per value (default: a third of the from-scratch epochs)."""
    import torch

    from ..active import ActiveLearning, resolve_config

    start = time.time()
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(root, out / "data", quick=quick)
    data["e0s_file"] = _write_e0s(data["e0s"], out / "data" / "isolated_atoms.xyz")
    ep = epochs if epochs is not None else (2 if quick else 40)
    settings = {
        "initial": 4 if quick else 20, "rounds": 2 if quick else 5, "n_select": 3 if quick else 20,
        "samples": 4 if quick else 8, "ensemble_size": 5, "epochs": ep,
        "warm_start_epochs": max(1, ep // 3), "diversity_threshold": 0.5, "selectors": list(selectors),
        "diversity": diversity,
        "warm_start_variants": list(warm_epochs or [max(1, ep // 3)]),
        "model": ({"backbone": "painn", "cutoff": 5.0, "features": 8, "interactions": 1, "radial": 6} if quick else
                  {"backbone": "painn", "cutoff": 5.0, "features": 32, "interactions": 2, "radial": 16}),
    }
    from ase.io import read

    counts = {t: 3 * sum(len(a) for a in read(p, ":")) for t, p in data["tests"].items()}
    per_seed = {}
    for seed in seeds:
        log(f"seed {seed}: selectors {', '.join(selectors)}")
        cfg = resolve_config(al_user_config(data, runs_dir / f"seed{seed}" / "scratch", seed, settings, False), out)
        rows = ActiveLearning(cfg, progress=progress, log=log).run()
        entry = {"scratch": rows}
        for n_warm in (settings["warm_start_variants"] if warm else []):
            name = "warm" if n_warm == settings["warm_start_epochs"] else f"warm_e{n_warm}"
            warm_out = runs_dir / f"seed{seed}" / name
            src = cfg.output_dir / "round_000"
            if not (warm_out / "round_000" / "metrics.json").is_file():  # round 0 is shared: copy it
                shutil.copytree(src, warm_out / "round_000", dirs_exist_ok=True, ignore=shutil.ignore_patterns("selector"))
            wcfg = resolve_config(al_user_config(data, warm_out, seed, settings, True, n_warm), out)
            log(f"seed {seed}: uncertainty with warm-started rounds ({n_warm} epochs each)")
            entry[f"warm{n_warm}"] = ActiveLearning(wcfg, progress=progress, log=log).run()
        per_seed[seed] = entry
    result = summarise(per_seed, counts, settings, selectors)
    result["settings"] = {
        **settings, "data": {k: v for k, v in data.items() if k not in ("initial", "pool", "tests", "e0s_file")},
        "seeds": seeds, "quick": quick, "data_dir": str(root),
        "curve_model": "every curve is the test force RMSE of a BLIP model (tiny PaiNN) trained on the selected "
                       "labels; the ensemble selector trains a 5-member deterministic ensemble on the same "
                       "labels each round to pick from",
        "fps_space": "per-structure mean and max over atoms of the round's BLIP model's scalar features "
                     "(the energy readout's input, noise-free pass)",
        "diversity": ("weighted: each pick maximises sigma x its distance (model feature space) to the nearest "
                      "labelled or already picked structure" if settings["diversity"] == "weighted" else
                      "greedy on sigma: skip a candidate within 0.5 x the labelled set's median nearest-neighbour "
                      "distance (model feature space) of one already picked in the batch"),
        "test_force_rmse": "over every force component of the 6 regime test sets together",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "wall_seconds": time.time() - start,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    plots = write_plots(out, result)
    (out / "results.md").write_text(markdown(result, plots))
    log(f"done in {(time.time() - start) / 60:.1f} min; wrote {out / 'results.json'}")
    return result


def _ms(values) -> dict:
    """Mean and (population) standard deviation over seeds, the first axis of ``values``."""
    a = np.asarray(values, dtype=float)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist()}


def summarise(per_seed: dict, counts: dict, settings: dict, selectors) -> dict:
    seeds = sorted(per_seed)
    curves, fractions = {}, {}
    raw = {s: {sel: curve_of(per_seed[s]["scratch"], sel, counts) for sel in selectors} for s in seeds}
    for sel in selectors:
        cs = [raw[s][sel] for s in seeds]
        curves[sel] = {"n_labelled": cs[0]["n_labelled"],
                       **{m: _ms([c[m] for c in cs]) for m in METRICS},
                       "energy_per_atom_rmse_meV": _ms([c["energy_per_atom_rmse_meV"] for c in cs]),
                       "per_regime_forces_rmse_meV_A": {t: _ms([c["per_regime_forces_rmse_meV_A"][t] for c in cs])
                                                        for t in counts},
                       "train_seconds": _ms([c["train_seconds"] for c in cs]),
                       "pool_max_force_std": _ms([[np.nan if v is None else v for v in c["pool_max_force_std"]]
                                                  for c in cs]),
                       "per_seed_forces_rmse_meV_A": {str(s): raw[s][sel]["forces_rmse_meV_A"] for s in seeds}}
    by_metric = {}
    if "random" in selectors:
        for metric in METRICS:
            by_metric[metric] = {}
            for sel in selectors:
                vals = []
                for s in seeds:
                    rnd, c = raw[s]["random"], raw[s][sel]
                    target, n_final = rnd[metric][-1], rnd["n_labelled"][-1]
                    vals.append(labels_to_reach(c["n_labelled"], c[metric], target, 2 * n_final) / n_final)
                by_metric[metric][sel] = {**_ms(vals), "per_seed": vals}
        fractions = by_metric["forces_rmse_meV_A"]
    result = {"protocol": "active", "seeds": len(seeds), "curves": curves,
              "label_fraction_to_match_random": fractions.get("uncertainty", {}).get("mean"),
              "label_fraction_to_match_random_by_selector": fractions,
              "label_fraction_to_match_random_secondary": {m: v for m, v in by_metric.items()
                                                           if m != "forces_rmse_meV_A"},
              "metrics": METRICS,
              "label_fraction_rule": "per seed: labels (initial set included) at which the selector's curve "
                                     "first reaches random's final test force RMSE (linear interpolation between "
                                     "rounds; never reached: linear extrapolation of the last segment if it "
                                     "still falls, capped at 2x), over random's final labels; mean over seeds"}
    variants = {}
    for n_warm in settings.get("warm_start_variants", [settings.get("warm_start_epochs")]):
        if not all(f"warm{n_warm}" in per_seed[s] for s in seeds):
            continue
        w = [curve_of(per_seed[s][f"warm{n_warm}"], "uncertainty", counts) for s in seeds]
        c = [raw[s]["uncertainty"] for s in seeds]
        sc_t = [np.mean(x["train_seconds"][1:]) for x in c]
        w_t = [np.mean(x["train_seconds"][1:]) for x in w]
        variants[str(n_warm)] = {
            "epochs_from_scratch": settings["epochs"], "epochs_warm": n_warm,
            "curve_warm": {"n_labelled": w[0]["n_labelled"], **{m: _ms([x[m] for x in w]) for m in METRICS},
                           "train_seconds": _ms([x["train_seconds"] for x in w])},
            "round_seconds_scratch": _ms(sc_t),
            "round_seconds_warm": _ms(w_t),
            "time_ratio_warm_over_scratch": float(np.mean(w_t) / np.mean(sc_t)),
            "final_forces_rmse_scratch": _ms([x["forces_rmse_meV_A"][-1] for x in c]),
            "final_forces_rmse_warm": _ms([x["forces_rmse_meV_A"][-1] for x in w]),
            "per_seed_final_forces_rmse": {"scratch": [x["forces_rmse_meV_A"][-1] for x in c],
                                           "warm": [x["forces_rmse_meV_A"][-1] for x in w]},
            "per_seed_round_seconds": {"scratch": sc_t, "warm": w_t},
            "seconds": "mean over rounds 1..N of the trainer's wall time (round 0 is shared)",
        }
    if variants:
        result["warm_start"] = variants.get(str(settings.get("warm_start_epochs")), next(iter(variants.values())))
        result["warm_start_variants"] = variants
    return result


def write_plots(out: Path, result: dict) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    curves = result["curves"]
    names = []
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for sel, c in curves.items():
        n, m, s = np.array(c["n_labelled"]), np.array(c["forces_rmse_meV_A"]["mean"]), np.array(c["forces_rmse_meV_A"]["std"])
        ax.plot(n, m, marker="o", label=sel)
        ax.fill_between(n, m - s, m + s, alpha=0.2)
    ax.set_xlabel("labelled structures")
    ax.set_ylabel("test force RMSE, all regimes (meV/Å)")
    ax.set_yscale("log")
    ax.set_title(f"mixed ethanol pool, mean ± std over {result['seeds']} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(folder / "learning_curves.png", dpi=120)
    names.append("plots/learning_curves.png")

    regimes = list(next(iter(curves.values()))["per_regime_forces_rmse_meV_A"])
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for ax, t in zip(axes, regimes):
        for sel, c in curves.items():
            n = np.array(c["n_labelled"])
            m = np.array(c["per_regime_forces_rmse_meV_A"][t]["mean"])
            s = np.array(c["per_regime_forces_rmse_meV_A"][t]["std"])
            ax.plot(n, m, marker="o", ms=3, label=sel)
            ax.fill_between(n, m - s, m + s, alpha=0.2)
        ax.set_title(t, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("labelled structures")
        ax.set_ylabel("force RMSE (meV/Å)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(folder / "per_regime.png", dpi=110)
    names.append("plots/per_regime.png")

    variants = result.get("warm_start_variants", {})
    if variants:
        fig = Figure(figsize=(10, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        a1, a2 = fig.subplots(1, 2)
        sc = curves["uncertainty"]
        lines = [("from scratch", sc)] + [(f"warm start, {v['epochs_warm']} epochs", v["curve_warm"])
                                          for v in variants.values()]
        for label, c in lines:
            n = np.array(c["n_labelled"])
            for ax, key in ((a1, "forces_rmse_meV_A"), (a2, "train_seconds")):
                m, s = np.array(c[key]["mean"]), np.array(c[key]["std"])
                ax.plot(n, m, marker="o", label=label)
                ax.fill_between(n, m - s, m + s, alpha=0.2)
        a1.set_ylabel("test force RMSE (meV/Å)")
        a1.set_yscale("log")
        a2.set_ylabel("training wall time per round (s)")
        for ax in (a1, a2):
            ax.set_xlabel("labelled structures")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.savefig(folder / "warm_start.png", dpi=110)
        names.append("plots/warm_start.png")
    return names


def markdown(result: dict, plots: list[str]) -> str:
    curves = result["curves"]
    lines = [f"# blip bench active ({result['seeds']} seeds)", "",
             "| selector | final labels | final test force RMSE (meV/Å) | label fraction to match random |",
             "|---|---:|---:|---:|"]
    fr = result["label_fraction_to_match_random_by_selector"]
    for sel, c in curves.items():
        m, s = c["forces_rmse_meV_A"]["mean"][-1], c["forces_rmse_meV_A"]["std"][-1]
        f = fr.get(sel)
        lines.append(f"| {sel} | {c['n_labelled'][-1]} | {m:.1f} ± {s:.1f} | "
                     + (f"{f['mean']:.2f} ± {f['std']:.2f}" if f else "n/a") + " |")
    for ws in result.get("warm_start_variants", {}).values():
        lines += ["", f"Warm start ({ws['epochs_warm']} epochs per round): {ws['round_seconds_warm']['mean']:.1f} s vs {ws['round_seconds_scratch']['mean']:.1f} s "
                      f"per round (ratio {ws['time_ratio_warm_over_scratch']:.2f}); final force RMSE "
                      f"{ws['final_forces_rmse_warm']['mean']:.1f} ± {ws['final_forces_rmse_warm']['std']:.1f} vs "
                      f"{ws['final_forces_rmse_scratch']['mean']:.1f} ± {ws['final_forces_rmse_scratch']['std']:.1f} meV/Å"]
    lines += [""] + [f"![]({p})" for p in plots]
    return "\n".join(lines) + "\n"
