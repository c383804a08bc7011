#!/usr/bin/env bash
# The whole study on a 2-core CPU, one single-threaded job per core, resumable across working sessions.
# Both lanes share one training queue (run.sh) and one evaluation queue (eval.sh): a run or a store that
# one lane holds, the other skips.
#   lane 1: train, then evaluate;
#   lane 2: the eps-0.4 tests and the robustness curves (eval.sh passes 4 and 5; each store keeps what
#           earlier sessions computed and goes on from there), then evaluate what has finished training
#           (each row's seeds land as they come), then train what is left, then evaluate the rest;
#   evaluate: eval.sh passes 1 and 2 on the seed-0 rows and on the seeds of results/table1/seeds, the
#           5-epoch seeds (results/seed_full/eval.sh), then eval.sh passes 3-5.
# Stop it all with `kill -TERM -- -PGID` (training saves after the step; an evaluation keeps its finished
# batches); start it again with the same line (LANES=2 starts lane 2 alone, e.g. to restart one lane):
#   setsid bash results/table1/queue.sh > /dev/null 2>&1 < /dev/null &
set -u
cd "$(dirname "$0")/../.."
q=results/table1/queue.log e=results/table1/eval_queue.log
train() { LANE=1 bash results/table1/run.sh results/table1 results/seed_full >> "$q" 2>&1; }
evaluate() { PASSES="1 2" bash results/table1/eval.sh results/table1 >> "$e" 2>&1 &&
  PASSES="1 2" bash results/table1/eval.sh results/table1/seeds >> "$e" 2>&1 &&
  bash results/seed_full/eval.sh results/seed_full >> "$e" 2>&1 &&
  PASSES="3 4 5" bash results/table1/eval.sh results/table1 >> "$e" 2>&1; }
lanes=" ${LANES:-1 2} "
[[ $lanes = *" 1 "* ]] && { train; evaluate; } &
[[ $lanes = *" 2 "* ]] && { PASSES="4 5" bash results/table1/eval.sh results/table1 >> "$e" 2>&1
  evaluate; train; evaluate; } &
wait
