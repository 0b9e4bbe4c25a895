#!/usr/bin/env bash
# Variants of the default export of the CIFAR-10 DeiT-Small, one change each, to see what moves the report-split
# drop: (bf16-full) one whole pass of fine-tuning over the 45,000 training images under bf16 autocast, no checks;
# (h1) --headroom 1: the plan may lose 2 points before fine-tuning instead of 3. Accuracy only: the expected speed-up
# each prints is the export's quick check. Logs (progress bars stripped) into bench/results/default-variants/.
# Usage: TMLP_CACHE=/tmp/tmlp-cache-cifar10 bash bench/default_variants.sh [CHECKPOINT] [DATASET]
set -euo pipefail
checkpoint="${1:-bench/deit_small_cifar10_fp16.pt}"
dataset="${2:-npz:../shared/data/cifar10-jpeg}"
out=bench/results/default-variants
mkdir -p "$out"
declare -A flags=(
    [bf16-full]="--train-precision bf16 --distill-epochs 1 --distill-images 45000"
    [h1]="--headroom 1"
)
for name in bf16-full h1; do
    rm -rf "runs/variant-$name"
    # shellcheck disable=SC2086
    tmlp export --model deit_small --checkpoint "$checkpoint" --dataset "$dataset" ${flags[$name]} \
        --out "runs/variant-$name" 2>&1 | tr '\r' '\n' | sed -E 's/^.*\]  (after [0-9]+ training images)/  \1/' \
        | grep -v -E "^(fine-tune epoch|plan: sens|calibrate:|fit:)|it/s\]$|s/it\]$" | grep -v "^ *$" \
        | tee "$out/$name.log"
    cp "runs/variant-$name/manifest.json" "$out/$name.manifest.json"
done
