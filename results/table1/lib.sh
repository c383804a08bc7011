# Shared by results/table1/eval.sh, results/table1/diag.sh and results/seed_full/eval.sh (sourced, not run).
# finished_log LOG: LOG holds evaluate.py's finished table.
# finished ROOT: the run folders under ROOT that train to the end (done.txt) and have a best.pt.
# evaluate_once RUN LOG evaluate.py-flags...: evaluate RUN's best.pt (or MODEL) into RUN/LOG, one thread, unless LOG
# already holds a finished table (a rerun would rewrite it from the store, without AutoAttack's per-attack
# lines) or the other lane holds RUN (a flock on RUN/.eval.lock: one writer per store). The log is written
# as LOG.part and renamed once finished; a stop exits the calling script with 1. EVAL_FLAGS (e.g.
# "--data-dir .gpu/data") is added to every evaluate.py command.
finished_log() { grep -qiE '^flags( \(|:)' "$1" 2>/dev/null; }   # evaluate.py's table ends in its flags
finished() { for run in "$1"/*/; do run=${run%/}; [ -e "$run/done.txt" ] && [ -e "$run/best.pt" ] && echo "$run"; done; }
evaluate_once() {
  local run=$1 log=$2; shift 2
  finished_log "$run/$log" && return 0
  exec 8> "$run/.eval.lock"
  flock -n 8 || { echo "$(date -u +%FT%TZ) $run: the other lane evaluates it, next"; exec 8>&-; return 0; }
  echo "$(date -u +%FT%TZ) $run -> $log"
  OMP_NUM_THREADS=1 python evaluate.py "${MODEL:-$run/best.pt}" "$@" ${EVAL_FLAGS:-} > "$run/$log.part" 2>&1 < /dev/null &&
    mv "$run/$log.part" "$run/$log" || { echo "$run: $log stopped (its progress: $log.part)"; exit 1; }
  exec 8>&-
}
