#!/usr/bin/env bash
# MNIST Table 1 under today's default CAT (logit wall on), in the setup of the AT(0.3) and TRADES(0.3)
# rows in results/mnist_*: full training split, --epochs 10 --milestones 8, seed 0, the paper's settings
# otherwise (TRADES(0.4) with the flags that gave TRADES(0.3) the CAT settings: 20 steps of eps/20, batch
# 100, Adam 1e-3, beta 1); then seeds 2-4 of the 5-epoch default study (into results/seed_full, in its
# setup: --epochs 5 --val-size 500). One queue, in this order: CAT_cent(0.3), CAT_cw(0.3), CAT_cent(0.4),
# CAT_cw(0.4), TRADES(0.4), seeds 2, 3, 4. Two lanes (two single-threaded runs at once) work through it:
# each takes the next run that is neither finished nor held by the other lane (a flock on the run's .lock,
# released when its process ends, so a killed lane leaves no stale lock).
# Every run starts fresh, or resumes where its last.pt stopped (a session's end: SIGTERM saves after the
# step), or is skipped when finished (its done.txt). A finished run keeps best.pt, slimmed to the model
# (checkpoints.slim), to commit; its last.pt goes. Stop the whole study with `kill -TERM -- -PGID`.
#   bash results/table1/run.sh results/table1 results/seed_full >> results/table1/queue.log 2>&1 &
# LANE=1 runs one lane only (the other core then free, e.g. for results/table1/eval.sh).
#   EXTRA="--subset 100 --steps 1 --val-size 50" bash results/table1/run.sh /tmp/dry /tmp/dry   # a dry run
# Precision: --amp fp32. --amp auto took bf16 on the 2-core Xeon used (AVX-512 without AVX512-BF16,
# where oneDNN emulates bf16) and ran 23 img/s against fp32's 70 img/s there.
set -u
root=${1:-results/table1} seeds=${2:-results/seed_full}
run() { # folder, epochs, train.py flags...
  local out=$1 epochs=$2; shift 2
  [ -e "$out/done.txt" ] && return 0
  mkdir -p "$out" && exec 9> "$out/.lock"
  flock -n 9 || { echo "$(date -u +%FT%TZ) $out: the other lane has it, next"; exec 9>&-; return 0; }
  local how=(--overwrite "$@" ${EXTRA:-})
  [ -e "$out/last.pt" ] && how=(--resume)
  echo "$(date -u +%FT%TZ) $out: ${how[*]}"
  OMP_NUM_THREADS=1 python train.py --dataset mnist --epochs "$epochs" --out "$out" "${how[@]}" \
    >> "$out/train.log" 2>&1 < /dev/null
  local rc=$?
  if [ $rc -eq 0 ]; then   # finished: best.pt keeps the model only, last.pt (for --resume) goes, then done.txt
    python -c 'import sys, checkpoints; checkpoints.slim(sys.argv[1])' "$out/best.pt" && rm -f "$out/last.pt" &&
      date -u +%FT%TZ > "$out/done.txt" || rc=1
  else echo "$out stopped (exit $rc)"; fi
  exec 9>&-
  return $rc
}
table() { # name, eps, train.py flags...
  local name=$1 eps=$2; shift 2
  run "$root/$name" 10 --milestones 8 --seed 0 --eps "$eps" --amp fp32 "$@"
}
seed() { run "$seeds/wall_s$1" 5 --seed "$1" --val-size 500 --amp fp32; }
# Seeds 1 and 2 of five Table 1 rows, in the setup of their seed-0 rows, into $root/seeds/NAME_sSEED.
adam=(--steps 20 --batch-size 100 --optimizer adam --lr 1e-3)
three() { # name, eps, train.py flags...: seeds 1 and 2
  local name=$1 eps=$2; shift 2
  for s in 1 2; do
    run "$root/seeds/${name}_s$s" 10 --milestones 8 --seed "$s" --eps "$eps" --alpha "$(python3 -c "print($eps / 20)")" \
      --amp fp32 "$@" || return 1
  done
}
seeds3() {
  three cat_cent_0.3 0.3 --method cat --attack cent && three at_0.3 0.3 --method at "${adam[@]}" &&
    three trades_0.3 0.3 --method trades --beta 1 "${adam[@]}" && three cat_cent_0.4 0.4 --method cat --attack cent &&
    three trades_0.4 0.4 --method trades --beta 1 "${adam[@]}"
}
queue() {
  table cat_cent_0.3 0.3 --method cat --attack cent && table cat_cw_0.3 0.3 --method cat --attack cw &&
    table cat_cent_0.4 0.4 --method cat --attack cent && table cat_cw_0.4 0.4 --method cat --attack cw &&
    table trades_0.4 0.4 --method trades --beta 1 --steps 20 --alpha 0.02 --batch-size 100 --optimizer adam \
      --lr 1e-3 && seed 2 && seed 3 && seed 4 && seeds3
}
queue &
[ "${LANE:-both}" = both ] && queue &
wait
