#!/usr/bin/env bash
# A lent-GPU probe in one command: Triton attention correctness per (kernel, config, head dim,
# stride class) and a tile sweep, the Triton modulate launch sweep, the GPU cases of the test suite
# and chosen benchmarks. The build runs in the background while the Triton-only probes (which import
# kernels/ directly) use the GPU. At most 8 files come back in $OUT.
#   BUDGET_S=450 MATRIX="64p8 72 72p8 80 80p8" SWEEP="64 128" TESTS_MAX_S=130 \
#     EXTRA="python3 -P benchmarks/gpu/triton_attention_diag.py bench" \
#     BENCH="benchmarks/test_attention.py -k dit_block" bash benchmarks/gpu/probe.sh
# TEST_FILES (default tests) narrows the GPU test stage to some files.
. "$(dirname "$0")/common.sh"
stage build 200 $PY -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1 &
BUILD=$!
D=benchmarks/gpu
[ -n "${MATRIX:-}" ] && stage "triton matrix $MATRIX" 110 $PY $D/triton_attention_diag.py matrix $MATRIX > "$OUT/matrix.log" 2>&1
[ -n "${SWEEP:-}" ] && stage "triton sweep $SWEEP" 110 $PY $D/triton_attention_diag.py sweep $SWEEP > "$OUT/sweep.log" 2>&1
[ -n "${MODSWEEP-1}" ] && stage "modulate sweep" 40 $PY $D/modulate_sweep.py >> "$OUT/sweep.log" 2>&1
wait $BUILD
(cd /tmp && $PY -c "import genfast, genfast._cuda; print('genfast', genfast.__version__, 'with genfast._cuda')") >> "$OUT/summary.txt" 2>&1 \
  || { tail -30 "$OUT/build.log"; cat "$OUT/summary.txt"; exit 1; }
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
GPU_K='((cuda or triton) and not emu) or gpu'
if [ -n "${TESTS_MAX_S:-}" ]; then
  # xdist has hung at exit after printing its summary (sessions 6, 17): end pytest once the summary is out
  ( while sleep 3; do grep -qE '^=+ .* in [0-9.]+s' "$OUT/tests.log" 2>/dev/null || continue
      sleep 5; pkill -INT -f "pytest ${TEST_FILES:-tests}"; sleep 10; pkill -9 -f "pytest ${TEST_FILES:-tests}"; break; done ) &
  WATCH=$!
  stage "tests gpu" "$TESTS_MAX_S" $PY -m pytest ${TEST_FILES:-tests} $XDIST -v --tb=short -rfE -p no:randomly -k "$GPU_K" > "$OUT/tests.log" 2>&1
  kill $WATCH 2>/dev/null
fi
# -v: each result is logged when it lands, so failures keep their names even if a worker hangs at exit
[ -f "$OUT/tests.log" ] && { grep -E "^\[gw[0-9]+\].*(FAILED|ERROR)|^(FAILED|ERROR) " "$OUT/tests.log" | head -30
                             tail -3 "$OUT/tests.log"; } >> "$OUT/summary.txt"
[ -n "${EXTRA:-}" ] && stage "extra" ${EXTRA_MAX_S:-120} bash -c "$EXTRA" >> "$OUT/sweep.log" 2>&1
if [ -n "${BENCH:-}" ]; then
  rm -f benchmarks/results/nvidia-*
  stage "bench $BENCH" 300 bash -c "$PY -m pytest $BENCH ${BENCH_ARGS:---bench-quick} -s -q -p no:randomly" > "$OUT/bench.log" 2>&1
  mkdir -p /tmp/results && cp benchmarks/results/nvidia-* /tmp/results/ 2>/dev/null; tar -C /tmp -cf "$OUT/bench-results.tar" results
fi
echo "done at +$(now)s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
