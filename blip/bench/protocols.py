"""Benchmark protocols: which data, splits, methods and budgets ``blip bench`` runs.

A protocol turns a data folder and the command-line options into a list of
:class:`Experiment` (one training set each, e.g. one size of a learning curve);
every method of an experiment is trained on the same split with the same seed and
budget. Energies are eV per structure, forces eV/Angstrom.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config as config_mod
from ..data import read_labelled
from ..errors import ConfigError, DataError

DEFAULT_DATA = Path("..") / "shared" / "data"
STANDARD_METHODS = ("deterministic", "blip", "mc_dropout", "ensemble")


@dataclass
class TestSet:
    """Labelled structures scored together; ``coordinate`` (one value per structure) marks a path."""

    name: str
    structures: list
    description: str = ""
    coordinate: np.ndarray | None = None
    coordinate_label: str | None = None


@dataclass
class MethodSpec:
    """One row label and the config sections that make it (``uq.method`` and more)."""

    name: str
    uq: dict
    training: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)


@dataclass
class Experiment:
    """One training set, its validation split (early stopping + recalibration) and test sets."""

    name: str
    train: list
    valid: list
    tests: list[TestSet]
    e0s: object  # a path, "average" or a mapping, as data.e0s in a config
    methods: list[MethodSpec]
    config: dict  # user config sections shared by every method (model, uq, training)
    source: str = ""
    timing_structures: int = 32  # structures of the first test set used to time prediction
    timing_repeats: int = 3  # alternating timings; the median ratio is reported
    reference_test: str | None = None  # in-distribution test set: sigma ratios are relative to it
    selector: str | None = None  # the --sets entry that selects it when not its name (e.g. a file's path)


@dataclass
class Budget:
    """Training budget of every network: fixed epochs, or epochs from a number of optimizer steps.

    ``minutes`` caps the wall time of each network (each ensemble member gets it).
    """

    epochs: int | None = None
    steps: int | None = None
    minutes: float | None = None
    scale: dict = field(default_factory=dict)  # method name -> multiple of the budget (e.g. equal cost)

    def factor(self, method: str | None) -> float:
        """Multiple of the budget that the networks of ``method`` get (1 unless scaled)."""
        return float(self.scale.get(method, 1.0))

    def epochs_for(self, n_train: int, batch_size: int, method: str | None = None) -> int:
        """Epochs of one network of ``method`` (its ``scale`` times the steps or epochs; an
        explicit 0 epochs stays 0, any other budget trains at least one epoch)."""
        if self.steps is not None:
            return max(1, math.ceil(self.factor(method) * self.steps / math.ceil(n_train / batch_size)))
        epochs = int(self.epochs)
        return 0 if epochs == 0 else max(1, round(self.factor(method) * epochs))

    def minutes_for(self, method: str | None = None) -> float | None:
        """Wall-time cap of one network of ``method`` (None: no cap)."""
        return None if self.minutes is None else float(self.minutes) * self.factor(method)

    def statement(self, ensemble_size: int) -> str:
        what = (f"{self.steps} optimizer steps (epochs = ceil(steps / batches per epoch))"
                if self.steps is not None else f"{self.epochs} epochs")
        cap = f", with a wall-time cap of {self.minutes:g} min per network" if self.minutes else ""
        if not self.scale:
            return (f"same budget for every method: each network trains for {what}{cap}; "
                    f"each of the {ensemble_size} ensemble members gets this budget, so the ensemble "
                    f"costs {ensemble_size}x the training of one network (see train_seconds)")
        scaled = ", ".join(f"{m} {f:g}x" for m, f in self.scale.items())
        return (f"budget per network: {what}{cap}, scaled per method by --budget-scale ({scaled}); "
                f"each of the {ensemble_size} ensemble members gets its method's budget "
                f"(compare the methods' train_seconds)")


@dataclass
class Options:
    """What the command line says about a run."""

    quick: bool = False
    seed: int = 0
    seeds: int = 1
    epochs: int | None = None
    steps: int | None = None
    budget_minutes: float | None = None
    max_test: int | None = None
    methods: list[str] | None = None
    backbone: str | None = None
    overrides: list[str] = field(default_factory=list)
    budget_scale: dict = field(default_factory=dict)  # method name -> multiple of the budget
    experiments: list[str] | None = None  # subset of a protocol's experiments (e.g. energy-split data sets)


@dataclass
class Plan:
    experiments: list[Experiment]
    budget: Budget
    settings: dict  # protocol-specific settings written to results.json


# -- data location --------------------------------------------------------------------
def data_dir(explicit: str | None) -> Path:
    """``--data`` if given, else $BLIP_DATA, else ../shared/data relative to the working directory."""
    chosen = explicit or os.environ.get("BLIP_DATA") or str(DEFAULT_DATA)
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise DataError(path, "data folder not found; pass --data DIR or set BLIP_DATA "
                              "(a folder with acac/, ethanol/ and si/ inside)")
    return path


def _need(folder: Path, *names: str) -> list[Path]:
    paths = [folder / n for n in names]
    for p in paths:
        if not p.is_file():
            raise DataError(p, f"file not found (protocol data expected in {folder.parent}; "
                               "pass --data DIR or set BLIP_DATA)")
    return paths


def _subset(items: list, n: int | None, seed: int) -> list:
    """A reproducible random subset of at most ``n`` items, in file order."""
    if n is None or len(items) <= n:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]


def _along_path(items: list, n: int | None) -> list:
    """At most ``n`` evenly spaced points of a path (keeps its ends)."""
    if n is None or len(items) <= n:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def _split(items: list, n_valid: int, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(items))
    valid = sorted(order[:n_valid].tolist())
    train = sorted(order[n_valid:].tolist())
    return [items[i] for i in train], [items[i] for i in valid]


def _methods(opts: Options, available=STANDARD_METHODS) -> list[MethodSpec]:
    names = list(opts.methods or available)
    unknown = [m for m in names if m not in available]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    _check_budget_scale(opts, available)
    # the deterministic model first: it is the reference of the prediction cost
    names.sort(key=lambda m: available.index(m))
    return [MethodSpec(m, {"method": m}) for m in names]


def _check_budget_scale(opts: Options, available) -> None:
    unknown = [m for m in opts.budget_scale if m not in available]
    if unknown:
        raise ConfigError(f"--budget-scale: unknown method(s) {', '.join(unknown)}; choose from {', '.join(available)}")


# -- shared settings ------------------------------------------------------------------
def _painn_model(quick: bool, backbone: str | None) -> dict:
    backbone = backbone or "painn"
    if quick and backbone == "painn":
        return {"backbone": "painn", "features": 16, "interactions": 2, "radial": 8}
    return {"backbone": backbone}


def _common_sections(opts: Options, model: dict) -> dict:
    cfg = {"model": dict(model), "uq": {}, "training": {"seed": opts.seed}}
    if opts.quick:
        cfg["uq"].update({"samples": 4, "ensemble_size": 2})
        cfg["training"].update({"batch_size": 4})
    return cfg


def _timing(quick: bool) -> dict:
    return {"timing_structures": 4, "timing_repeats": 1} if quick else {}


def _budget(opts: Options, full: Budget, quick: Budget) -> Budget:
    if opts.epochs is not None and opts.steps is not None:
        raise ConfigError("give --epochs or --steps, not both")
    base = quick if opts.quick else full
    budget = Budget(base.epochs, base.steps, base.minutes)
    if opts.epochs is not None:
        budget.epochs, budget.steps = opts.epochs, None
    if opts.steps is not None:
        budget.steps, budget.epochs = opts.steps, None
    if opts.budget_minutes is not None:
        budget.minutes = opts.budget_minutes
    budget.scale = dict(opts.budget_scale)
    return budget


def parse_budget_scale(text: str | None) -> dict[str, float]:
    """``"blip=3,mc_dropout=2"`` -> {"blip": 3.0, "mc_dropout": 2.0} (factors > 0)."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not name.strip() or not math.isfinite(factor) or factor <= 0:
            raise ConfigError(f"--budget-scale: '{item.strip()}' is not METHOD=FACTOR with a factor > 0")
        out[name.strip()] = factor
    return out


# -- ood-ethanol ----------------------------------------------------------------------
ETHANOL_VALID = 100  # structures of train.xyz held out for early stopping and recalibration
ETHANOL_MAX_TEST = None  # all 1000 structures of test_MD and all 145 methanol structures are scored


def ood_ethanol(root: Path, opts: Options) -> Plan:
    folder = root / "ethanol"
    train_f, md_f, mix_f, h_f, e0_f = _need(folder, "train.xyz", "test_MD.xyz", "test_eth_meth.xyz",
                                             "test_H_removal.xyz", "isolated_atoms.xyz")
    modes = sorted(folder.glob("test_norm_mode_*.xyz"))
    quick = opts.quick
    pool = read_labelled(train_f)
    n_valid = 6 if quick else ETHANOL_VALID
    train, valid = _split(pool, n_valid, opts.seed)
    if quick:
        train = _subset(train, 16, opts.seed)
    max_test = opts.max_test if opts.max_test is not None else (8 if quick else ETHANOL_MAX_TEST)
    methanol = [s for s in read_labelled(mix_f) if s.atoms.info.get("config_type") == "methanol"]
    if not methanol:
        raise DataError(mix_f, "no structure with config_type=methanol")
    tests = [
        TestSet("test_MD", _subset(read_labelled(md_f), max_test, opts.seed),
                "ethanol MD (in distribution)"),
        TestSet("test_eth_meth", _subset(methanol, max_test, opts.seed),
                "methanol structures of test_eth_meth.xyz (out of distribution; "
                "its ethanol structures are test_MD again and are not scored)"),
    ]
    path_points = 8 if quick else None
    h = _along_path(read_labelled(h_f, require_forces=False), path_points)
    tests.append(TestSet("test_H_removal", h, "O-H stretched until the H is removed (energies only)",
                         np.array([float(s.atoms.info["OH_dist"]) for s in h]), "O-H distance [Å]"))
    for f in modes:
        pts = _along_path(read_labelled(f, require_forces=False), path_points)
        tests.append(TestSet(f.stem, pts, f"displacement along normal mode {f.stem.rsplit('_', 1)[-1]} "
                                          "cm⁻¹ (energies only)",
                             np.array([float(s.atoms.info["displacement"]) for s in pts]),
                             "displacement along the mode"))
    budget = _budget(opts, Budget(epochs=25), Budget(epochs=1, minutes=0.5))
    cfg = _common_sections(opts, _painn_model(quick, opts.backbone))
    exp = Experiment("", train, valid, tests, str(e0_f), _methods(opts), cfg, str(train_f), **_timing(quick),
                     reference_test="test_MD")
    settings = {"train_file": str(train_f), "n_train": len(train), "n_valid": len(valid),
                "split": f"{len(valid)} random structures of train.xyz (seed {opts.seed}) are the validation "
                         "set (early stopping, recalibration); the rest is the training set",
                "test_sets": {t.name: {"n": len(t.structures), "description": t.description} for t in tests}}
    return Plan([exp], budget, settings)


# -- data-scarce ----------------------------------------------------------------------
ACAC_SIZES = (25, 50, 100, 250, 450)
ACAC_VALID = 50
ACAC_MAX_TEST = 250


def data_scarce(root: Path, opts: Options) -> Plan:
    folder = root / "acac"
    train_f, test_f, e0_f = _need(folder, "train_300K.xyz", "test_MD_300K.xyz", "isolated_atoms.xyz")
    quick = opts.quick
    pool = read_labelled(train_f)
    n_valid = 4 if quick else ACAC_VALID
    rest, valid = _split(pool, n_valid, opts.seed)
    sizes = (5, 10) if quick else ACAC_SIZES
    if max(sizes) > len(rest):
        raise DataError(train_f, f"needs {max(sizes) + n_valid} structures, has {len(pool)}")
    # nested training sets: the first N of one fixed random order
    order = np.random.default_rng(opts.seed + 1).permutation(len(rest))
    max_test = opts.max_test if opts.max_test is not None else (6 if quick else ACAC_MAX_TEST)
    test = TestSet("test_MD_300K", _subset(read_labelled(test_f), max_test, opts.seed),
                   "acetylacetone MD at 300 K (same distribution as training)")
    budget = _budget(opts, Budget(steps=400), Budget(epochs=1, minutes=0.5))
    cfg = _common_sections(opts, _painn_model(quick, opts.backbone))
    experiments = []
    for n in sizes:
        train = [rest[i] for i in sorted(order[:n].tolist())]
        experiments.append(Experiment(f"N={n}", train, valid, [test], str(e0_f), _methods(opts), cfg,
                                      str(train_f), **_timing(quick)))
    settings = {"train_file": str(train_f), "sizes": list(sizes), "n_valid": len(valid), "learning_curve": True,
                "split": f"{len(valid)} random structures of train_300K.xyz (seed {opts.seed}) are the "
                         "validation set of every size; training sets are nested (the first N of one "
                         "fixed random order of the rest)",
                "test_sets": {test.name: {"n": len(test.structures), "description": test.description}}}
    return Plan(experiments, budget, settings)


# -- finetune-si ----------------------------------------------------------------------
SI_TRAIN_GROUPS = ("AIMD-NVT", "Elastic")
SI_TEST_GROUPS = ("Vacancy", "Surface")
# The fine-tuning settings of every method are the defaults for pretrained models
# (blip.config.FINETUNE_DEFAULTS): this protocol measures them.


def _si_groups(root: Path, opts: Options) -> tuple[list, list, list, Path]:
    """Training, validation and test sets of the silicon protocols: train on the bulk groups
    (``SI_TRAIN_GROUPS`` of train.xyz, 10 % held out for validation), test on the bulk structures
    of test.xyz (in distribution) and on every structure of the held-out ``SI_TEST_GROUPS``."""
    folder = root / "si"
    train_f, test_f = _need(folder, "train.xyz", "test.xyz")
    quick = opts.quick
    train_all, test_all = read_labelled(train_f), read_labelled(test_f)

    def group(structures, names):
        return [s for s in structures if s.atoms.info.get("config_type") in names]

    pool = group(train_all, SI_TRAIN_GROUPS)
    n_valid = 2 if quick else max(1, round(0.1 * len(pool)))
    train, valid = _split(pool, n_valid, opts.seed)
    max_test = opts.max_test if opts.max_test is not None else (2 if quick else None)
    if quick:
        train = _subset(train, 3, opts.seed)
    tests = [TestSet("test_AIMD_Elastic", _subset(group(test_all, SI_TRAIN_GROUPS), max_test, opts.seed),
                     "AIMD-NVT and Elastic structures of test.xyz (in distribution)")]
    for name in SI_TEST_GROUPS:
        tests.append(TestSet(name, _subset(group(train_all + test_all, (name,)), max_test, opts.seed),
                             f"all {name} structures of train.xyz and test.xyz (out of distribution)"))
    return train, valid, tests, train_f


def _si_settings(train: list, valid: list, tests: list) -> dict:
    return {"n_train": len(train), "n_valid": len(valid),
            "split": f"train: {'+'.join(SI_TRAIN_GROUPS)} of train.xyz ({len(valid)} of them held out "
                     f"for validation); test: held-out groups {', '.join(SI_TEST_GROUPS)}",
            "test_sets": {t.name: {"n": len(t.structures), "description": t.description} for t in tests}}


def finetune_si(root: Path, opts: Options) -> Plan:
    try:
        import blip.backbones.chgnet  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ConfigError(f"finetune-si needs the CHGNet backbone (blip/backbones/chgnet.py): {exc}") from None
    if opts.backbone not in (None, "chgnet"):
        raise ConfigError("finetune-si always uses the pretrained CHGNet backbone; drop --backbone "
                          "(si-defects trains PaiNN or MACE from scratch on the same split)")
    quick = opts.quick
    train, valid, tests, train_f = _si_groups(root, opts)
    methods = [
        MethodSpec("chgnet-as-is", {"method": "deterministic"}, {"epochs": 0}),
        MethodSpec("finetune", {"method": "deterministic"}),
        MethodSpec("blip-finetune", {"method": "blip"}),
        MethodSpec("mc-dropout-finetune", {"method": "mc_dropout"}),
        MethodSpec("ensemble-finetune", {"method": "ensemble"}),
    ]
    if opts.methods:
        unknown = [m for m in opts.methods if m not in [s.name for s in methods]]
        if unknown:
            raise ConfigError(f"finetune-si methods are {', '.join(s.name for s in methods)}; "
                              f"unknown: {', '.join(unknown)}")
        methods = [s for s in methods if s.name in opts.methods]
    _check_budget_scale(opts, [s.name for s in methods])
    budget = _budget(opts, Budget(epochs=10), Budget(epochs=1, minutes=1.0))
    cfg = {"model": {"backbone": "chgnet", "pretrained": True}, "uq": {},
           "training": {"seed": opts.seed, "batch_size": 2 if quick else 4}}
    if quick:
        cfg["uq"]["samples"] = 2
    exp = Experiment("", train, valid, tests, "average", methods, cfg, str(train_f), **_timing(quick),
                     reference_test="test_AIMD_Elastic")
    settings = {**_si_settings(train, valid, tests), "finetune_defaults": config_mod.FINETUNE_DEFAULTS}
    return Plan([exp], budget, settings)


def si_defects(root: Path, opts: Options) -> Plan:
    """PaiNN (or ``--backbone mace``) trained from scratch on bulk silicon (the split of finetune-si),
    tested on bulk structures and on the held-out vacancy and surface groups."""
    if opts.backbone not in (None, "painn", "mace"):
        raise ConfigError("si-defects trains painn or mace from scratch; for CHGNet use finetune-si")
    train, valid, tests, train_f = _si_groups(root, opts)
    budget = _budget(opts, Budget(steps=1500), Budget(epochs=1, minutes=0.5))
    cfg = _common_sections(opts, _painn_model(opts.quick, opts.backbone))
    cfg["training"]["batch_size"] = 4  # 4 cells of 63-64 atoms a step
    exp = Experiment("", train, valid, tests, "average", _methods(opts), cfg, str(train_f), **_timing(opts.quick),
                     reference_test="test_AIMD_Elastic")
    return Plan([exp], budget, _si_settings(train, valid, tests))


# -- energy-split ---------------------------------------------------------------------
PACKAGED_DATA = Path(__file__).parent / "data"
#: name -> (folder under --data or None for data shipped with blip, files pooled, E0s)
ENERGY_SPLIT_SETS = {
    "ethanol": ("ethanol", ("train.xyz", "test_MD.xyz"), "isolated_atoms.xyz"),
    "acac": ("acac", ("train_300K.xyz", "test_MD_300K.xyz"), "isolated_atoms.xyz"),
    "ammonia": (None, ("ammonia_gfn2.xyz",), "average"),
}
ENERGY_SPLIT_FRACTION = 0.5  # the lowest-energy half is "in distribution"
ENERGY_SPLIT_VALID = 50
ENERGY_SPLIT_ID_TEST = 100
ENERGY_SPLIT_MAX_TRAIN = 450
ENERGY_SPLIT_MAX_TEST = 300


def energy_ranked(structures: list, e0s: dict) -> list:
    """Structures sorted by energy per atom above the isolated-atom references (lowest first)."""
    def key(s):
        return (s.energy - sum(e0s.get(int(z), 0.0) for z in s.atoms.numbers)) / len(s.atoms)

    return sorted(structures, key=key)


def energy_split_source(name: str) -> tuple[str, tuple[str | Path | None, tuple[str, ...], str]]:
    """Experiment name and (folder or None for the packaged data, files, E0s) of an energy-split set:
    a name of ``ENERGY_SPLIT_SETS``, or the path of a labelled extxyz file of one's own (the experiment is
    named after the file; isolated-atom energies by least squares, ``e0s: average``)."""
    if name in ENERGY_SPLIT_SETS:
        return name, ENERGY_SPLIT_SETS[name]
    path = Path(name)
    if path.is_file():
        return path.stem, (path.parent.resolve(), (path.name,), "average")
    raise ConfigError(f"energy-split data sets are {', '.join(ENERGY_SPLIT_SETS)} or the path of a labelled "
                      f"extxyz file; {name!r} is neither")


def energy_split(root: Path, opts: Options) -> Plan:
    """Train on the lowest-energy structures, test on held-out low-energy ones and on the high-energy rest."""
    from ..data import resolve_e0s

    quick = opts.quick
    entries = list(opts.experiments or ENERGY_SPLIT_SETS)
    budget = _budget(opts, Budget(steps=1500), Budget(epochs=1, minutes=0.5))
    cfg = _common_sections(opts, _painn_model(quick, opts.backbone))
    n_valid, n_id = (4, 4) if quick else (ENERGY_SPLIT_VALID, ENERGY_SPLIT_ID_TEST)
    max_train = 12 if quick else ENERGY_SPLIT_MAX_TRAIN
    max_test = opts.max_test if opts.max_test is not None else (6 if quick else ENERGY_SPLIT_MAX_TEST)
    experiments, described = [], {}
    for entry in entries:
        name, (folder_name, files, e0_name) = energy_split_source(entry)
        folder = PACKAGED_DATA if folder_name is None else root / folder_name
        paths = _need(folder, *files)
        pool = [s for f in paths for s in read_labelled(f)]
        e0s_spec = e0_name if e0_name == "average" else str(_need(folder, e0_name)[0])
        ranked = energy_ranked(pool, resolve_e0s(e0s_spec, pool))
        n_low = int(round(ENERGY_SPLIT_FRACTION * len(ranked)))
        low, high = ranked[:n_low], ranked[n_low:]
        order = np.random.default_rng(opts.seed).permutation(len(low))
        valid = [low[i] for i in sorted(order[:n_valid])]
        id_test = [low[i] for i in sorted(order[n_valid:n_valid + n_id])]
        train = [low[i] for i in sorted(order[n_valid + n_id:n_valid + n_id + max_train])]
        tests = [TestSet("low_energy", _subset(id_test, max_test, opts.seed),
                         f"{name}: held-out structures of the lowest-energy half (in distribution)"),
                 TestSet("high_energy", _subset(high, max_test, opts.seed),
                         f"{name}: the highest-energy half (out of distribution)")]
        experiments.append(Experiment(name, train, valid, tests, e0s_spec, _methods(opts), cfg,
                                      str(paths[0]), **_timing(quick), reference_test="low_energy",
                                      selector=entry))
        described[name] = {"files": [str(p) for p in paths], "n_pool": len(pool), "n_train": len(train),
                           "n_valid": len(valid), "n_low_energy_test": len(tests[0].structures),
                           "n_high_energy_test": len(tests[1].structures)}
    settings = {"data_sets": described,
                "split": f"structures ranked by energy per atom above the isolated-atom references; the lowest "
                         f"{ENERGY_SPLIT_FRACTION:.0%} are split at random (seed {opts.seed}) into validation "
                         f"(early stopping, recalibration), a low-energy test set and training (at most "
                         f"{max_train}); the high-energy rest is the out-of-distribution test set",
                "test_sets": {"low_energy": {"description": "held-out low-energy structures (in distribution)"},
                              "high_energy": {"description": "the high-energy half (out of distribution)"}}}
    return Plan(experiments, budget, settings)


PROTOCOLS = {
    "ood-ethanol": (ood_ethanol, "train on ethanol MD; test in distribution, on methanol and along "
                                 "bond-breaking and normal-mode paths"),
    "data-scarce": (data_scarce, "acetylacetone learning curve, N = 25 ... 450 training structures"),
    "finetune-si": (finetune_si, "pretrained CHGNet as is / fine-tuned / BLIP fine-tuned on silicon, "
                                 "tested on held-out defect and surface groups"),
    "si-defects": (si_defects, "PaiNN (or MACE) trained from scratch on bulk silicon (AIMD-NVT, Elastic); "
                               "tested on bulk structures and on the held-out vacancy and surface groups"),
    "energy-split": (energy_split, "train on the lowest-energy half of a data set (ethanol, acetylacetone, a "
                                   "GFN2-xTB ammonia set, or a labelled extxyz file of one's own); test on "
                                   "held-out low-energy and on high-energy structures"),
}


def build_plan(name: str, root: Path, opts: Options) -> Plan:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    plan = PROTOCOLS[name][0](root, opts)
    if opts.experiments:
        known = [e.name for e in plan.experiments]
        selectors = [e.selector or e.name for e in plan.experiments]
        unknown = [e for e in opts.experiments if e not in selectors]
        if unknown or not any(known):
            raise ConfigError(f"--sets: {name} has the experiments {', '.join(n or '(one)' for n in known)}; "
                              f"unknown: {', '.join(unknown)}")
        plan.experiments = [e for e in plan.experiments if (e.selector or e.name) in opts.experiments]
    return plan
