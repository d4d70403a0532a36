#!/usr/bin/env bash
# The command-line workflow on a GPU, end to end, on the bundled acetylacetone example:
# train (a short budget), evaluate on CUDA and on the CPU (the metrics must agree), watched MD on CUDA.
#     bash benchmarks/cuda_end_to_end.sh OUT [DEVICE]      # DEVICE: cuda (default) or cpu (a dry run)
set -euo pipefail
out=$1; device=${2:-cuda}; run=$(mktemp -d)
mkdir -p "$out"
start=$(date +%s)
python3 -m blip train examples/acac/config.yaml --quiet --set training.device="$device" --set training.epochs=4 \
    --set data.max_train=200 --set output_dir="$run" --set training.tensorboard=false
echo "train: $(( $(date +%s) - start )) s"
for d in "$device" cpu; do
    python3 -m blip evaluate "$run/model.pt" examples/acac/test_MD_300K.xyz --device "$d" --samples 16 --quiet \
        --json "$out/evaluate_$d.json"
done
python3 - "$out/evaluate_$device.json" "$out/evaluate_cpu.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
worst = max(abs(a[t][k] - b[t][k]) / max(abs(b[t][k]), 1e-12) for t in ("energy", "forces") for k in ("rmse", "nll", "coverage_95"))
print(f"evaluate {sys.argv[1]} vs cpu: largest relative difference of rmse/nll/coverage_95 {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
PY
start=$(date +%s)
python3 -m blip md "$run/model.pt" examples/acac/test_MD_300K.xyz -o "$out/md.xyz" --steps 200 --device "$device" --quiet
echo "md: $(( $(date +%s) - start )) s"
cp "$run/log.csv" "$out/"
