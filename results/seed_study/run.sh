#!/usr/bin/env bash
# Seed study of MNIST CAT_cent(0.3): the default (logit wall) against the paper's exact algorithm
# (--paper-exact), seeds 0-4, the paper's settings otherwise (Adam 1e-3, batch 100, 20 PGD steps of
# eps/20 from a uniform start, beta 1, beta1 0.3), fp32, one thread per run, two runs at a time.
# Budget of the committed runs (a shared 2-core CPU): 2 epochs of a 5,000-image subset (100 steps),
# validation on 500 held-out images; for the full study pass EXTRA="--epochs 5" and no subset:
#   bash results/seed_study/run.sh runs/seed_study                       # the committed budget
#   EXTRA="--epochs 5" SUBSET="" bash results/seed_study/run.sh runs/seed_full
# The committed runs came from commit 50a22cf, where the same two arms were spelled
# "--stabiliser wall" and "--stabiliser none" (same code path as today's default and --paper-exact).
set -u
root=${1:-runs/seed_study}
extra=(${EXTRA:---epochs 2} ${SUBSET---subset 5000} --val-size 500)
one() { # arm seed
  local flag=(); [ "$1" = none ] && flag=(--paper-exact)
  OMP_NUM_THREADS=1 python train.py --dataset mnist --attack cent --beta1 0.3 --amp fp32 --seed "$2" \
    "${extra[@]}" "${flag[@]}" --out "$root/$1_s$2" --overwrite > "$root/$1_s$2.log" 2>&1
}
mkdir -p "$root"
for seed in 0 1 2 3 4; do one wall "$seed"; done &
for seed in 0 1 2 3 4; do one none "$seed"; done &
wait
