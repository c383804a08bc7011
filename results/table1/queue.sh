#!/usr/bin/env bash
# The whole study on a 2-core CPU, one single-threaded job per core, resumable across working sessions.
# Both lanes share one training queue (run.sh) and one evaluation queue (eval.sh): a run or a store that
# one lane holds, the other skips.
#   lane 1: train, then evaluate;
#   lane 2: AutoAttack and the 10,000-image columns of every finished run (eval.sh passes 1 and 2: each
#           store keeps what earlier sessions computed and goes on from there), the diagnostics (diag.sh),
#           then train what is left, then evaluate;
#   evaluate: eval.sh passes 1 and 2, then the seeds (results/seed_full/eval.sh, minutes each), then
#           eval.sh pass 3 (APGD-CE, APGD-T and Square alone for CAT, hours each).
# Stop it all with `kill -TERM -- -PGID` (training saves after the step; an evaluation keeps its finished
# batches); start it again with the same line (LANES=2 starts lane 2 alone, e.g. to restart one lane):
#   setsid bash results/table1/queue.sh > /dev/null 2>&1 < /dev/null &
set -u
cd "$(dirname "$0")/../.."
q=results/table1/queue.log e=results/table1/eval_queue.log
train() { LANE=1 bash results/table1/run.sh results/table1 results/seed_full >> "$q" 2>&1; }
evaluate() { PASSES="1 2" bash results/table1/eval.sh results/table1 >> "$e" 2>&1 &&
  bash results/seed_full/eval.sh results/seed_full >> "$e" 2>&1 &&
  PASSES=3 bash results/table1/eval.sh results/table1 >> "$e" 2>&1; }
lanes=" ${LANES:-1 2} "
[[ $lanes = *" 1 "* ]] && { train; evaluate; } &
[[ $lanes = *" 2 "* ]] && { PASSES="1 2" bash results/table1/eval.sh results/table1 >> "$e" 2>&1
  bash results/table1/diag.sh >> "$e" 2>&1; train; evaluate; } &
wait
