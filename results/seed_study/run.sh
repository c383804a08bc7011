#!/usr/bin/env bash
# Seed study of MNIST CAT_cent(0.3): the default (logit wall, "--stabiliser wall") against the paper's
# exact algorithm ("--stabiliser none"), seeds 0-4, the paper's settings otherwise (Adam 1e-3, batch 100,
# 20 PGD steps of eps/20 from a uniform start, beta 1, beta1 0.3), fp32, one thread per run.
# Budget (a shared 2-core CPU): 2 epochs of a 5,000-image subset (100 steps), validation on 500 held-out images.
# Run from a checkout of commit 50a22cf:  bash results/seed_study/run.sh OUT_ROOT
set -u
root=${1:-runs/seed_study}
one() { # arm seed
  OMP_NUM_THREADS=1 python train.py --dataset mnist --attack cent --beta1 0.3 --amp fp32 --seed "$2" \
    --subset 5000 --epochs 2 --val-size 500 --stabiliser "$1" --out "$root/$1_s$2" --overwrite > "$root/$1_s$2.log" 2>&1
}
mkdir -p "$root"
for seed in 0 1 2 3 4; do one wall "$seed"; done &
for seed in 0 1 2 3 4; do one none "$seed"; done &
wait
