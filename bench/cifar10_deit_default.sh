#!/usr/bin/env bash
# The default export of the CIFAR-10 DeiT-Small as a user runs it (no flags beyond --checkpoint and --dataset), timed
# from an empty calibration cache, then `tmlp bench` and `tmlp bench --pareto` on it. Results are copied into
# bench/results/cifar10-deit_small-default/ (export log, manifest, bench table, wall times) and
# bench/results/pareto-cifar10/ (pareto.json/md/png and the log; batch8/: the same variants at batch 8). Pause any training while this runs.
# Usage: bash bench/cifar10_deit_default.sh [CHECKPOINT] [DATASET] [RUN] [DEFAULT_OUT] [PARETO_OUT] [CACHE]
#   (from the repository root, tmlp installed). The 197-token model:
#   bash bench/cifar10_deit_default.sh bench/deit_small_cifar10_56px_fp16.pt npz:../shared/data/cifar10-jpeg \
#       runs/cifar56-default bench/results/cifar10-deit_small-56px-default bench/results/pareto-cifar10-56px \
#       /tmp/tmlp-cache-cifar56
set -euo pipefail
checkpoint="${1:-bench/deit_small_cifar10_fp16.pt}"
dataset="${2:-npz:../shared/data/cifar10-jpeg}"
run="${3:-runs/cifar-default}"
default_out="${4:-bench/results/cifar10-deit_small-default}"
pareto_out="${5:-bench/results/pareto-cifar10}"
# an empty calibration cache (this script's own folder, emptied), so the export takes the time a user sees the first
# time; it is kept for later runs on the same model (TMLP_CACHE=/tmp/tmlp-cache-cifar10 bash
# bench/cifar10_deit_all12.sh reuses the calibration)
export TMLP_CACHE="${6:-/tmp/tmlp-cache-cifar10}"
rm -rf "$TMLP_CACHE"
mkdir -p "$default_out" "$pareto_out"
rm -rf "$run"

start=$(date +%s)
tmlp export --model deit_small --checkpoint "$checkpoint" --dataset "$dataset" --out "$run" 2>&1 \
    | tee "$default_out/export.log"
export_s=$(( $(date +%s) - start ))

start=$(date +%s)
tmlp bench --provider cpu --run "$run" 2>&1 | tee "$default_out/bench.log"
bench_s=$(( $(date +%s) - start ))
cp "$run/bench.json" "$run/bench.md" "$run/manifest.json" "$default_out/"

start=$(date +%s)
tmlp bench --pareto --run "$run" 2>&1 | tee "$pareto_out/pareto.log"
pareto_s=$(( $(date +%s) - start ))
cp "$run/pareto.json" "$run/pareto.md" "$run/pareto.png" "$run/manifest.json" "$pareto_out/"
cp "$default_out/export.log" "$pareto_out/"

# the same variants (already built: only measured again) at batch 8
start=$(date +%s)
tmlp bench --pareto --batch 8 --run "$run" 2>&1 | tee "$pareto_out/pareto-batch8.log"
pareto8_s=$(( $(date +%s) - start ))
mkdir -p "$pareto_out/batch8"
cp "$run/pareto.json" "$run/pareto.md" "$run/pareto.png" "$pareto_out/batch8/"

printf 'checkpoint %s\nexport (empty calibration cache) %d s\nbench %d s\nbench --pareto %d s\nbench --pareto --batch 8 %d s\n' \
    "$checkpoint" "$export_s" "$bench_s" "$pareto_s" "$pareto8_s" | tee "$default_out/wall_time.txt"
