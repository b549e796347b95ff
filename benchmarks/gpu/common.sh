# Shared by benchmarks/gpu/run.sh and probe.sh (sourced): $OUT, the time budget, stage(), wheels.
# The device's copy of the tree carries an older git HEAD: pass GENFAST_COMMIT=<local short hash> in
# the command so the results JSON is named by the code that ran.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
START=$(date +%s); BUDGET_S=${BUDGET_S:-480}
now() { echo $(( $(date +%s) - START )); }
stage() {  # stage NAME MAX_S CMD...: SIGINT at the limit first, so pytest still writes its results
  local name=$1 max=$2; shift 2; local t=$(( BUDGET_S - $(now) - 10 )); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 15 ]; then echo "== $name: skipped, ${t}s left" >> "$OUT/summary.txt"; return; fi
  echo "== $name (<= ${t}s) at +$(now)s" >> "$OUT/summary.txt"
  timeout -s INT -k 20 "$t" "$@"; echo "== $name: rc=$? at +$(now)s" >> "$OUT/summary.txt"
}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
PY="python3 -P"  # -P: the checkout's genfast/ (no built modules) must not shadow the installed package
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >> "$OUT/summary.txt" 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried along (diffusers, liger-kernel): no registry there
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
