#!/usr/bin/env bash
# Where today's CAT loses robustness between PGD-20 and its worst case, measured on committed models
# (no tuning: the test set is only read). One thread, one evaluation at a time; each store continues
# after a stop.
#   1. The number of epochs: CAT_cent(0.3)'s best.pt after epoch 7 (lr 1e-3 throughout; from commit
#      7f2e7d8, results/table1/diag_epoch7) on the first 200 test images with the attacks that
#      diag_epoch2 (after epoch 2) had; the finished model (epoch 9, after the lr drop at epoch 8) has
#      them on the first 1,000 from eval.sh.
#   2. The radius: AT(0.3) and the 10-epoch CAT_cent(0.3) under PGD-20 and APGD-CE at eps 0.1 to 0.4
#      on the first 1,000 (results/table1/eps_sweep).
#   3. Figure 2: CAT_cent(0.4)'s mask over PGD-20 at eps 0.4, as the paper draws it, once that run is done;
#      the same statistics (the mean mask beside the robustness curves, table.py) for the other CAT rows.
#   bash results/table1/diag.sh >> results/table1/eval_queue.log 2>&1
set -u
t=results/table1
say() { echo "$(date -u +%FT%TZ) $*"; }
. "$(dirname "$0")/lib.sh"
# ev LOG evaluate.py-flags...: one evaluation into LOG, skipped when LOG is finished (a rerun from the store
# would rewrite it and the store's times)
ev() { local log=$1; shift; finished_log "$log" && return 0
  OMP_NUM_THREADS=1 python evaluate.py "$@" > "$log" 2>&1 < /dev/null || { say "stopped: evaluate.py $*"; exit 1; }; }
say "diag: epoch 7"
ev $t/diag_epoch7/eval.log $t/diag_epoch7/best.pt --subset 200 --attacks natural,pgd20,pgd100,cw,apgd-ce,apgd-t,square \
  --json $t/diag_epoch7/eval.json
say "diag: radius"
ev $t/eps_sweep/eval.log results/mnist_at_0.3/best.pt $t/cat_cent_0.3/best.pt --eps 0.1,0.2,0.3,0.4 \
  --attacks natural,pgd20,apgd-ce --subset 1000 --json $t/eps_sweep/eval.json
if [ -e $t/cat_cent_0.4/done.txt ]; then
  say "diag: Figure 2"
  ev $t/cat_cent_0.4/masks.log $t/cat_cent_0.4/best.pt --eps 0.4 --attacks natural,pgd20 --subset 1000 \
    --save-masks $t/cat_cent_0.4/masks.png --json $t/cat_cent_0.4/eval_masks.json
fi
for name in cat_cent_0.3 cat_cw_0.3 cat_cw_0.4; do
  say "diag: masks of $name"
  ev $t/$name/masks.log $t/$name/best.pt --eps "${name##*_}" --attacks natural,pgd20 --subset 1000 \
    --save-masks $t/$name/masks.png --json $t/$name/eval_masks.json
done
say "diag: done"
