#!/usr/bin/env bash
# Test-set evaluation of the finished MNIST Table 1 runs (those with a done.txt), into each run's eval.json
# (evaluate.py's store: per-image results, reused and continued by the same command after a stop):
#   1. natural, FGSM, PGD-20, PGD-100 and CW-inf on all 10,000 test images;
#   2. on the first 1,000 (the results of 1. are reused there): AutoAttack (standard), and for the CAT
#      models APGD-CE, APGD-T and Square as columns of their own; Worst = survived every attack.
# One run at a time, one thread (the other core trains); the table goes to eval_test10k.log / eval_test1k.log.
#   bash results/table1/eval.sh results/table1 >> results/table1/eval_queue.log 2>&1 &
#   N10K=20 N1K=10 bash results/table1/eval.sh /tmp/dry      # a dry run on a few images
set -u
root=${1:-results/table1}
n10k=(); [ -n "${N10K:-}" ] && n10k=(--subset "$N10K")
n1k=${N1K:-1000}
for run in "$root"/*/; do
  run=${run%/}
  [ -e "$run/done.txt" ] && [ -e "$run/best.pt" ] || continue
  extra=""; grep -q '"method": "cat"' "$run/config.json" && extra=",apgd-ce,apgd-t,square"
  echo "$(date -u +%FT%TZ) $run"
  OMP_NUM_THREADS=1 python evaluate.py "$run/best.pt" "${n10k[@]}" --attacks natural,fgsm,pgd20,pgd100,cw \
    --json "$run/eval.json" > "$run/eval_test10k.log" 2>&1 < /dev/null || { echo "$run: 10k stopped"; exit 1; }
  OMP_NUM_THREADS=1 python evaluate.py "$run/best.pt" --subset "$n1k" --json "$run/eval.json" \
    --attacks "natural,fgsm,pgd20,pgd100,cw$extra,autoattack" > "$run/eval_test1k.log" 2>&1 < /dev/null \
    || { echo "$run: 1k stopped"; exit 1; }
done
