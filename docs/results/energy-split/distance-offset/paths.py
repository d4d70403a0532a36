import json, sys, numpy as np
for f in sys.argv[1:]:
    d = json.load(open(f)); rows = {}
    for r in d["rows"]:
        if r["test_set"] in ("test_H_removal", "test_norm_mode_3005", "test_norm_mode_874"):
            rows.setdefault(r["test_set"], []).append((r.get("energy_nll_recal"), r.get("energy_spearman_recal"), r.get("energy_sigma_ratio_recal")))
    for t, v in sorted(rows.items()):
        v = np.array(v, dtype=float)
        print(f"{f:28s} {t:20s} E NLL {v[:,0].mean():8.2f} ± {v[:,0].std():6.2f} rho {v[:,1].mean():.2f} ({' '.join(f'{x:.2f}' for x in v[:,1])}) ratio {v[:,2].mean():.1f}")
