"""``blip export``: a BLIP model as a metatomic ``AtomisticModel`` (TorchScript) for ASE, LAMMPS, i-PI.

    blip export model.pt -o exported.pt [--samples K] [--seed S] [--dtype float64]

Outputs of the exported model (eV; per system unless stated):

* ``energy``: the noise-free (MAP) pass of BLIP and MC-dropout models with
  ``uq.predict_mean: map`` (the default), else the mean of the K samples; an ensemble's
  member mean; also per atom. Forces and stress come from the engine's autograd.
* ``energy_ensemble`` (K properties) and ``energy_uncertainty``: K fixed-seed noise samples
  (an ensemble: its members), scaled about the prediction (``energy``) by the calibration factor,
  and their root mean square deviation from it (widened with the structure's largest feature
  distance where the calibration does, ``energy_novelty``): exactly
  ``blip.Calculator(model, samples=K, seed=S)``'s ``energy_samples`` and ``energy_std`` for one
  structure. Deterministic models (and ``--samples 0``) export ``energy`` only.
* A model of several sampled networks (``uq.networks``): each network's own samples (its share
  of K, seed S + m) and calibration, mixed as ``blip.Calculator`` mixes them (the networks' mean;
  the mixture's factor within the networks' validation feature distances; :mod:`blip.uq.mixture`).

See docs/export.md. Backbones: PaiNN and MACE (CHGNet is refused with the reason).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from .errors import BlipError

INSTALL_HINT = "pip install blip-mlip[metatomic]"
SUPPORTED_BACKBONES = ("painn", "mace")
UNSUPPORTED_REASONS = {
    "chgnet": "CHGNet builds its atom and bond (angle) graphs in Python with its own graph converter "
              "(pymatgen/numpy) and runs on CrystalGraph objects, which TorchScript cannot compile; "
              "export is not available for CHGNet models",
}


class ExportError(BlipError):
    """A model that cannot be exported, or a missing dependency."""


def _require_metatomic():
    try:
        import metatomic.torch  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"blip export needs metatomic-torch ({exc}); install it with: {INSTALL_HINT}") from None


def build_exported(model, samples: int | None = None, seed: int = 0, dtype=None):
    """The metatomic ``AtomisticModel`` (not yet compiled) of a :class:`blip.predictor.BlipModel`.

    samples: K noise samples of ``energy_ensemble`` / ``energy_uncertainty`` (default: the
    model's ``uq.samples``; 0: energy only); an ensemble's K is its number of members.
    dtype: None keeps the model's precision; "float32" or "float64" exports a converted copy.
    """
    _require_metatomic()
    from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput

    from . import __version__
    from ._export_torchscript import BlipMetatomic, LearnedRate, PaiNNEnergy
    from .calculator import _with_dtype
    from .uq.mixture import network_limit, network_shares

    backbone = model.config["model"]["backbone"]
    if backbone not in SUPPORTED_BACKBONES:
        reason = UNSUPPORTED_REASONS.get(backbone, f"export supports the {', '.join(SUPPORTED_BACKBONES)} "
                                                   f"backbone(s), not '{backbone}'")
        raise ExportError(f"cannot export a {backbone} model: {reason}")
    if dtype is not None:
        model = _with_dtype(model, str(dtype).replace("torch.", ""))
    members = [copy.deepcopy(m).cpu().eval() for m in model.members]  # metatomic freezes their parameters
    model_dtype = next(members[0].parameters()).dtype
    method = model.method
    ensemble = method == "ensemble"
    if ensemble:
        k = len(members)
    elif members[0].stochastic:
        k = model.default_samples if samples is None else int(samples)
        if k < 0:
            raise ValueError("samples must be >= 0")
    else:
        k = 0
    spread = k > 0
    predict_map = (not ensemble) and (not spread or not members[0].stochastic or model.predicts_map)
    if backbone == "mace":
        from ._export_mace import MaceEnergy as energy_of
    else:
        energy_of = PaiNNEnergy
    with torch.no_grad():
        energies = [energy_of(m) for m in members]
    nets = model.networks() if model.mixture else [model]  # each network with its own calibration
    shares = network_shares(max(k, 1), len(nets))
    widenings = [_energy_widening(net, spread and not ensemble) for net in nets]
    limit = network_limit(model.calibration, "energy") if model.mixture and spread else None
    per_member = widenings * (len(energies) // len(widenings))  # an ensemble: one entry for all its members
    for energy, (b, _, b2, _) in zip(energies, per_member):
        if b == 0.0 and b2 == 0.0 and limit is None:  # nothing reads the distances: sampled passes skip them
            for rate in (m for m in energy.modules() if isinstance(m, LearnedRate)):
                rate.records_novelty = False
    b_e, centres, b_beyond, limits = (list(v) for v in zip(*widenings))
    module = BlipMetatomic(energies, cutoff=model.cutoff, samples=shares, seed=int(seed),
                           calibration=[float(net.calibration["energy"]) for net in nets], predict_map=predict_map,
                           ensemble=ensemble, dtype=model_dtype, energy_novelty=b_e, novelty_centre=centres,
                           energy_beyond=b_beyond, novelty_limit=limits,
                           mixture_factor=float(model.calibration["energy"]) if model.mixture else 1.0,
                           mixture_limit=float("inf") if limit is None else limit).eval()
    outputs = {"energy": ModelOutput(unit="eV", sample_kind="atom", explicit_gradients=[])}  # or per system
    if spread:
        outputs["energy_uncertainty"] = ModelOutput(unit="eV", sample_kind="system", explicit_gradients=[])
        outputs["energy_ensemble"] = ModelOutput(unit="eV", sample_kind="system", explicit_gradients=[])
    n_interactions = len(members[0].backbone.model.interactions if backbone == "mace" else
                         members[0].backbone.interactions)
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=[int(z) for z in model.summary.elements],
        interaction_range=float(model.cutoff) * n_interactions,
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype="float64" if model_dtype == torch.float64 else "float32",
    )
    description = _description(model, backbone, k, shares, int(seed), widenings) if spread else \
        f"BLIP {method} model, {backbone} backbone; energy only"
    metadata = ModelMetadata(name=f"blip-{backbone}-{method}", description=description,
                             references={"implementation": [f"BLIP {__version__}"]})
    return AtomisticModel(module, metadata, capabilities)


def _energy_widening(model, widened: bool) -> tuple[float, float, float, float]:
    """(b_E, centre, b2, limit) of ``model``'s energy widening (:mod:`blip.uq.recalibration`); zeros
    (limit inf) when its spread is not ``widened`` or its rate heads do not see feature distances."""
    from .uq.recalibration import BEYOND_KEYS, NOVELTY_KEYS

    (b_key, centre_key), (b2_key, limit_key) = NOVELTY_KEYS["energy"], BEYOND_KEYS["energy"]
    cal = model.calibration if widened and model.members[0].wants_novelty else {}  # as BlipModel.predict
    return (float(cal.get(b_key, 0.0)), float(cal.get(centre_key, 0.0)), float(cal.get(b2_key, 0.0)),
            float(cal.get(limit_key, float("inf"))))


def _description(model, backbone: str, k: int, shares: list[int], seed: int, widenings: list) -> str:
    """The exported model's metadata description: where its samples and spread come from."""
    from .uq.mixture import network_limit
    from .uq.recalibration import widening_formula

    def widened(b, centre, b2, limit) -> str:
        if b == 0.0 and b2 == 0.0:
            return ""
        text = f", widened by {widening_formula(b, centre, 'nu_max')} with the largest per-atom feature distance nu_max"
        return text + (f" and by {widening_formula(b2, limit, 'nu_max')} above {limit:.6g}" if b2 > 0.0 else "")

    head = f"BLIP {model.method} model, {backbone} backbone; energy_ensemble / energy_uncertainty from {k} noise samples"
    if not model.mixture:
        return f"{head} (seed {seed}), calibration factor {float(model.calibration['energy']):.6g}" + widened(*widenings[0])
    parts = [f"network {m}: {share} samples, seed {seed + m}, calibration factor "
             f"{float(net.calibration['energy']):.6g}" + widened(*w)
             for m, (share, net, w) in enumerate(zip(shares, model.networks(), widenings))]
    text = (f"{head} of its {len(shares)} networks (uq.networks; " + "; ".join(parts) + "), mixed: the networks' "
            f"mean, spread f sqrt(mean_m sigma_m^2 + mean_m (mu_m - mu)^2), f = {float(model.calibration['energy']):.6g}")
    limit = network_limit(model.calibration, "energy")
    return text + (f", max(f, 1) where nu_max (the networks' mean) exceeds {limit:.6g}" if limit is not None else "")


def export_model(model_or_path, output, samples: int | None = None, seed: int = 0, dtype=None) -> Path:
    """Write ``model_or_path`` (a BlipModel or a model file) as a metatomic model file ``output``.

    Returns the path written. See :func:`build_exported` for ``samples`` and ``dtype``;
    ``seed`` fixes the noise of the samples (the same draws as ``blip.Calculator(seed=seed)``).
    """
    _require_metatomic()
    if isinstance(model_or_path, (str, Path)):
        from .io import load

        model_or_path = load(model_or_path)
    exported = build_exported(model_or_path, samples=samples, seed=seed, dtype=dtype)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from ._files import atomic_path

    with atomic_path(output, suffix=".pt") as tmp:
        exported.save(str(tmp))
    return output


# -- CLI ---------------------------------------------------------------------------------
def cmd_export(args) -> int:
    path = export_model(args.model, args.output, samples=args.samples, seed=args.seed, dtype=args.dtype)
    print(f"wrote {path} (metatomic model: ASE via metatomic-ase, LAMMPS pair_style metatomic, i-PI; "
          "see docs/export.md)", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    from .cli import nonnegative_int

    p = subparsers.add_parser("export", help="export to a metatomic model (TorchScript) for ASE, LAMMPS, i-PI")
    p.add_argument("model", help="BLIP model file (model.pt)")
    p.add_argument("-o", "--output", required=True, help="metatomic model file to write")
    p.add_argument("--samples", type=nonnegative_int, default=None,
                   help="noise samples K of energy_ensemble / energy_uncertainty (default: the model's "
                        "uq.samples; 0: energy only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise samples (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="precision of the exported model (default: the model's)")
    p.set_defaults(func=cmd_export)
