#!/usr/bin/env bash
# One lent-GPU session in one command (the device tool's `run`): build genfast for the visible GPU,
# benchmark the hot paths while the GPU is quiet, run the GPU cases of the test suite, sanitize the
# CUDA kernels, then the rest of the suite if time is left. Logs and the benchmarks' results JSON
# (bench-results.tar) go to $OUT (default ./out), at most 8 files as the device tool returns.
#   BUDGET_S=480 SUITES="attention:150 modulate:50" bash benchmarks/gpu/run.sh
# Each stage gets at most its own limit and what is left of BUDGET_S, so the results always come back.
. "$(dirname "$0")/common.sh"
stage build 180 $PY -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1
(cd /tmp && $PY -c "import genfast, genfast._cuda; print('genfast', genfast.__version__, 'with genfast._cuda')") >> "$OUT/summary.txt" 2>&1 \
  || { tail -30 "$OUT/build.log"; cat "$OUT/summary.txt"; exit 1; }

mkdir -p /tmp/results
for spec in ${SUITES:-attention:150 modulate:50 attention_cuda:40}; do
  suite=${spec%%:*}; rm -f benchmarks/results/nvidia-*
  stage "bench $suite" "${spec##*:}" $PY -m pytest "benchmarks/test_$suite.py" ${BENCH_ARGS:---bench-quick} -s -q -p no:randomly >> "$OUT/bench.log" 2>&1
  for f in benchmarks/results/nvidia-*; do [ -f "$f" ] && cp "$f" "/tmp/results/$suite-$(basename "$f")"; done
  tar -C /tmp -cf "$OUT/bench-results.tar" results
done

XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
GPU_K='((cuda or triton) and not emu) or gpu'  # CUDA / Triton on CUDA tensors and every @gpu test; 12 workers, one GPU
stage "tests gpu" "${TESTS_MAX_S:-150}" $PY -m pytest tests $XDIST -v --tb=short -rfE -p no:randomly -k "$GPU_K" > "$OUT/tests.log" 2>&1
tail -30 "$OUT/tests.log" >> "$OUT/summary.txt"
if command -v compute-sanitizer >/dev/null; then
  stage "sanitize memcheck" 80 compute-sanitizer --tool memcheck --print-limit 20 $PY benchmarks/gpu/sanitize.py >> "$OUT/sanitize.log" 2>&1
  stage "sanitize racecheck" 80 compute-sanitizer --tool racecheck --print-limit 20 $PY benchmarks/gpu/sanitize.py --quick >> "$OUT/sanitize.log" 2>&1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|Invalid" "$OUT/sanitize.log" | head -20 >> "$OUT/summary.txt"
fi
stage "tests rest" 600 $PY -m pytest tests $XDIST -v --tb=short -rfE -p no:randomly -k "not ($GPU_K)" >> "$OUT/tests.log" 2>&1
tail -15 "$OUT/tests.log" >> "$OUT/summary.txt"
echo "done at +$(now)s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
