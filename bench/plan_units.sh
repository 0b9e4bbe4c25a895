#!/usr/bin/env bash
# The budget's plan choosing exact hidden units per block (--plan-units 0,64,256) on the CIFAR-10 DeiT-Small:
# at the default headroom (2 points before fine-tuning), at headroom 0 (the plan alone holds the budget) and at
# headroom 0 with --budget-margin 1, each followed by `tmlp bench`.
# Results: bench/results/plan-units/{headroom-2,headroom-0,headroom-0-margin-1}/. Run alone on the machine.
# Usage: bash bench/plan_units.sh [CHECKPOINT] [DATASET]   (from the repository root, tmlp installed)
set -euo pipefail
checkpoint="${1:-bench/deit_small_cifar10_fp16.pt}"
dataset="${2:-npz:../shared/data/cifar10-jpeg}"
for variant in "headroom-2:--headroom 2" "headroom-0:--headroom 0" "headroom-0-margin-1:--headroom 0 --budget-margin 1"; do
    name=${variant%%:*}
    run=runs/cifar-planunits-$name
    out=bench/results/plan-units/$name
    mkdir -p "$out"
    rm -rf "$run"
    start=$(date +%s)
    # shellcheck disable=SC2086  # the variant's flags split into words
    tmlp export --model deit_small --checkpoint "$checkpoint" --dataset "$dataset" --plan-units 0,64,256 \
        ${variant#*:} --out "$run" 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$out/export.log"
    export_s=$(( $(date +%s) - start ))
    tmlp bench --provider cpu --run "$run" 2>&1 | tee "$out/bench.log"
    cp "$run/bench.json" "$run/bench.md" "$run/manifest.json" "$out/"
    printf 'checkpoint %s\nexport %d s (calibration cache: %s)\n' "$checkpoint" "$export_s" \
        "${TMLP_CACHE:-~/.cache/tmlp}" | tee "$out/wall_time.txt"
done
