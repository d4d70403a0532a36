"""ASE calculator with BLIP uncertainties.

    import blip
    atoms.calc = blip.Calculator("model.pt", samples=16, seed=0)
    atoms.get_potential_energy()            # energy of the noise-free (MAP) model, eV
    atoms.calc.results["forces_std"]        # (n, 3) standard deviation, eV/A

Result keys (units eV, eV/Angstrom; energies per structure):

* ``energy``, ``free_energy`` (float) and ``forces`` (n, 3): the prediction, as
  ``BlipModel.predict`` gives it: the noise-free (MAP) pass for BLIP and MC dropout with
  ``uq.predict_mean: map`` (the default), else the mean over the K samples; an ensemble's
  member mean.
* ``energy_std`` (float), ``forces_std`` (n, 3): **standard deviations**: the root mean square
  deviation of the K samples from the prediction (for a MAP prediction that includes the
  samples' mean offset from it; for a sample mean it is the population std, ddof=0), times the
  model's calibration factor; where the model's force spread is per atom (``uq.force_std``) a
  row's three entries are equal, the root mean square of the atom's component spreads.
  ``forces_std`` also holds the calibration's floor in quadrature (1 % of the validation force
  RMSE by default, ``uq.force_std_floor``), which the samples do not carry.
* ``energy_var`` (float), ``forces_var`` (n, 3): the variances, exactly ``std**2``
  (the names MACE's committee calculator uses).
* ``energy_samples`` (K,), ``forces_samples`` (K, n, 3): the samples, scaled about the
  prediction by the calibration factor (K = 0 in MAP mode, where every std and var is zero).
* periodic structures only: ``stress`` (6,) eV/A^3 (Voigt order xx, yy, zz, yz, xz, xy and
  ASE's sign convention, as ``atoms.get_stress()``), ``stress_std``, ``stress_var`` (6,) and
  ``stress_samples`` (K, 6); a model recalibrated on stress labels with ``uq.stress_std_floor`` > 0
  (off by default) adds that floor to ``stress_std`` as for forces. An open structure has no stress
  (``get_stress`` raises ``PropertyNotImplementedError``, as for any ASE calculator without one).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .allocator import keep_freed_memory

MODES = ("sample", "map")

#: Extra result keys stored per structure (info) and per atom (arrays) by :func:`store_results`.
PER_STRUCTURE_KEYS = ("energy_std", "energy_var", "stress_std", "stress_var")
PER_ATOM_KEYS = ("forces_std", "forces_var")


class BlipCalculator(Calculator):
    """ASE calculator for a BLIP model: energy and forces plus their spread.

    model: a :class:`blip.predictor.BlipModel` or the path of a model file.
    samples: Monte-Carlo samples K per call (default: the model's ``uq.samples``; 0 = MAP).
    seed: noise seed. An int gives the same noise realisation on every call, so each
        sample (and the mean) is a smooth, conservative potential; None draws fresh noise
        on every call.
    device: "cpu" or "cuda".
    mode: "sample" (K samples) or "map" (one noise-free pass, the plain model's cost;
        std and var are zero). Can be changed later with ``calc.mode = ...``.
    dtype: None keeps the model's precision; "float64" runs a float64 copy of the model
        (use it for finite differences or long NVE runs: total energies of ~1e4 eV
        in float32 are only good to ~1 meV).
    map_pass: False skips the noise-free pass of "sample" mode: energy and forces are then the
        sample means and the spreads are about them (with it they are about the noise-free pass).

    Creating one keeps freed memory in the process (:func:`blip.allocator.keep_freed_memory`, as
    every ``blip`` command does: sampled passes reuse their large blocks instead of faulting them
    in again); the environment variable ``BLIP_KEEP_FREED_MEMORY=0`` turns that off.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model, samples: int | None = None, seed: int | None = None,
                 device: str = "cpu", mode: str = "sample", dtype: str | None = None, map_pass: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        keep_freed_memory()
        if isinstance(model, (str, Path)):
            from .io import load

            model = load(model, device=device)
        else:
            model = model.to(device)
        if dtype is not None:
            model = _with_dtype(model, dtype)
        self.model = model
        self.samples = model.default_samples if samples is None else int(samples)
        if self.samples < 0:
            raise ValueError("samples must be >= 0")
        self.seed = None if seed is None else int(seed)
        self._mode = _check_mode(mode)
        self.map_pass = bool(map_pass)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        value = _check_mode(value)
        if value != self._mode:
            self._mode = value
            self.reset()  # cached results belong to the other mode

    @property
    def effective_samples(self) -> int:
        """K used per call: 0 in MAP mode."""
        return 0 if self._mode == "map" else self.samples

    def check_atoms(self, atoms, source: str = "atoms") -> None:
        """Raise DataError if ``atoms`` holds an element the model was not trained on."""
        self.model.check_structures([atoms], source)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(np.any(self.atoms.pbc))
        out = self.model.predict([self.atoms], samples=self.effective_samples, seed=self.seed, stress=periodic,
                                 map_pass=self.map_pass)
        energy_std = float(out["energy_std"][0])
        forces_std = np.asarray(out["forces_std"][0], dtype=float)
        self.results = {
            "energy": float(out["energy"][0]),
            "free_energy": float(out["energy"][0]),
            "forces": np.asarray(out["forces"][0], dtype=float),
            "energy_std": energy_std,
            "forces_std": forces_std,
            "energy_var": energy_std ** 2,
            "forces_var": forces_std ** 2,
            "energy_samples": np.asarray(out["energy_samples"][:, 0], dtype=float),
            "forces_samples": np.asarray(out["forces_samples"][0], dtype=float),
        }
        if periodic:
            stress_std = np.asarray(out["stress_std"][0], dtype=float)
            self.results.update(stress=np.asarray(out["stress"][0], dtype=float), stress_std=stress_std,
                                stress_var=stress_std ** 2,
                                stress_samples=np.asarray(out["stress_samples"][:, 0], dtype=float))


def max_atom_force_std(forces_std: np.ndarray) -> float:
    """Largest per-atom force uncertainty, eV/A: ``max_i sqrt(sum_c std_ic**2)``.

    ``forces_std`` (n, 3) holds standard deviations per Cartesian component; the norm of
    an atom's std vector is the square root of the trace of its (diagonal) force covariance.
    """
    forces_std = np.asarray(forces_std, dtype=float)
    return float(np.linalg.norm(forces_std, axis=1).max()) if len(forces_std) else 0.0


def store_results(atoms, results: dict | None = None, prefix: str = "", samples: bool = False) -> None:
    """Copy the uncertainty results into ``atoms.info`` / ``atoms.arrays`` for extxyz.

    ``ase.io.write`` stores only standard properties (energy, forces) of an attached
    calculator; call this first to keep ``energy_std``, ``energy_var``, ``stress_std``,
    ``stress_var`` (info; the stress ones (6,), periodic structures only) and
    ``forces_std``, ``forces_var`` (arrays, (n, 3)) in the file. With ``samples=True`` also
    ``energy_samples`` (K,) in info and ``forces_samples`` as an (n, 3K) array whose column
    ``3k + c`` is component c of sample k. ``results`` defaults to ``atoms.calc.results``.
    """
    results = atoms.calc.results if results is None else results
    for key in PER_STRUCTURE_KEYS:
        if key in results:
            value = np.asarray(results[key], dtype=float)
            atoms.info[prefix + key] = float(value) if value.ndim == 0 else value
    for key in PER_ATOM_KEYS:
        if key in results:
            atoms.arrays[prefix + key] = np.asarray(results[key], dtype=float)
    if samples and "energy_samples" in results:
        atoms.info[prefix + "energy_samples"] = np.asarray(results["energy_samples"], dtype=float)
        fs = np.asarray(results["forces_samples"], dtype=float)  # (K, n, 3)
        atoms.arrays[prefix + "forces_samples"] = fs.transpose(1, 0, 2).reshape(len(atoms), -1)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _with_dtype(model, dtype: str):
    """A copy of ``model`` whose networks run in ``dtype`` ("float32" or "float64")."""
    import torch

    target = {"float32": torch.float32, "float64": torch.float64}.get(str(dtype))
    if target is None:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    if model.dtype == target:
        return model
    other = copy.copy(model)
    other.members = [copy.deepcopy(m).to(target) for m in model.members]
    return other
