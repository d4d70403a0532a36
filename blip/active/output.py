"""Outputs of an active-learning run: the learning-curve CSV fields, PNG plot and Markdown table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .._files import atomic_path, write_text_atomic

CSV_FIELDS = ["strategy", "round", "n_labelled", "n_train", "test", "energy_rmse_meV",
              "energy_per_atom_rmse_meV", "forces_rmse_meV_A", "energy_nll", "forces_nll",
              "forces_spearman", "train_seconds", "selector_seconds", "pool_max_force_std", "pool_size",
              "stopped"]


def write_learning_curve_csv(rows: list[dict], path) -> None:
    """CSV (columns CSV_FIELDS; floats to 6 significant digits, None as empty), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv(row.get(k)) for k in CSV_FIELDS})
    write_text_atomic(path, buf.getvalue())


def plot_learning_curves(rows: list[dict], path) -> Path:
    """PNG: energy RMSE, force RMSE and force NLL vs labelled structures, one line per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tests = sorted({row["test"] for row in rows})
    panels = [("energy_rmse_meV", "energy RMSE (meV)"), ("forces_rmse_meV_A", "force RMSE (meV/Å)"),
              ("forces_nll", "force NLL (nats, eV/Å)")]
    fig = Figure(figsize=(4.2 * len(panels), 3.4 * max(1, len(tests))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(tests)), len(panels), squeeze=False)
    for t, test in enumerate(tests):
        for p, (key, label) in enumerate(panels):
            ax = axes[t][p]
            for strategy in sorted({row["strategy"] for row in rows}):
                pts = sorted((row["n_labelled"], row[key]) for row in rows
                             if row["test"] == test and row["strategy"] == strategy and row.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=strategy)
            ax.set_xlabel("labelled structures")
            ax.set_ylabel(label)
            ax.set_title(test, fontsize=9)
            if key != "forces_nll":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return Path(path)


def format_rows(rows: list[dict]) -> str:
    """Markdown table of the learning curves."""
    head = "| strategy | round | n_labelled | test | E RMSE (meV) | F RMSE (meV/Å) | F NLL |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["test"], x["strategy"], x["round"])):
        lines.append(f"| {row['strategy']} | {row['round']} | {row['n_labelled']} | {row['test']} | "
                     f"{row['energy_rmse_meV']:.2f} | {row['forces_rmse_meV_A']:.1f} | {_f(row['forces_nll'])} |")
    return "\n".join(lines)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _csv(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)
