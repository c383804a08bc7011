#!/usr/bin/env bash
# MNIST CAT_cent(0.3) under the default (logit wall), 5 full-data epochs (50,000 images, 500 steps per
# epoch), seeds 0 and 1, the paper's settings otherwise, fp32, one thread per run, both runs at once;
# validation on 500 held-out images. The committed runs: commit 742dc94 on the shared 2-core AMD EPYC
# CPU (about 26 min per epoch per run). The other seeds and the --paper-exact arm: results/gpu_study.sh.
#   bash results/seed_full/run.sh runs/seed_full
set -u
root=${1:-runs/seed_full}
mkdir -p "$root"
for seed in 0 1; do
  OMP_NUM_THREADS=1 python train.py --dataset mnist --attack cent --beta1 0.3 --amp fp32 --seed "$seed" \
    --epochs 5 --val-size 500 --out "$root/wall_s$seed" --overwrite > "$root/wall_s$seed.log" 2>&1 &
done
wait
