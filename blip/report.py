"""Evaluation plots (PNG) and tables for ``blip evaluate``.

Plots are drawn with :class:`matplotlib.figure.Figure` directly (Agg
canvas), so importing this module never touches pyplot state or needs a
display.  All ``std``/``sigma`` arguments are predicted **standard
deviations** (not variances) in the unit of the quantity: eV for energies,
eV/atom for energies per atom, eV/Angstrom for force components.  Residuals
are ``reference - prediction``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from blip._files import atomic_path, write_text_atomic
from blip.uq import metrics as M
from blip.uq.recalibration import novelty_factor, unfloored_std

__all__ = [
    "UNITS",
    "parity_plot",
    "calibration_plot",
    "rmse_rmv_plot",
    "error_sigma_plot",
    "write_report",
    "format_table",
    "markdown_table",
]

#: Unit of each scored quantity.
UNITS = {"energy": "eV", "energy_per_atom": "eV/atom", "forces": "eV/Å"}
_NAMES = {"energy": "Energy", "energy_per_atom": "Energy per atom", "forces": "Force component"}
_ROWS = ("energy", "energy_per_atom", "forces")
#: (JSON key, short column header) for the printed table.
_COLUMNS = (
    ("n", "n"), ("rmse", "rmse"), ("mae", "mae"), ("nll", "nll"),
    ("miscalibration_area", "miscal_area"), ("ence", "ence"), ("spearman", "spearman"),
    ("coverage_68", "cov_68"), ("coverage_95", "cov_95"), ("sharpness", "sharpness"),
    ("crps", "crps"),
)
_DPI = 130


def _new_figure(size=(5.2, 4.6)):
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> Path:
    """Write the PNG via a temporary file so no half-written plot is left behind."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
    return Path(path)


def _subsample(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _loglog(ax) -> None:
    """Switch both axes to log scale (call :func:`_log_ticks` once limits are final)."""
    ax.set_xscale("log")
    ax.set_yscale("log")


def _log_ticks(ax) -> None:
    """Readable log ticks: plain numbers, and 2x/5x minor labels only over <= 2 decades."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        axis.set_major_formatter(plain)
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        few = lim[0] > 0 and np.log10(lim[1] / lim[0]) <= 2.0
        axis.set_minor_formatter(plain if few else NullFormatter())


def _label(quantity: str, unit: str | None) -> tuple[str, str]:
    return _NAMES.get(quantity, quantity), unit or UNITS.get(quantity, "")


def parity_plot(ref, pred, std, path, quantity: str = "energy", unit: str | None = None,
                max_points: int | None = 2000, seed: int = 0) -> Path:
    """Predicted vs reference values with ±1 standard deviation error bars.

    ``std`` (standard deviations, or ``None``) is drawn as vertical error bars
    when any is > 0.  At most ``max_points`` randomly chosen points are drawn
    (reproducible with ``seed``); RMSE and MAE in the title use all points.
    ``unit`` defaults to eV / eV/atom / eV/Å from ``quantity``.
    """
    ref = np.asarray(ref, dtype=float).ravel()
    pred = np.asarray(pred, dtype=float).ravel()
    std = np.zeros_like(pred) if std is None else np.asarray(std, dtype=float).ravel()
    name, unit = _label(quantity, unit)
    err = ref - pred
    idx = _subsample(ref.size, max_points, seed)
    fig, ax = _new_figure()
    if np.any(std[idx] > 0):
        ax.errorbar(ref[idx], pred[idx], yerr=std[idx], fmt="o", ms=2.5, lw=0, elinewidth=0.6,
                    alpha=0.6, color="tab:blue", ecolor="tab:gray", label="prediction ± 1σ")
    else:
        ax.plot(ref[idx], pred[idx], "o", ms=2.5, alpha=0.6, color="tab:blue",
                label="prediction (no σ)")
    if ref.size:
        lo = float(min(ref.min(), pred.min()))
        hi = float(max(ref.max(), pred.max()))
        pad = 0.03 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"reference {name.lower()} [{unit}]")
    ax.set_ylabel(f"predicted {name.lower()} [{unit}]")
    shown = "" if idx.size == ref.size else f"\n{idx.size} of {ref.size} points shown"
    rmse = float(np.sqrt(np.mean(err ** 2))) if err.size else float("nan")
    mae = float(np.mean(np.abs(err))) if err.size else float("nan")
    ax.set_title(f"{name} parity: RMSE {rmse:.4g}, MAE {mae:.4g} {unit}{shown}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _series(err, sigma, label, extra) -> dict:
    if isinstance(err, dict):
        out = dict(err)
    else:
        out = {label: (err, sigma)}
    out.update(extra or {})
    return out


def calibration_plot(err, sigma, path, label: str = "model", extra: dict | None = None,
                     quantity: str | None = None) -> Path:
    """Observed vs expected coverage of central Gaussian intervals, with the ideal diagonal.

    ``err``/``sigma``: residuals and predicted standard deviations of one
    series called ``label``.  Several series (e.g. before/after
    recalibration) are drawn together either by passing ``err`` as a dict
    ``{label: (err, sigma)}`` (``sigma`` is then ignored) or via ``extra``
    (same form, added after the first).  The legend gives each series'
    miscalibration area; series with all sigma == 0 are skipped.
    """
    series = _series(err, sigma, label, extra)
    fig, ax = _new_figure((4.8, 4.6))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, (name, (e, s)) in enumerate(series.items()):
        area = M.miscalibration_area(e, s)
        if area is None:
            continue
        exp, obs = M.calibration_curve(e, s)
        c = colors[i % len(colors)]
        ax.plot(exp, obs, "-", color=c, lw=1.8, label=f"{name} (area {area:.3f})")
        if i == 0:
            ax.fill_between(exp, exp, obs, color=c, alpha=0.15)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("expected proportion in central Gaussian interval")
    ax.set_ylabel("observed proportion")
    what = f"{_NAMES.get(quantity, quantity)} calibration" if quantity else "Calibration"
    ax.set_title(f"{what}\n(below diagonal: overconfident)", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def rmse_rmv_plot(err, sigma, path, n_bins: int | None = None, quantity: str | None = None,
                  unit: str | None = None) -> Path:
    """Reliability diagram: RMSE vs RMV (root mean variance, a std) in equal-count sigma bins.

    Log-log axes with the ideal y = x line; ``n_bins`` defaults to
    :func:`blip.uq.metrics.default_n_bins` (min(10, n // 30), at least 1).
    Bins with a zero value cannot be shown on log axes and are left out.
    """
    rmv, rmse, counts = M.rmse_vs_rmv(err, sigma, n_bins)
    name, unit = _label(quantity or "", unit)
    ence = M.ence(err, sigma, n_bins)
    ok = (rmv > 0) & (rmse > 0)
    fig, ax = _new_figure((4.8, 4.6))
    if np.any(ok):
        lo = float(min(rmv[ok].min(), rmse[ok].min())) / 1.5
        hi = float(max(rmv[ok].max(), rmse[ok].max())) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="ideal (RMSE = RMV)")
        ax.plot(rmv[ok], rmse[ok], "o-", color="tab:blue", ms=5,
                label=f"{ok.sum()} bins, ~{int(np.median(counts))} points each")
        _loglog(ax)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no bin with RMV > 0 and RMSE > 0", ha="center",
                transform=ax.transAxes)
    u = f" [{unit}]" if unit else ""
    ax.set_xlabel(f"RMV = sqrt(mean σ²) in bin{u}")
    ax.set_ylabel(f"RMSE in bin{u}")
    e_txt = "-" if ence is None else f"{ence:.3f}"
    ax.set_title(f"{name + ' ' if name else ''}RMSE vs RMV (ENCE {e_txt})\n(above diagonal: overconfident)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_xscale() == "log":
        _log_ticks(ax)
    return _save(fig, path)


def error_sigma_plot(err, sigma, path, quantity: str | None = None, unit: str | None = None,
                     max_points: int | None = 5000, seed: int = 0) -> Path:
    """Scatter of |error| vs predicted standard deviation (log-log) with |e| = σ and |e| = 2σ lines.

    The legend gives the fraction of all points (not only those drawn) above
    each line (ideal Gaussian: 31.7 % and 4.6 %).  Points with sigma == 0 or
    |error| == 0 cannot be drawn on log axes and are left out.
    """
    e = np.abs(np.asarray(err, dtype=float).ravel())
    s = np.asarray(sigma, dtype=float).ravel()
    name, unit = _label(quantity or "", unit)
    fig, ax = _new_figure((4.8, 4.6))
    drawable = np.flatnonzero((s > 0) & (e > 0))
    if drawable.size:
        idx = drawable[_subsample(drawable.size, max_points, seed)]
        ax.plot(s[idx], e[idx], "o", ms=2, alpha=0.4, color="tab:blue",
                label=f"{idx.size} of {e.size} points")
        xs = np.array([s[drawable].min(), s[drawable].max()])
        pos = s > 0
        for k, style in ((1, "k--"), (2, "r:")):
            frac = float(np.mean(e[pos] > k * s[pos]))
            ax.plot(xs, k * xs, style, lw=1.2,
                    label=f"|error| = {k}σ ({100 * frac:.1f}% above)")
        _loglog(ax)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no point with σ > 0 and |error| > 0", ha="center",
                transform=ax.transAxes)
    u = f" [{unit}]" if unit else ""
    ax.set_xlabel(f"predicted σ (standard deviation){u}")
    ax.set_ylabel(f"|error|{u}")
    ax.set_title(f"{name + ': ' if name else ''}|error| vs σ", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_xscale() == "log":
        _log_ticks(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# Tables and the report
# --------------------------------------------------------------------------- #
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    v = float(v)
    return "-" if not np.isfinite(v) else f"{v:.4g}"


def _rows(metrics: dict) -> list[str]:
    keys = [k for k in _ROWS if isinstance(metrics.get(k), dict)]
    keys += [k for k, v in metrics.items()
             if k not in _ROWS and isinstance(v, dict) and "rmse" in v]
    return keys


def format_table(metrics: dict) -> str:
    """Plain-text table: one row per quantity (energy, energy_per_atom, forces), one column per metric.

    Values are printed with 4 significant digits, ``-`` for ``None``.  Short
    headers: miscal_area = miscalibration_area, cov_68/cov_95 =
    coverage_68/coverage_95.  A footer states the units.
    """
    rows = _rows(metrics)
    header = ["quantity"] + [h for _, h in _COLUMNS]
    body = [[r] + [_fmt(metrics[r].get(k)) for k, _ in _COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    out.append("units: rmse, mae, sharpness (RMS of σ), crps in eV (energy), eV/atom "
               "(energy_per_atom), eV/Å (forces, per component); nll in nats; "
               "others dimensionless; '-' = undefined (no uncertainty)")
    return "\n".join(out)


def markdown_table(metrics: dict) -> str:
    """The same table as :func:`format_table` in markdown, with the full metric names."""
    rows = _rows(metrics)
    keys = [k for k, _ in _COLUMNS]
    out = ["| quantity | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for r in rows:
        out.append(f"| {r} | " + " | ".join(_fmt(metrics[r].get(k)) for k in keys) + " |")
    return "\n".join(out)


def write_report(metrics: dict, outdir, arrays: dict, title: str = "BLIP evaluation") -> list[Path]:
    """Write all plots and ``report.md`` into ``outdir``; return the written paths.

    ``metrics`` as from :func:`blip.uq.metrics.evaluate_predictions`;
    ``arrays`` as from :func:`blip.uq.metrics.prediction_arrays`:
    ``{quantity: {"ref", "pred", "std"[, "std_recalibrated"]}}`` with flat
    arrays and standard deviations.  For each quantity present
    (energy, energy_per_atom, forces) a parity plot is written; the
    calibration, RMSE-vs-RMV and |error|-vs-σ plots only when some σ > 0.
    An optional ``std_recalibrated`` array is drawn as a second calibration
    curve.  ``report.md`` (written last) holds the metric table and image
    links.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = []
    for q in [k for k in _ROWS if k in arrays] + [k for k in arrays if k not in _ROWS]:
        a = arrays[q]
        ref = np.asarray(a["ref"], dtype=float).ravel()
        pred = np.asarray(a["pred"], dtype=float).ravel()
        std = a.get("std")
        std = np.zeros_like(pred) if std is None else np.asarray(std, dtype=float).ravel()
        err = ref - pred
        unit = UNITS.get(q, "")
        imgs = [_save_as(parity_plot(ref, pred, std, outdir / f"{q}_parity.png", q, unit),
                         "parity")]
        if np.any(std > 0):
            extra = None
            if a.get("std_recalibrated") is not None:
                extra = {"recalibrated": (err, np.asarray(a["std_recalibrated"], float).ravel())}
            imgs.append(_save_as(calibration_plot(err, std, outdir / f"{q}_calibration.png",
                                                  label="predicted σ", extra=extra, quantity=q),
                                 "calibration"))
            imgs.append(_save_as(rmse_rmv_plot(err, std, outdir / f"{q}_rmse_rmv.png",
                                               quantity=q, unit=unit), "RMSE vs RMV"))
            imgs.append(_save_as(error_sigma_plot(err, std, outdir / f"{q}_error_sigma.png",
                                                  quantity=q, unit=unit), "|error| vs σ"))
            note = ""
        else:
            note = "\nNo uncertainty (all σ = 0): only the parity plot is shown.\n"
        written += [p for p, _ in imgs]
        links = "\n".join(f"![{q} {what}]({p.name})" for p, what in imgs)
        sections.append(f"## {_NAMES.get(q, q)} [{unit}]\n{note}\n{links}\n")
    md = [f"# {title}", "", markdown_table(metrics), "",
          "Units: rmse, mae, sharpness (RMS of predicted σ), crps in eV (energy), eV/atom "
          "(energy_per_atom), eV/Å (forces, per Cartesian component); nll in nats; "
          "miscalibration_area, ence, spearman, coverage dimensionless. "
          "'-' = undefined (no uncertainty). Residual = reference - prediction; "
          "σ is a standard deviation.", ""] + sections
    report = outdir / "report.md"
    write_text_atomic(report, "\n".join(md))
    written.append(report)
    return written


def _save_as(path: Path, what: str) -> tuple[Path, str]:
    return path, what


# --------------------------------------------------------------------------- #
# Benchmark plots (``blip bench``): several methods in one figure
# --------------------------------------------------------------------------- #
_METHOD_COLORS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                  "tab:brown")


def path_plot(x, ref, series: dict, path, xlabel: str = "path coordinate", title: str = "",
              unit: str = "eV") -> Path:
    """Energy, its predicted σ and |error| along a path (e.g. a bond being broken), per method.

    ``x`` (n,) path coordinate; ``ref`` (n,) reference energies; ``series`` maps a method
    name to ``(pred, std)``: predicted energies (n,) and their **standard deviations**
    (n,), all in ``unit``.  Top panel: energies relative to the lowest reference energy,
    with ±2σ bands; bottom panel (log scale): σ (solid) and |error| (dotted) per method.
    """
    x = np.asarray(x, dtype=float)
    order = np.argsort(x)
    x, ref = x[order], np.asarray(ref, dtype=float)[order]
    shift = float(ref.min())
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    top.plot(x, ref - shift, "k-", lw=2, label="reference")
    for i, (name, (pred, std)) in enumerate(series.items()):
        c = _METHOD_COLORS[i % len(_METHOD_COLORS)]
        pred = np.asarray(pred, dtype=float)[order] - shift
        std = np.asarray(std, dtype=float)[order]
        top.plot(x, pred, "-", color=c, lw=1.3, label=name)
        if np.any(std > 0):
            top.fill_between(x, pred - 2 * std, pred + 2 * std, color=c, alpha=0.15)
            bottom.plot(x, np.where(std > 0, std, np.nan), "-", color=c, lw=1.5, label=f"{name} σ")
        err = np.abs(pred + shift - ref)
        bottom.plot(x, np.where(err > 0, err, np.nan), ":", color=c, lw=1.3, label=f"{name} |error|")
    span = float(np.ptp(ref)) or 1.0
    shown = np.concatenate([ref - shift] + [np.asarray(p, dtype=float) - shift for p, _ in series.values()])
    top.set_ylim(max(float(shown.min()), -0.5 * span) - 0.05 * span,
                 min(float(shown.max()), 2.0 * span) + 0.1 * span)
    top.set_ylabel(f"E − min E_ref [{unit}]")
    top.set_title(f"{title}\nbands: ±2σ" if title else "bands: ±2σ", fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylabel(f"σ (solid), |error| (dotted) [{unit}]")
    bottom.set_xlabel(xlabel)
    bottom.legend(fontsize=6, ncol=2, loc="best")
    bottom.grid(alpha=0.3, which="both")
    return _save(fig, path)


def learning_curve_plot(sizes, series: dict, path, ylabel: str, title: str = "",
                        logy: bool = False, ideal: float | None = None) -> Path:
    """One metric against the number of training structures (log x axis), one line per method.

    ``series`` maps a method name to values (one per size; ``None`` = undefined, not drawn).
    ``ideal`` draws a dashed horizontal line at the ideal value (e.g. 0.95 for coverage).
    """
    sizes = np.asarray(sizes, dtype=float)
    fig, ax = _new_figure((5.2, 4.2))
    for i, (name, values) in enumerate(series.items()):
        v = np.array([np.nan if a is None else float(a) for a in values])
        if np.all(np.isnan(v)):
            continue
        ax.plot(sizes, v, "o-", color=_METHOD_COLORS[i % len(_METHOD_COLORS)], ms=4, label=name)
    if ideal is not None:
        ax.axhline(ideal, color="k", ls="--", lw=1, label=f"ideal ({ideal:g})")
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo <= 10 else NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sizes)
    ax.set_xlabel("training structures N")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


_SCALE_TARGET = {"energy": "energy", "energy_per_atom": "energy", "forces": "forces"}
_RECAL_KEYS = ("nll", "miscalibration_area", "ence", "coverage_68", "coverage_95", "sharpness")


def recalibration_markdown(arrays: dict, calibration: dict) -> tuple[str, dict]:
    """Markdown table of the metrics before and after recalibration, and the (err, σ) pairs to plot.

    ``arrays`` as for :func:`write_report`, whose ``std`` are the **recalibrated** standard
    deviations (what a calibrated model predicts); ``calibration`` maps "energy"/"forces"
    to the factor s that multiplied them, so the uncalibrated σ is ``std / s`` (a target widened
    with the feature distance, b and a ``novelty`` array: ``std / (s exp(b (novelty - centre)))``;
    forces with a floor f, ``forces_floor``: ``sqrt(std^2 - f^2)`` in place of ``std``).
    Returns (markdown, {quantity: {"before": (err, σ/s), "after": (err, σ)}}).
    """
    head = "| quantity | factor s | " + " | ".join(_RECAL_KEYS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(_RECAL_KEYS)]
    pairs = {}
    for q in [k for k in _ROWS if k in arrays]:
        a = arrays[q]
        std = np.asarray(a["std"], dtype=float).ravel()
        s = float(calibration.get(_SCALE_TARGET[q], 1.0))
        if not np.any(std > 0) or not (s > 0):
            continue
        err = np.asarray(a["ref"], dtype=float).ravel() - np.asarray(a["pred"], dtype=float).ravel()
        factor = s * novelty_factor(a.get("novelty"), calibration, _SCALE_TARGET[q])
        std_raw = unfloored_std(std, calibration, _SCALE_TARGET[q], a.get("mean_novelty"))  # floors off first
        before, after = M.regression_metrics(err, std_raw / factor), M.regression_metrics(err, std)
        cells = [f"{_fmt(before[k])} → {_fmt(after[k])}" for k in _RECAL_KEYS]
        lines.append(f"| {q} | {s:.4g} | " + " | ".join(cells) + " |")
        pairs[q] = {"before": (err, std_raw / factor), "after": (err, std)}
    return "\n".join(lines), pairs


def add_recalibration_section(outdir, arrays: dict, calibration: dict) -> list[Path]:
    """Append "before → after recalibration" (table + calibration curves) to ``outdir/report.md``.

    For a model whose predictions carry calibration factors (``blip calibrate``); arguments
    as in :func:`recalibration_markdown`. Writes ``{quantity}_recalibration.png`` and returns
    the written paths (report.md last). Does nothing if no quantity has σ > 0.
    """
    outdir = Path(outdir)
    text, pairs = recalibration_markdown(arrays, calibration)
    if not pairs:
        return []
    written = []
    for q, p in pairs.items():
        written.append(calibration_plot({"before recalibration": p["before"], "after": p["after"]}, None,
                                        outdir / f"{q}_recalibration.png", quantity=q))
    links = "\n".join(f"![{p.stem}]({p.name})" for p in written)
    section = ("\n## Recalibration (before → after)\n\n"
               "The model carries one factor per target (fitted by `blip calibrate` on validation data) "
               "that multiplies every predicted σ; 'before' uses σ / factor. The table above and all "
               "other plots are after recalibration.\n\n" + text + "\n\n" + links + "\n")
    report = outdir / "report.md"
    old = report.read_text(encoding="utf-8") if report.is_file() else ""
    write_text_atomic(report, old + section)
    return written + [report]
