#!/usr/bin/env bash
# README command 1's job, timed from an empty cache, with its results copied into bench/results/digits-deit_small/.
# Usage: bash bench/digits_default.sh   (from the repository root, with tmlp installed)
set -euo pipefail
export TMLP_CACHE="${TMLP_CACHE:-$(mktemp -d)}"   # empty cache: the default model is trained from scratch
out=bench/results/digits-deit_small
start=$(date +%s)
tmlp export --model deit_small --k 100 --out runs/deit_small-digits
tmlp bench --provider cpu --run runs/deit_small-digits
echo "wall time from an empty cache: $(( $(date +%s) - start )) s" | tee "$out/wall_time.txt"
cp runs/deit_small-digits/bench.json runs/deit_small-digits/bench.md "$out/"
python - "$out" <<'PY'
import json, sys
m = json.load(open("runs/deit_small-digits/manifest.json"))
keep = {k: m[k] for k in ("model", "model_config", "dataset", "taylor_config", "layers", "pytorch_val_accuracy",
                          "parity", "calibration_seconds", "export_seconds", "versions")}
keep["files"] = m["files"]
json.dump(keep, open(f"{sys.argv[1]}/manifest.json", "w"), indent=2, sort_keys=True)
PY
