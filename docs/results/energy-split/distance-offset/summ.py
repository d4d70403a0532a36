"""Summarise results.json files: per (experiment, test set, method) force RMSE, recal NLL, cov, rho, sigma ratio; mean ± std over the files' seed rows."""
import json, sys, numpy as np
rows = {}
for f in sys.argv[1:]:
    d = json.load(open(f))
    for r in d["rows"]:
        if r.get("seed_summary") or r.get("forces_nll_recal") is None and r.get("forces_rmse") is None:
            continue
        key = (r["experiment"], r["test_set"], r["method"])
        rows.setdefault(key, []).append([r.get(k) if r.get(k) is not None else np.nan for k in
            ("forces_rmse", "forces_nll_recal", "forces_coverage_95_recal", "forces_spearman_recal", "forces_sigma_ratio_recal", "energy_nll_recal", "energy_spearman_recal")])
for key, v in sorted(rows.items()):
    v = np.array(v, dtype=float)
    m, s = np.nanmean(v, 0), np.nanstd(v, 0)
    print(f"{key[0]:12s} {key[1]:18s} {key[2]:8s} n={len(v)} RMSE {m[0]*1000:6.1f} NLL {m[1]:7.3f} ± {s[1]:.3f} cov {m[2]:.2f} rho {m[3]:.2f} ratio {m[4]:.2f} | E NLL {m[5]:.2f} ± {s[5]:.2f} rhoE {m[6]:.2f}")
