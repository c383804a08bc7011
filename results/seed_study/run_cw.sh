#!/usr/bin/env bash
# CAT_cw(0.3) on MNIST (--attack cw, kappa 150), the default against --paper-exact, seeds 0-2, at the
# seed study's budget: 2 epochs of a 5,000-image subset (100 steps), validation on 500 images, fp32.
#   bash results/seed_study/run_cw.sh runs/seed_cw
set -u
root=${1:-runs/seed_cw}
one() { # arm seed
  local flag=(); [ "$1" = none ] && flag=(--paper-exact)
  OMP_NUM_THREADS=1 python train.py --dataset mnist --attack cw --beta1 0.3 --amp fp32 --seed "$2" \
    --epochs 2 --subset 5000 --val-size 500 "${flag[@]}" --out "$root/cw_$1_s$2" --overwrite > "$root/cw_$1_s$2.log" 2>&1
}
mkdir -p "$root"
for seed in 0 1 2; do one wall "$seed"; done &
for seed in 0 1 2; do one none "$seed"; done &
wait
