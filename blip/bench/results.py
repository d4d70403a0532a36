"""Write ``results.json``, ``results.md`` and the plots of a ``blip bench`` run.

Units in results.json: eV (energies per structure), eV/atom, eV/Angstrom (force
components), seconds; NLL in nats. results.md shows meV and meV/Å.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import report
from .._files import write_text_atomic
from .runner import recalibrated_std

# (raw key, recalibrated key or None, header) of the per-test-set tables
TABLE = (
    ("energy_rmse", None, "E RMSE [meV]"),
    ("forces_rmse", None, "F RMSE [meV/Å]"),
    ("nll", "nll_recal", "NLL"),
    ("miscalibration_area", "miscalibration_area_recal", "miscal. area"),
    ("ence", "ence_recal", "ENCE"),
    ("spearman", "spearman_recal", "Spearman"),
    ("coverage_95", "coverage_95_recal", "cov. 95%"),
    ("sigma_ratio", "sigma_ratio_recal", "σ ratio"),
    ("train_seconds", None, "train [s]"),
    ("predict_cost_ratio", None, "predict cost [×MAP]"),
)
_MILLI = {"energy_rmse", "forces_rmse"}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


#: Row fields that identify a (experiment, method, test set); everything numeric else is averaged.
GROUP_KEYS = ("protocol", "experiment", "method", "test_set")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (experiment, method, test set): mean over seeds of every number, ``KEY_std`` its
    standard deviation over seeds (ddof=1; 0 for one seed), ``n_seeds``. Other fields: first seed's."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    summary = []
    for members in groups.values():
        out = {k: v for k, v in members[0].items() if k != "seed"}
        for key, value in members[0].items():
            if key == "seed" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            values = [m.get(key) for m in members]
            if any(v is None or not math.isfinite(float(v)) for v in values):
                out[key], out[f"{key}_std"] = None, None
                continue
            arr = np.asarray(values, dtype=float)
            same_int = isinstance(value, int) and all(v == value for v in values)  # sizes, counts
            out[key] = value if same_int else float(arr.mean())
            out[f"{key}_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        out["n_seeds"] = len(members)
        out["seeds"] = [m.get("seed") for m in members]
        summary.append(out)
    return summary


def write_json(out: Path, rows: list[dict], settings: dict, summary: list[dict] | None = None) -> Path:
    path = out / "results.json"
    data = {"rows": rows, "summary": summary if summary is not None else summarise(rows), "settings": settings}
    write_text_atomic(path, json.dumps(_json_safe(data), indent=1))
    return path


def _number(key: str, v: float) -> str:
    v = float(v) * (1000.0 if key in _MILLI else 1.0)
    if key == "train_seconds":
        return f"{v:.0f}"
    if key in ("predict_cost_ratio", "sigma_ratio", "sigma_ratio_recal"):
        return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _cell(row: dict, key: str) -> str:
    """A number as shown in results.md (meV for RMSEs), with ' ± std' over seeds when there are several."""
    v = row.get(key)
    if v is None:
        return "–"
    text = _number(key, v)
    spread = row.get(f"{key}_std")
    if row.get("n_seeds", 1) > 1 and spread is not None:
        text += f" ± {_number(key, spread)}"
    return text


def table(rows: list[dict]) -> str:
    """Markdown table of the rows of one test set; 'a → b' = before → after recalibration."""
    head = "| method | " + " | ".join(h for _, _, h in TABLE) + " |"
    lines = [head, "|---|" + "---:|" * len(TABLE)]
    for r in rows:
        cells = []
        for raw, recal, _ in TABLE:
            c = _cell(r, raw)
            if recal is not None and r.get(raw) is not None and _cell(r, recal) != c:
                c = f"{c} → {_cell(r, recal)}"
            cells.append(c)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curve_table(rows: list[dict], key: str, test_set: str) -> str:
    sizes = sorted({r["n_train"] for r in rows if r["test_set"] == test_set})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for m in methods:
        by_n = {r["n_train"]: r for r in rows if r["method"] == m and r["test_set"] == test_set}
        lines.append(f"| {m} | " + " | ".join(_cell(by_n[n], key) if n in by_n else "" for n in sizes) + " |")
    return "\n".join(lines)


_LEGEND = (
    "Columns: RMSE of energies per structure and of force components of each method's mean "
    "prediction (the noise-free MAP pass for blip and mc_dropout with uq.predict_mean: map, the default; "
    "the member mean for the ensemble); NLL "
    "(nats; Gaussian, per force component with σ in eV/Å, or per structure energy in eV for "
    "energy-only sets), miscalibration area, ENCE, Spearman rank "
    "correlation of |error| with σ and the coverage of the central 95% interval, all on the "
    "target named in each heading. 'a → b': before → after recalibration (one σ factor per "
    "target fitted on the validation split, and where b > 0 each atom's force σ, or each "
    "structure's energy σ, also times exp(b (novelty - centre)), uq.novelty_widening and "
    "uq.energy_novelty_widening, and beyond the validation split's largest novelty times "
    "exp(b2 (novelty - that largest)), uq.novelty_beyond and uq.energy_novelty_beyond; force σ "
    "with a floor f added in quadrature, f a fraction of the validation force RMSE, uq.force_std_floor, and a "
    "floor per structure from its atoms' mean novelty, uq.structure_floor; a single "
    "figure: the same before and after). σ ratio: mean σ on this test set over mean σ on the "
    "in-distribution reference test set "
    "of the experiment. train: wall seconds "
    "of all networks of the method (an ensemble trains all its members). predict cost: wall "
    "time of predict with uncertainty (default samples; all members for the ensemble) over "
    "one network's MAP predict (the deterministic model's; in a run without one, the first "
    "method's first network: cost_reference in results.json) on the same structures (the first {n} "
    "of the first test set), same process and threads; median of {repeats} alternating timings. "
    "'–': undefined (no σ).")


def write_markdown(out: Path, protocol: str, description: str, rows: list[dict], settings: dict,
                   tests: dict, plots: list[Path]) -> Path:
    s = settings
    lines = [f"# blip bench {protocol}", "", description, "",
             f"* budget: {s['budget']['statement']}",
             f"* backbone: {s['model']}",
             f"* uq: {s['uq']}",
             f"* training: {s['training']}",
             f"* split: {s['protocol_settings'].get('split', '')}",
             f"* data: `{s['data_dir']}`; seeds {', '.join(map(str, s.get('seeds', [s['seed']])))}"
             f"{' (tables: mean ± standard deviation over seeds)' if len(s.get('seeds', [])) > 1 else ''}; "
             f"{'QUICK smoke-test settings' if s['quick'] else 'full settings'}",
             f"* machine: {s['machine']['cpu_count']} CPU cores, torch threads {s['machine']['torch_threads']}; "
             f"wall time {s['wall_seconds'] / 60:.1f} min" + ("" if s["complete"] else " (INCOMPLETE run)"),
             ""]
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    if s["protocol_settings"].get("learning_curve"):
        test_names = list(dict.fromkeys(r["test_set"] for r in rows))
        lines += ["## Learning curves", ""]
        for t in test_names:
            sub = [r for r in rows if r["test_set"] == t]
            for key, what in (("forces_rmse", "force RMSE [meV/Å]"), ("energy_rmse", "energy RMSE [meV]"),
                              ("forces_nll", "force NLL before recalibration [nats]"),
                              ("forces_nll_recal", "force NLL after recalibration [nats]"),
                              ("forces_miscalibration_area_recal", "force miscalibration area after "
                                                                   "recalibration"),
                              ("forces_spearman", "Spearman(|error|, σ), forces")):
                lines += [f"**{t}: {what}**", "", learning_curve_table(sub, key, t), ""]
    for exp in experiments:
        if exp:
            lines += [f"## {exp}", ""]
        for t in list(dict.fromkeys(r["test_set"] for r in rows if r["experiment"] == exp)):
            sub = [r for r in rows if r["experiment"] == exp and r["test_set"] == t]
            target = sub[0]["uq_target"]
            n = sub[0]["n_structures"]
            desc = tests.get(t, {}).get("description", "")
            what = "force components" if target == "forces" else "energies (no force labels)"
            lines += [f"{'###' if exp else '##'} {t}: {desc}", "",
                      f"{n} structures; uncertainty scored on {what}.", "", table(sub), ""]
    lines += [_LEGEND.format(**s["timing"]), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path = out / "results.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def write_plots(out: Path, experiments: list, scored: dict, rows: list[dict],
                learning_curve: bool = False) -> list[Path]:
    """Calibration curves per test set with forces, σ along paths, learning curves."""
    plots_dir = out / "plots"
    written: list[Path] = []
    for exp in experiments:
        tag = exp.name.replace("=", "") + "_" if exp.name else ""
        for test in exp.tests:
            keyed = {m.name: scored.get((exp.name, m.name, test.name)) for m in exp.methods}
            keyed = {k: v for k, v in keyed.items() if v is not None}
            if not keyed:
                continue
            target = "forces" if all("forces" in v.arrays for v in keyed.values()) else "energy"
            before, after = {}, {}
            for name, sc in keyed.items():
                a = sc.arrays.get(target)
                if a is None or not np.any(a["std"] > 0):
                    continue
                err = a["ref"] - a["pred"]
                before[name] = (err, a["std"])
                after[name] = (err, recalibrated_std(a, target, sc.scales))
            if before:
                written.append(report.calibration_plot(
                    before, None, plots_dir / f"{tag}{test.name}_calibration.png", quantity=target))
                written.append(report.calibration_plot(
                    {f"{k} (recal.)": v for k, v in after.items()}, None,
                    plots_dir / f"{tag}{test.name}_calibration_recal.png", quantity=target))
            if test.coordinate is not None and all("energy" in v.arrays for v in keyed.values()):
                ref = next(iter(keyed.values())).arrays["energy"]["ref"]
                series = {k: (v.arrays["energy"]["pred"], v.arrays["energy"]["std"] * v.scales.get("energy", 1.0))
                          for k, v in keyed.items()}
                written.append(report.path_plot(
                    test.coordinate, ref, series, plots_dir / f"{tag}{test.name}_path.png",
                    xlabel=test.coordinate_label or "path coordinate",
                    title=f"{test.name}: energy and σ (after recalibration) along the path"))
    if learning_curve:
        written += _learning_curves(plots_dir, rows)
    return written


def _learning_curves(plots_dir: Path, rows: list[dict]) -> list[Path]:
    written = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for t in dict.fromkeys(r["test_set"] for r in rows):
        sub = [r for r in rows if r["test_set"] == t]
        sizes = sorted({r["n_train"] for r in sub})

        def series(key, scale=1.0):
            out = {}
            for m in methods:
                by_n = {r["n_train"]: r.get(key) for r in sub if r["method"] == m}
                out[m] = [None if by_n.get(n) is None else scale * by_n[n] for n in sizes]
            return out

        specs = (
            ("forces_rmse", 1000.0, "force RMSE [meV/Å]", True, None),
            ("energy_rmse", 1000.0, "energy RMSE [meV]", True, None),
            ("forces_nll_recal", 1.0, "force NLL after recalibration [nats]", False, None),
            ("forces_miscalibration_area", 1.0, "force miscalibration area (before recal.)", False, 0.0),
            ("forces_miscalibration_area_recal", 1.0, "force miscalibration area (after recal.)", False, 0.0),
            ("forces_spearman", 1.0, "Spearman(|error|, σ), forces", False, None),
            ("forces_coverage_95_recal", 1.0, "95% coverage after recalibration, forces", False, 0.95),
        )
        for key, scale, label, logy, ideal in specs:
            values = series(key, scale)
            if all(v is None for vs in values.values() for v in vs):
                continue  # e.g. uncertainty metrics of a run of the plain model only
            written.append(report.learning_curve_plot(
                sizes, values, plots_dir / f"{t}_{key}_vs_N.png", label,
                title=f"{t}: {label}", logy=logy, ideal=ideal))
    return written
