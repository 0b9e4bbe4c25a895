#!/usr/bin/env bash
# Train the design's models on CIFAR-10 and CIFAR-100 (for machines with a GPU and internet access).
# Usage: bash train.sh [DEVICE]   (DEVICE: cuda (default), cuda:1, cpu). Each run resumes if interrupted.
set -euo pipefail
device="${1:-cuda}"
root="${TMLP_DATA:-$HOME/.cache/tmlp/data}"
for dataset in cifar10 cifar100; do
  tmlp data download --dataset "$dataset" --dir "$root"
  # VGG-16 with batch norm: the lab's CIFAR recipe (SGD, momentum 0.95, Nesterov, wd 1e-4, cosine, crop + flip).
  tmlp train --model vgg16 --dataset "$dataset" --data-root "$root" --epoch 200 --lr 0.05 --batch_size 128 \
    --weight_decay 1e-4 --device "$device" --num_workers 4 --path "runs/train-vgg16-$dataset"
  # DeiT-Small from scratch at 32x32 with 4x4 patches (64 patches + class token): AdamW, warm-up, clipping.
  tmlp train --model deit_small --dataset "$dataset" --data-root "$root" --img-size 32 --patch-size 4 \
    --optimizer adamw --lr 5e-4 --warmup 5 --clip-grad 1.0 --weight_decay 0.05 --epoch 200 --batch_size 128 \
    --device "$device" --num_workers 4 --patience 40 --path "runs/train-deit_small-$dataset"
done
