#!/usr/bin/env bash
# The 5-epoch default seeds on the first 1,000 test images, as seeds 0 and 1 were: natural, PGD-20, PGD-100
# and APGD-CE into each run's eval_test1k.json, with the mask over PGD-20's perturbation (mean, on bright
# digit pixels and on the dark background) and its picture, masks.png. Runs with a done.txt only (the
# seeds trained by results/table1/run.sh); one thread; the store continues after a stop; a run whose log
# is finished is skipped, and one the other lane is evaluating too.
#   bash results/seed_full/eval.sh results/seed_full
set -u
root=${1:-results/seed_full}
. "$(dirname "$0")/../table1/lib.sh"
for run in $(finished "$root"); do
  case $run in */wall_s*) ;; *) continue ;; esac
  evaluate_once "$run" eval_test1k.log --subset 1000 --attacks natural,pgd20,pgd100,apgd-ce \
    --save-masks "$run/masks.png" --json "$run/eval_test1k.json"
done
