#!/usr/bin/env bash
# Test-set evaluation of the finished MNIST Table 1 runs (those with a done.txt), into each run's eval.json
# (evaluate.py's store: per-image results, reused and continued by the same command after a stop):
#   1. every run on the first 1,000 test images: natural, FGSM, PGD-20, PGD-100, CW-inf and AutoAttack
#      (standard); its log shows the robust accuracy after each of APGD-CE, APGD-T, FAB-T and Square, so
#      images that only Square breaks (gradient masking) are read from eval_test1k.log;
#   2. then every run on all 10,000 test images without AutoAttack (the first 1,000 are reused);
#   3. then, for the CAT runs, APGD-CE, APGD-T and Square each alone on the same 1,000, as columns of their
#      own (the columns that tell weak PGD from masking), every column in eval_test1k_all.log;
#   4. the runs trained at eps 0.4 (*_0.4) tested at eps 0.4 on the same 1,000: PGD-20, APGD-CE, APGD-T and
#      Square alone, and AutoAttack, into eval_test1k_eps0.4.log;
#   5. robustness curves: PGD-20 and APGD-CE at eps 0.05, 0.10, ..., 0.45 on the same 1,000 for the seed-0
#      model of every Table 1 row that trains, one log per model, into ROOT/eps_sweep/eval.json.
# One run at a time, one thread (the other core trains); the table goes to eval_test1k.log / eval_test10k.log,
# written as .part and renamed once finished; a finished log is kept (AutoAttack's per-attack counts live
# only there), and its evaluation skipped. Both lanes of queue.sh may run it: a run's store has one writer.
#   bash results/table1/eval.sh results/table1 >> results/table1/eval_queue.log 2>&1 &
#   N10K=20 N1K=10 bash results/table1/eval.sh /tmp/dry      # a dry run on a few images
#   PASSES="1 2" bash results/table1/eval.sh results/table1   # only the passes named (default: 1 2 3 4 5)
set -u
root=${1:-results/table1}
n10k=(); [ -n "${N10K:-}" ] && n10k=(--subset "$N10K")
n1k=${N1K:-1000}
. "$(dirname "$0")/lib.sh"
evaluate() { evaluate_once "$1" "$2" --json "$1/eval.json" "${@:3}"; }
passes=" ${PASSES:-1 2 3 4 5} "
# Seed 0 of AT(0.3), TRADES(0.3) and AT(0.4) (the H100 runs in results/mnist_*): their first stores predate per-image bits,
# so passes 1 and 2 evaluate them again, into their folder's eval.json, for the seed-and-image tests.
rows() { finished "$root"; [ "$root" = results/table1 ] && echo results/mnist_at_0.3 results/mnist_trades_0.3 results/mnist_at_0.4; }
[[ $passes = *" 1 "* ]] && for run in $(rows); do
  evaluate "$run" eval_test1k.log --subset "$n1k" --attacks natural,fgsm,pgd20,pgd100,cw,autoattack
done
[[ $passes = *" 2 "* ]] && for run in $(rows); do
  evaluate "$run" eval_test10k.log "${n10k[@]}" --attacks natural,fgsm,pgd20,pgd100,cw
done
[[ $passes = *" 3 "* ]] && for run in $(finished "$root"); do
  grep -q '"method": "cat"' "$run/config.json" || continue
  evaluate "$run" eval_test1k_all.log --subset "$n1k" --attacks natural,fgsm,pgd20,pgd100,cw,apgd-ce,apgd-t,square,autoattack
done
[[ $passes = *" 4 "* ]] && for run in $(finished "$root"); do
  case $run in *_0.4) evaluate "$run" eval_test1k_eps0.4.log --subset "$n1k" --eps 0.4 \
    --attacks natural,pgd20,apgd-ce,apgd-t,square,autoattack ;; esac
done
[[ $passes = *" 5 "* ]] && for run in results/mnist_at_0.3 results/mnist_trades_0.3 "$root"/{cat_cent,cat_cw}_0.{3,4} \
    "$root"/trades_0.4; do
  [ -e "$run/best.pt" ] || continue
  MODEL=$run/best.pt evaluate_once "$root/eps_sweep" "curve_${run##*/}.log" --subset "$n1k" --attacks natural,pgd20,apgd-ce \
    --eps 0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45 --json "$root/eps_sweep/eval.json"
done
echo "$(date -u +%FT%TZ) done"
