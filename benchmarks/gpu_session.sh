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
# Three more, not in the default: cpp (a CUDA .pt2, frozen and plastic, checked by the C++ program
# built against this host's LibTorch; runs beside the others, on the CPU cores, in $OUT/cpp.log),
# ort (onnxruntime's providers; the CUDA ones' tests where onnxruntime-gpu is installed), cohorts
# (throughput of the paper's protocols trained as cohorts of COHORT runs: Split MNIST's paper grid,
# the trace study on Permuted MNIST, a slice of Imbalanced Permuted MNIST; summaries and logs in
# $OUT/cohorts.tgz, for runs/hour per benchmark).
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
cpp_check() {  # train 1 epoch, export .pt2 for CUDA (frozen, plastic), build dhp_check, check both
  local run=/tmp/dhp-cpp-run bundles=/tmp/dhp-cpp-bundles build=/tmp/dhp-cpp-build
  dhp-train --benchmark split-mnist --method finetune --dhp --epochs 1 --device "${DEVICE:-cuda}" \
    --out $run --overwrite | tail -1
  cmake -S serve/cpp -B $build -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
  cmake --build $build -j 6 2>&1 | tail -3
  for kind in frozen plastic; do
    flag=$([ $kind = plastic ] && echo --plastic)
    local t0=$SECONDS
    dhp-export $run --format pt2 --pt2-device "${DEVICE:-cuda}" $flag \
      --out $bundles/$kind --overwrite | tail -1
    echo "export $kind: $((SECONDS - t0)) s"
    for backend in pt2 torchscript; do
      [ $backend = torchscript ] && dhp-export $run --format torchscript $flag \
        --out $bundles/$kind-ts --overwrite >/dev/null && bundle=$bundles/$kind-ts
      [ $backend = pt2 ] && bundle=$bundles/$kind
      echo "dhp_check $kind $backend ${DEVICE:-cuda}:"; $build/dhp_check $bundle --backend $backend --device "${DEVICE:-cuda}"
      echo "exit $?"
    done
  done
}
if wants cpp; then
  section "cpp: CUDA .pt2 and TorchScript from C++ (in the background, log in cpp.log)"
  (cpp_check > "$OUT/cpp.log" 2>&1) &
  cpp_pid=$!
fi
if wants ort; then
  section "onnxruntime providers"
  $PY -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'
  if $PY -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    timeout 240 $PY -m pytest -q -rs -p no:cacheprovider tests/test_runtime.py tests/test_plastic.py -k "onnxruntime_cuda or cuda_torchscript or on_cuda"
  else
    echo "no CUDAExecutionProvider: onnxruntime-gpu is not installed here"
  fi
fi
if wants cohorttest; then
  section "the cohort's CUDA test"
  timeout 120 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cohort.py -m gpu
fi
cohort_grid() {  # NAME TIMEOUT_S reproduce.py-arguments...: one timed grid of cohorts
  local name=$1 limit=$2; shift 2
  section "cohorts: $name"
  local start=$SECONDS
  timeout "$limit" $PY benchmarks/reproduce.py "$@" --device "${DEVICE:-cuda}" \
    --cohort "${COHORT:-10}" --runs /tmp/cohort-runs/$name \
    --summaries /tmp/cohort-results/$name --strengths docs/results/strengths.json \
    ${COHORT_ARGS:-} 2>&1 | grep -v "^  task"
  local rc=${PIPESTATUS[0]}
  echo "$name: wall $((SECONDS - start)) s (exit $rc)"
}
if wants cohorts; then
  cohort_grid split-paper "${SPLIT_S:-100}" grid --benchmarks split-mnist --variants paper --seeds 0-4
  cohort_grid permuted-trace "${PERMUTED_S:-200}" trace --seeds 0-4
  cohort_grid imbalanced "${IMBALANCED_S:-90}" grid --benchmarks imbalanced-permuted-mnist \
    --variants finetune,si,dhp,dhp+si --seeds 0-2
  (cd /tmp && tar czf "$OUT/cohorts.tgz" cohort-results \
     $(find cohort-runs -name metrics.json -o -name config.json))
fi
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
if [ -n "${cpp_pid:-}" ]; then  # at most CPP_WAIT seconds more for the C++ checks
  for _ in $(seq "${CPP_WAIT:-120}"); do kill -0 $cpp_pid 2>/dev/null || break; sleep 1; done
  kill $cpp_pid 2>/dev/null && echo "cpp checks cut after waiting ${CPP_WAIT:-120} s"
  section "cpp.log"; cat "$OUT/cpp.log"
fi
section "done"
tar czf "$OUT/results.tgz" docs/results
