#!/usr/bin/env bash
# The whole study on a 2-core CPU, one single-threaded job per core, resumable across working sessions.
# Both lanes share one training queue (run.sh) and one evaluation queue (eval.sh): a run or a store that
# one lane holds, the other skips. Lane 1 trains, then evaluates. Lane 2 first evaluates every finished run
# (eval.sh: its store keeps what earlier sessions computed and goes on from there) and runs diag.sh, then
# trains what is left, then evaluates what finished meanwhile; both end with the seeds' evaluation
# (results/seed_full/eval.sh).
# Stop it all with `kill -TERM -- -PGID` (training saves after the step; an evaluation keeps its finished
# batches); start it again with the same line:
#   setsid bash results/table1/queue.sh > /dev/null 2>&1 < /dev/null &
set -u
cd "$(dirname "$0")/../.."
q=results/table1/queue.log e=results/table1/eval_queue.log
train() { LANE=1 bash results/table1/run.sh results/table1 results/seed_full >> "$q" 2>&1; }
evaluate() { bash results/table1/eval.sh results/table1 >> "$e" 2>&1 && bash results/seed_full/eval.sh results/seed_full >> "$e" 2>&1; }
{ train; evaluate; } &
{ bash results/table1/eval.sh results/table1 >> "$e" 2>&1; bash results/table1/diag.sh >> "$e" 2>&1; train; evaluate; } &
wait
