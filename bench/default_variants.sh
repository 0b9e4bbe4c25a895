#!/usr/bin/env bash
# Variants of the default export of the CIFAR-10 DeiT-Small, one change each, to see what moves the report-split
# drop: (bf16-full) one whole pass of fine-tuning over the 45,000 training images under bf16 autocast, no checks;
# (h1) --headroom 1: the plan may lose 2 points before fine-tuning instead of 3; (margin1) --budget-margin 1: the
# budget must hold by one paired standard error; (augment) fine-tuning on randomly cropped and flipped training
# images; (fidelity) the plan offers only each block's most faithful form (k=100, rank 32; the default from stop 34
# on); (fidelity-augment) both; (ftlr5e-5) the network's own weights fine-tuned at 5e-5 instead of 2e-5.
# Accuracy only: the expected speed-up each prints is the export's quick check. Logs (progress bars stripped) and
# manifests into bench/results/default-variants/.
# Usage: TMLP_CACHE=/tmp/tmlp-cache-cifar10 bash bench/default_variants.sh [CHECKPOINT] [DATASET] [VARIANT ...]
set -euo pipefail
checkpoint="${1:-bench/deit_small_cifar10_fp16.pt}"
dataset="${2:-npz:../shared/data/cifar10-jpeg}"
out=bench/results/default-variants
mkdir -p "$out"
shift $(( $# > 2 ? 2 : $# ))
declare -A flags=(
    [bf16-full]="--train-precision bf16 --distill-epochs 1 --distill-images 45000"
    [h1]="--headroom 1"
    [margin1]="--budget-margin 1"
    [augment]="--distill-augment auto"
    [fidelity]="--plan-k 100 --plan-rank 32"
    [fidelity-augment]="--plan-k 100 --plan-rank 32 --distill-augment auto"
    [ftlr5e-5]="--finetune-lr 5e-5"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(bf16-full h1 margin1 augment fidelity fidelity-augment ftlr5e-5)
for name in "${names[@]}"; do
    rm -rf "runs/variant-$name"
    # shellcheck disable=SC2086
    tmlp export --model deit_small --checkpoint "$checkpoint" --dataset "$dataset" ${flags[$name]} \
        --out "runs/variant-$name" 2>&1 | tr '\r' '\n' | sed -E 's/^.*\]  (after [0-9]+ training images)/  \1/' \
        | grep -v -E "^(fine-tune epoch|plan: sens|calibrate:|fit:)|it/s\]$|s/it\]$" | grep -v "^ *$" \
        | tee "$out/$name.log"
    cp "runs/variant-$name/manifest.json" "$out/$name.manifest.json"
done
