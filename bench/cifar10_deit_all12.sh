#!/usr/bin/env bash
# Every MLP of the CIFAR-10 DeiT-Small replaced, k and rank chosen per block under a half-point budget
# (--replace-all --max-acc-drop 0.5: automatic fine-tuning, the budget held on tmlp.onnx in onnxruntime), then
# `tmlp bench`. Results: bench/results/cifar10-deit_small-all12/. Pause any training while this runs.
# Usage: bash bench/cifar10_deit_all12.sh [CHECKPOINT] [DATASET]   (from the repository root, tmlp installed)
set -euo pipefail
checkpoint="${1:-bench/deit_small_cifar10_fp16.pt}"
dataset="${2:-npz:../shared/data/cifar10-jpeg}"
run=runs/cifar-all12
out=bench/results/cifar10-deit_small-all12
mkdir -p "$out"
rm -rf "$run"
start=$(date +%s)
tmlp export --model deit_small --checkpoint "$checkpoint" --dataset "$dataset" --replace-all --max-acc-drop 0.5 \
    --out "$run" 2>&1 | tee "$out/export.log"
export_s=$(( $(date +%s) - start ))
tmlp bench --provider cpu --run "$run" 2>&1 | tee "$out/bench.log"
cp "$run/bench.json" "$run/bench.md" "$run/manifest.json" "$out/"
printf 'checkpoint %s\nexport %d s (calibration cache: %s)\n' "$checkpoint" "$export_s" "${TMLP_CACHE:-~/.cache/tmlp}" \
    | tee "$out/wall_time.txt"
