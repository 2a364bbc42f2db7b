#!/usr/bin/env bash
# The GPU checks in one sitting on a CUDA host (a borrowed machine: minutes, not hours), run from
# the repository root:
#   1. the CUDA tests (pytest -m gpu): CPU/GPU parity, no host sync over a training epoch;
#   2. GPU figures: bench_layer (lean vs autograd step, CUDA-graph replay, host syncs),
#      bench_train (the full Split MNIST protocol on the GPU, eager and as CUDA graphs, against
#      the GPU's fp32 peak), one dhp-train run on CUDA, and bench_grid: runs/hour of a grid one
#      run at a time vs --cohort 8 (8 runs trained as one vectorised model);
#   3. with the time left (GRID_MINUTES), the Permuted MNIST strength search of the paper
#      protocol and then grid runs (GRID_VARIANTS), GRID_JOBS processes sharing the GPU.
# Every file it makes lands in $OUT: log.txt, bench_train.json, results.tgz (run summaries and
# strengths.json, the same files a CPU grid writes, to unpack over docs/results).
#
#   OUT=/tmp/gpu DHP_DATA_DIR=/path/to/data bash benchmarks/gpu_session.sh
# PARTS (default "tests bench search grid") picks the sections, e.g. PARTS=grid for grid runs only.
# Measured on an H200 (2026-11-27): tests ~7 min (the serving tests' exports on the device ~2.5,
# the cohort's 0.5), bench ~5 min. A lease of 15 minutes with at most 10 per command fits two
# calls: PARTS=tests, then PARTS=bench.
set -u
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
GRID_MINUTES=${GRID_MINUTES:-5}
GRID_JOBS=${GRID_JOBS:-12}
GRID_VARIANTS=${GRID_VARIANTS:-ewc,dhp+ewc,online-ewc,dhp+online-ewc,si,dhp+si,mas,dhp+mas}
GRID_BENCHMARKS=${GRID_BENCHMARKS:-permuted-mnist,imbalanced-permuted-mnist}
PARTS=${PARTS:-tests bench search grid}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee -a "$OUT/log.txt") 2>&1

section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
deadline=$(( $(date +%s) + 60 * GRID_MINUTES ))

section "host"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
# The console scripts the tests call (dhp-train, dhp-export, dhp-serve), without dependencies.
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "pip install failed"

wants() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if wants tests; then
section "CUDA tests"
timeout "${TESTS_TIMEOUT:-540}" $PY -m pytest -q -rsP -m gpu -p no:cacheprovider tests

fi
if wants bench; then
section "bench_layer --device cuda"
timeout 120 $PY benchmarks/bench_layer.py --device cuda --iters 200 --rounds 9

section "bench_train --device cuda (Split MNIST, 5 tasks x 10 epochs)"
timeout 200 $PY benchmarks/bench_train.py --device cuda --steps lean,graphed \
  --methods finetune finetune+dhp si+dhp --json "$OUT/bench_train.json"

section "dhp-train --device cuda (deterministic kernels, CUDA graphs), Split MNIST DHP"
timeout 60 dhp-train --benchmark split-mnist --method finetune --dhp --device cuda \
  --out /tmp/dhp-gpu-run --overwrite 2>&1 | grep -v "^task" | tail -8
$PY -c 'import json; t = json.load(open("/tmp/dhp-gpu-run/metrics.json"))["timings"]; print(t)'

section "bench_grid --device cuda: 16 Split MNIST runs (paper protocol), one by one vs --cohort 8"
timeout 300 $PY benchmarks/bench_grid.py --device cuda --jobs 1 --cohort 8 --epochs 10 \
  --json "$OUT/bench_grid.json"
fi

minutes_left() { echo $(( (deadline - $(date +%s)) / 60 )); }
section "Permuted MNIST strength search, paper protocol ($(minutes_left) min left)"
if wants search && [ "$(minutes_left)" -ge 2 ]; then
  timeout $(( deadline - $(date +%s) )) $PY benchmarks/reproduce.py search \
    --benchmark permuted-mnist --device cuda --jobs "$GRID_JOBS"
fi
section "grid: $GRID_VARIANTS ($(minutes_left) min left)"
# Only with the paper protocol's own strengths (else the grid would borrow another protocol's).
searched=$($PY -c 'import json; print(len(json.load(open("docs/results/strengths.json"))
                                          .get("permuted-mnist", {})))')
if wants grid && [ "$searched" = 4 ] && [ "$(minutes_left)" -ge 2 ]; then
  timeout $(( deadline - $(date +%s) )) $PY benchmarks/reproduce.py grid \
    --benchmarks "$GRID_BENCHMARKS" --variants "$GRID_VARIANTS" \
    --device cuda --jobs "$GRID_JOBS" --stop-after $(( $(minutes_left) - 1 ))
fi
section "done"
tar czf "$OUT/results.tgz" docs/results
