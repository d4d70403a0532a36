"""Post-hoc recalibration of predicted standard deviations: one scale factor per target, and for
forces and energies an optional widening with the feature distance (``uq.novelty_widening``,
``uq.energy_novelty_widening``), faster beyond the validation range (``uq.novelty_beyond``,
``uq.energy_novelty_beyond``); for forces floors in quadrature, constant (``uq.force_std_floor``)
and per structure from its atoms' mean feature distance (``uq.structure_floor``)."""

from __future__ import annotations

import math

import numpy as np

from .mixture import factor_within, network_limit, network_shares

__all__ = ["fit_scale", "floored", "spread_floor", "floored_std", "unfloored_std", "apply_scale",
           "recalibrate", "fit_novelty_widening", "novelty_factor", "widens", "structure_floor", "has_structure_floor",
           "fit_structure_floor", "calibrated_std"]


def fit_scale(err, sigma, floor: float = 0.0) -> float:
    """Scale factor s minimising the Gaussian NLL of ``err`` under N(0, (s*sigma)^2).

    ``err`` are residuals (reference - prediction) and ``sigma`` predicted
    **standard deviations** in the same unit (eV or eV/Angstrom).  Closed
    form ``s = sqrt(mean((err/sigma)^2))`` over entries with sigma > 0; the
    result multiplies standard deviations (s^2 multiplies variances) and is
    dimensionless.  Returns 1.0 if no entry has sigma > 0 or if every
    residual is 0 (no information about the scale).

    With ``floor`` f > 0 (the unit of ``err``) the fit's spread is ``sqrt((s sigma)^2 + f^2)``
    (:func:`floored`; s by a one-dimensional search): residuals and spreads below about f, such
    as force components that are zero by symmetry and carry only rounding noise, then no longer
    steer s. The floor is part of the fit only; the factor returned multiplies sigma alone.
    """
    e = np.asarray(err, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if e.shape != s.shape:
        raise ValueError(f"residuals ({e.size}) and sigma ({s.size}) differ in length")
    keep = np.isfinite(e) & np.isfinite(s) & (s > 0)
    if not np.any(keep):
        return 1.0
    if floor > 0.0:
        return _fit_floored_scale(e[keep], s[keep], float(floor))
    z = e[keep] / s[keep]
    scale = math.sqrt(float(np.mean(z * z)))
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def floored(sigma, floor: float):
    """``sqrt(sigma^2 + floor^2)``: a spread with a floor added in quadrature (same unit)."""
    return np.sqrt(np.square(sigma) + floor * floor)


def _fit_floored_scale(err: np.ndarray, sigma: np.ndarray, floor: float) -> float:
    """:func:`fit_scale` with a floor: s of lowest NLL under N(0, (s sigma)^2 + floor^2), searched in
    log s around the closed form over the residuals above the floor (all of them if none is)."""
    from scipy.optimize import minimize_scalar

    from .metrics import nll

    if not np.any(err):
        return 1.0
    above = np.abs(err) > floor
    start = fit_scale(err[above], sigma[above]) if np.any(above) else fit_scale(err, sigma)
    result = minimize_scalar(lambda x: nll(err, floored(start * math.exp(x) * sigma, floor)),
                             bounds=(-15.0, 15.0), method="bounded")
    return float(start * math.exp(result.x))


def apply_scale(sigma, s: float):
    """Return standard deviations multiplied by ``s`` (variances would scale by s^2).

    Works on an array or on a list of arrays (e.g. per-structure forces_std
    of shape (n_i, 3)); inputs are not modified.
    """
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale factor must be a positive finite number, got {s}")
    if isinstance(sigma, (list, tuple)):
        return [np.asarray(x, dtype=np.float64) * s for x in sigma]
    return np.asarray(sigma, dtype=np.float64) * s


def recalibrate(model, structures, samples: int | None = None, seed: int = 0,
                progress: bool = False, source: str = "validation") -> dict:
    """Fit and store one standard-deviation factor per target (energy, forces; stress when every
    structure has a stress label) on labelled data.

    ``model`` is a :class:`blip.predictor.BlipModel`; its previous calibration is discarded.
    With ``uq.force_std: auto`` the force spread per atom or per component is chosen here: the one
    whose recalibrated Gaussian NLL on these structures is lower (``model.fitted_force_std``).
    With ``uq.novelty_widening`` (BLIP whose rate heads see features) each atom's force spread is
    also widened by ``exp(b (nu - nu_0))``, ``nu`` the atom's log feature distance from the training
    data (:meth:`blip.model.BayesianPotential.forward`), ``nu_0`` its mean over these structures
    (``forces_novelty`` b, ``novelty_centre``): a number is b itself (the force factor fitted with
    it), ``true`` fits ``b >= 0`` here with the force factor; with ``uq.novelty_widening_fit`` a
    number is the floor of b fitted here (b steeper where these structures show it, never flatter).
    ``uq.energy_novelty_widening`` does
    the same for each structure's energy spread with its atoms' largest ``nu`` (``energy_novelty``,
    ``energy_novelty_centre``). With the widening, ``uq.novelty_beyond`` / ``uq.energy_novelty_beyond``
    b2 > 0 add ``exp(b2 (nu - limit))`` beyond ``limit``, the largest ``nu`` of these structures
    (``forces_novelty_beyond``, ``novelty_limit``; ``energy_novelty_beyond``, ``energy_novelty_limit``).
    With ``uq.force_std_floor`` q > 0 the force spread is ``sqrt((s sigma)^2 + f^2)``, f = q x the
    force RMSE on these structures (eV/A), in these fits (:func:`fit_scale`'s ``floor``) and in every
    prediction after them (``forces_floor``), so that force residuals and spreads far below the
    typical error (components zero by symmetry, whose spread and error are rounding noise) do not
    steer s or b; ``uq.stress_std_floor`` does the same for stress (``stress_floor``, eV/A^3).
    With ``uq.structure_floor`` (``auto``: unless trained on periodic crystals,
    :func:`blip.build.uses_structure_floor`) each structure's force spreads then get a floor from the
    mean feature distance of its atoms (:func:`fit_structure_floor`), fitted last, with everything
    above in place, so that it can only widen them.
    Returns the factors, also stored in ``model.calibration``.
    """
    from ..build import uses_structure_floor
    from ..evaluate import evaluate_structures

    if model.mixture:
        return _recalibrate_mixture(model, structures, samples, seed, progress, source)
    model.calibration = {"energy": 1.0, "forces": 1.0}
    choose = model.config["uq"].get("force_std") == "auto"
    if choose:
        model.fitted_force_std = "component"  # the per-atom spread follows from the components'
    _, arrays = evaluate_structures(model, structures, samples=samples, seed=seed,
                                    progress=progress, source=source)
    floors = {target: spread_floor(model, arrays[target], target) for target in FLOORS if target in arrays}
    if choose and "forces" in arrays:
        model.fitted_force_std = choose_force_std(arrays["forces"], floors["forces"])
        if model.fitted_force_std == "atom":
            arrays["forces"] = {**arrays["forces"], "std": per_atom(arrays["forces"]["std"])}
    model.calibration = {q: fit_scale(arrays[q]["ref"] - arrays[q]["pred"], arrays[q]["std"], floors.get(q, 0.0))
                         for q in ("energy", "forces", "stress") if q in arrays}
    model.calibration.update({FLOORS[q][1]: f for q, f in floors.items() if f > 0.0})
    for target, key in WIDENING_SETTINGS.items():
        a, widening = arrays.get(target, {}), model.config["uq"].get(key)
        if widening and "novelty" in a:
            beyond = model.config["uq"].get(BEYOND_SETTINGS[target]) or 0.0
            fit_above = target in FIT_ABOVE_SETTINGS and bool(model.config["uq"].get(FIT_ABOVE_SETTINGS[target]))
            model.calibration.update(_widening(a, widening, target, float(beyond), fit_above, floors.get(target, 0.0)))
    forces = arrays.get("forces", {})
    if uses_structure_floor(model.config, model.summary) and "mean_novelty" in forces:
        calibrated = calibrated_std(forces, model.calibration, "forces")  # no structure floor yet
        model.calibration.update(fit_structure_floor(forces["ref"] - forces["pred"], calibrated,
                                                     forces["mean_novelty"]))
    return dict(model.calibration)


def _recalibrate_mixture(model, structures, samples, seed, progress, source) -> dict:
    """:func:`recalibrate` for a model of several sampled networks: each network as a model of its
    own (its share of the K samples, seed + m, as predict runs it), stored under ``"networks"``
    (with its chosen force spread, ``force_std``); then one factor per target of the mixture. On
    these structures every atom lies within the networks' distances (the mean of the networks'
    distances is at most the mean of their largest), so the factor applies to all of them."""
    from ..evaluate import evaluate_structures

    k = model.default_samples if samples is None else int(samples)
    per_network = []
    for m, (net, share) in enumerate(zip(model.networks(), network_shares(k, len(model.members)))):
        factors = recalibrate(net, structures, share, seed + m, progress, source)
        per_network.append({**factors, **({"force_std": net.fitted_force_std} if net.fitted_force_std else {})})
    model.calibration = {"energy": 1.0, "forces": 1.0, "networks": per_network}
    _, arrays = evaluate_structures(model, structures, samples=k, seed=seed, progress=progress, source=source)
    model.calibration.update({q: fit_scale(arrays[q]["ref"] - arrays[q]["pred"], arrays[q]["std"])
                              for q in ("energy", "forces", "stress") if q in arrays})
    return dict(model.calibration)


def uncalibrated(calibration: dict) -> dict:
    """The calibration of raw spreads (factors 1) that keeps a mixture's networks' own calibrations."""
    return {"energy": 1.0, "forces": 1.0, **({"networks": calibration["networks"]} if "networks" in calibration else {})}


def calibrated_std(a: dict, calibration: dict, target: str) -> np.ndarray:
    """The calibrated spread of flat ``{"std", ["novelty", "mean_novelty"]}`` arrays of ``target``
    ("energy" or "forces"; raw spreads): its factor, the widening with the feature distance where
    the calibration has one, and (forces) the floors in quadrature, as ``predict`` applies them."""
    factor = calibration.get(target, 1.0)
    if "networks" in calibration:  # a mixture's factor: only within its networks' validation distances
        factor = factor_within(factor, a.get("novelty"), network_limit(calibration, target))
    std = a["std"] * factor * novelty_factor(a.get("novelty"), calibration, target)
    return floored_std(std, calibration, target, a.get("mean_novelty"))


def spread_floor(model, arrays: dict, target: str = "forces") -> float:
    """The floor f of ``target``'s spread ("forces": eV/A, "stress": eV/A^3): its ``uq`` setting
    (:data:`FLOORS`) times the RMSE of flat ``{"ref", "pred", "std"}`` arrays; 0 where the model
    has no spread (nothing to floor)."""
    fraction = float(model.config["uq"].get(FLOORS[target][0]) or 0.0)
    if fraction <= 0.0 or not np.any(np.asarray(arrays["std"]) > 0):
        return 0.0
    err = np.asarray(arrays["ref"], dtype=np.float64) - np.asarray(arrays["pred"], dtype=np.float64)
    return fraction * math.sqrt(float(np.mean(err * err)))


#: Target -> (the ``uq`` setting of its spread's floor, a fraction of the RMSE; the calibration key
#: of the floor in the target's unit), added in quadrature (:func:`floored_std`).
FLOORS = {"forces": ("force_std_floor", "forces_floor"), "stress": ("stress_std_floor", "stress_floor")}
#: Target -> the ``uq`` setting of its widening (true: fit b; a number: b; false: none).
WIDENING_SETTINGS = {"forces": "novelty_widening", "energy": "energy_novelty_widening"}
#: Target -> the ``uq`` setting that fits b on the validation split above a set b (which is then its floor).
FIT_ABOVE_SETTINGS = {"forces": "novelty_widening_fit"}
#: Target -> calibration keys of its widening: (b, centre).
NOVELTY_KEYS = {"forces": ("forces_novelty", "novelty_centre"),
                "energy": ("energy_novelty", "energy_novelty_centre")}
#: Target -> the ``uq`` setting of the extra widening beyond the validation range (b2; false: none).
BEYOND_SETTINGS = {"forces": "novelty_beyond", "energy": "energy_novelty_beyond"}
#: Target -> calibration keys of that extra widening: (b2, limit: the largest distance on validation).
BEYOND_KEYS = {"forces": ("forces_novelty_beyond", "novelty_limit"),
               "energy": ("energy_novelty_beyond", "energy_novelty_limit")}
#: The ``uq`` settings :func:`recalibrate` reads (``blip calibrate --set`` may change these and no others).
SETTINGS = ("force_std", "structure_floor", *(setting for setting, _ in FLOORS.values()), *WIDENING_SETTINGS.values(),
            *FIT_ABOVE_SETTINGS.values(), *BEYOND_SETTINGS.values())


def with_settings(cfg: dict, overrides: list[str]) -> dict:
    """``cfg`` (a model's resolved config) with ``uq.KEY=VALUE`` overrides of the :data:`SETTINGS`
    (validated as ``blip train --set`` validates them); any other key raises ConfigError: a
    trained model can be recalibrated under other settings, not retrained."""
    import copy

    from ..config import resolve
    from ..errors import ConfigError

    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not (key.startswith("uq.") and key[3:] in SETTINGS):
            raise ConfigError(f"--set changes recalibration settings only (uq.{', uq.'.join(SETTINGS)}); "
                              f"got {key!r}")
    resolved = resolve(copy.deepcopy(cfg), list(overrides))
    return {**cfg, "uq": {**cfg["uq"], **{key: resolved["uq"][key] for key in SETTINGS if key in resolved["uq"]}}}


def _widening(a: dict, setting, target: str, beyond: float = 0.0, fit_above: bool = False,
              floor: float = 0.0) -> dict:
    """Calibration entries (factor, b, centre; with ``beyond`` > 0 also b2 and the limit) of
    ``target``'s widening from its flat ``{"ref", "pred", "std", "novelty"}`` arrays: ``setting``
    true fits b >= 0, a number is b (the factor fitted with it); with ``fit_above`` a number is
    the lowest b of a fitted b. The limit is the largest distance of these entries, so the extra
    widening beyond it leaves the factor's fit unchanged. ``floor``: of the fit (:func:`fit_scale`)."""
    err = a["ref"] - a["pred"]
    centre = float(np.mean(a["novelty"]))
    if setting is True or fit_above:
        b_min = 0.0 if setting is True else float(setting)
        scale, b = fit_novelty_widening(err, a["std"], a["novelty"] - centre, b_min=b_min, floor=floor)
    else:
        b = float(setting)
        scale = fit_scale(err, a["std"] * np.exp(b * (a["novelty"] - centre)), floor)
    b_key, centre_key = NOVELTY_KEYS[target]
    out = {target: scale, b_key: b, centre_key: centre}
    if beyond > 0.0:
        b2_key, limit_key = BEYOND_KEYS[target]
        out.update({b2_key: beyond, limit_key: float(np.max(a["novelty"]))})
    return out


def _floor_of(calibration: dict, target: str) -> float:
    """The calibration's floor of ``target``'s spread (:data:`FLOORS`); 0 without one."""
    return float(calibration.get(FLOORS[target][1], 0.0)) if target in FLOORS else 0.0


def _floor_squared(calibration: dict, target: str, mean_novelty) -> float | np.ndarray:
    """The squared floor of ``target``'s spread: the constant one, plus for forces the structure
    floor (:func:`structure_floor`) where ``mean_novelty`` is given (a number or an array)."""
    square = _floor_of(calibration, target) ** 2
    if target == "forces" and mean_novelty is not None and has_structure_floor(calibration):
        square = square + np.square(structure_floor(mean_novelty, calibration))
    return square


def floored_std(std, calibration: dict, target: str = "forces", mean_novelty=None):
    """Spreads of ``target`` ("forces", "stress"; any shape) with the calibration's floor of that
    target added in quadrature (unchanged without one, e.g. in model files from before it).
    ``mean_novelty``: the mean log feature distance of the atoms of each entry's structure (a number
    for one structure's spreads, else an array broadcasting with ``std``); forces then also get the
    calibration's structure floor (:func:`structure_floor`)."""
    square = _floor_squared(calibration, target, mean_novelty)
    return np.sqrt(np.square(std) + square) if np.any(square > 0.0) else std


def unfloored_std(std, calibration: dict, target: str = "forces", mean_novelty=None):
    """The inverse of :func:`floored_std`: ``sqrt(max(std^2 - floor^2, 0))``."""
    square = _floor_squared(calibration, target, mean_novelty)
    return np.sqrt(np.maximum(np.square(std) - square, 0.0)) if np.any(square > 0.0) else std


#: Calibration keys of the structure floor: c (eV/A), b, centre and limit of the mean distance.
STRUCTURE_FLOOR_KEYS = ("forces_structure_floor", "structure_floor_novelty", "structure_floor_centre",
                        "structure_floor_limit")


def has_structure_floor(calibration: dict) -> bool:
    """Whether ``calibration`` holds a structure floor (c > 0; :func:`structure_floor`)."""
    return float(calibration.get(STRUCTURE_FLOOR_KEYS[0], 0.0)) > 0.0


def structure_floor(mean_novelty, calibration: dict):
    """The force-spread floor of a structure (eV/A; the shape of ``mean_novelty``):
    ``c exp(b (min(m, limit) - centre))``, m the mean log feature distance of its atoms; it grows
    with m up to the largest m of the validation split (``limit``) and no further, so far out the
    spread is the model's own. 0 without the calibration's keys (:data:`STRUCTURE_FLOOR_KEYS`)."""
    c_key, b_key, centre_key, limit_key = STRUCTURE_FLOOR_KEYS
    if not has_structure_floor(calibration):
        return np.zeros_like(np.asarray(mean_novelty, dtype=np.float64))
    m = np.minimum(np.asarray(mean_novelty, dtype=np.float64), float(calibration[limit_key]))
    return float(calibration[c_key]) * np.exp(float(calibration[b_key]) * (m - float(calibration[centre_key])))


def fit_structure_floor(err, calibrated_std, mean_novelty) -> dict:
    """The structure floor (:func:`structure_floor`) of lowest Gaussian NLL of force residuals ``err``
    (eV/A) under ``sqrt(calibrated_std^2 + floor^2)``; flat arrays, ``calibrated_std`` the spreads
    with every other part of the recalibration in place, ``mean_novelty`` each entry's structure's
    mean log feature distance. c >= 0 and b >= 0: the floor only adds to the spread, and more for
    structures whose atoms lie farther from the training data. Returns its calibration entries
    (:data:`STRUCTURE_FLOOR_KEYS`; c = 0 where no floor lowers the NLL)."""
    from scipy.optimize import minimize

    from .metrics import nll

    err, std, m = (np.asarray(a, dtype=np.float64).ravel() for a in (err, calibrated_std, mean_novelty))
    centre, limit = float(np.mean(m)), float(np.max(m))
    base = nll(err, std)
    scale = float(np.sqrt(np.mean(err * err))) or 1.0

    def score(x):  # x: log(c / scale), b
        return nll(err, np.sqrt(std * std + (scale * np.exp(x[0] + x[1] * (m - centre))) ** 2))

    best = None
    for start in (-3.0, -1.0):  # from a small and a moderate floor
        result = minimize(score, [start, 0.5], method="L-BFGS-B", bounds=[(-30.0, 5.0), (0.0, 10.0)])
        if best is None or result.fun < best.fun:
            best = result
    c, b = (scale * float(np.exp(best.x[0])), float(best.x[1])) if best.fun < base else (0.0, 0.0)
    return dict(zip(STRUCTURE_FLOOR_KEYS, (c, b, centre, limit)))


def widens(calibration: dict, target: str) -> bool:
    """Whether ``calibration`` widens ``target``'s spread with the feature distance."""
    return any(float(calibration.get(keys[0], 0.0)) > 0.0 for keys in (NOVELTY_KEYS[target], BEYOND_KEYS[target]))


def widening_formula(b: float, centre: float, variable: str = "novelty") -> str:
    """The widening ``exp(b (variable - centre))`` as text, e.g. ``exp(0.1 (novelty + 1.12))``."""
    return f"exp({b:.3g} ({variable} {'-' if centre >= 0 else '+'} {abs(centre):.3g}))"


def novelty_factor(novelty, calibration: dict, target: str = "forces"):
    """The spread's widening ``exp(b (novelty - centre) + b2 max(0, novelty - limit))`` (array of
    ``novelty``'s shape) of ``target`` (keys :data:`NOVELTY_KEYS` and :data:`BEYOND_KEYS`, e.g.
    ``forces_novelty`` b, ``novelty_centre``, ``forces_novelty_beyond`` b2, ``novelty_limit``); 1.0
    where b and b2 are 0 or absent or ``novelty`` is None."""
    if not widens(calibration, target) or novelty is None:
        return 1.0
    (b_key, centre_key), (b2_key, limit_key) = NOVELTY_KEYS[target], BEYOND_KEYS[target]
    nu = np.asarray(novelty, dtype=np.float64)
    exponent = float(calibration.get(b_key, 0.0)) * (nu - float(calibration.get(centre_key, 0.0)))
    b2 = float(calibration.get(b2_key, 0.0))
    if b2 > 0.0:
        exponent = exponent + b2 * np.maximum(0.0, nu - float(calibration.get(limit_key, np.inf)))
    return np.exp(exponent)


def fit_novelty_widening(err, sigma, novelty, b_min: float = 0.0, floor: float = 0.0) -> tuple[float, float]:
    """``(s, b)`` with ``b >= b_min`` of the spread ``s sigma exp(b novelty)`` of lowest Gaussian NLL
    on residuals ``err``; flat arrays, ``novelty`` centred (each atom's log feature distance minus
    its mean). ``b = b_min = 0`` is the plain scale: b grows only where the errors grow with the
    distance faster than sigma does, and the spread then keeps growing with it out of distribution.
    ``floor``: added in quadrature in the fit only, as in :func:`fit_scale`."""
    from scipy.optimize import minimize

    from .metrics import nll

    err, sigma, novelty = (np.asarray(a, dtype=np.float64) for a in (err, sigma, novelty))
    s0 = fit_scale(err, sigma, floor)
    result = minimize(lambda x: nll(err, floored(s0 * np.exp(x[0] + x[1] * novelty) * sigma, floor)),
                      [0.0, float(b_min)], method="L-BFGS-B", bounds=[(None, None), (float(b_min), None)])
    return float(s0 * np.exp(result.x[0])), float(result.x[1])


def per_atom(component_std: np.ndarray) -> np.ndarray:
    """Flat per-component force stds (3 n,) -> each atom's root mean square, repeated (3 n,)."""
    from ..predictor import atom_force_std

    return atom_force_std(np.asarray(component_std, dtype=np.float64).reshape(-1, 3)).ravel()


def choose_force_std(forces: dict, floor: float = 0.0) -> str:
    """"atom" or "component": the force spread of lower Gaussian NLL after its own scale factor, from
    flat ``{"ref", "pred", "std"}`` arrays with per-component ``std`` ("component" on a tie);
    ``floor``: of the fit and of this comparison (:func:`fit_scale`)."""
    from .metrics import nll

    err = forces["ref"] - forces["pred"]
    scores = {}
    for kind, std in (("component", forces["std"]), ("atom", per_atom(forces["std"]))):
        value = nll(err, floored(fit_scale(err, std, floor) * std, floor))
        scores[kind] = math.inf if value is None or not math.isfinite(value) else value
    return "atom" if scores["atom"] < scores["component"] else "component"
