#!/usr/bin/env bash
# The device command for one GPU lease (see train/lease.py for what to carry). Phase 1: each group of
# train/plans/gpu.json, and the report table's baseline rows, as its own process on the one GPU. Phase 2,
# once the Lite groups are done: distil the best of them into the students. Then the runs are packed
# into $OUT. Every group stops by its deadline; `timeout` is only the backstop.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[lease +$(( $(date +%s) - T0 ))s] $*"; }
if [ -z "${LEASE_LOCAL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .gpu/data ] || [ ! -f .gpu/data.zip ] || python3 -m zipfile -e .gpu/data.zip .gpu/ || exit 1
export KERAS_BACKEND=jax CXR_EDGE_DATA=${CXR_EDGE_DATA:-.gpu/data/chest_xray} CXR_EDGE_CACHE=${CXR_EDGE_CACHE:-.gpu/cache} \
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 CXR_EDGE_JAX_CACHE=/tmp/jax-cache TF_CPP_MIN_LOG_LEVEL=3
PLAN=${LEASE_PLAN:-train/plans/gpu.json}
P1=${LEASE_P1:-300}   # backstop for the phase-1 Lite groups (their deadline_s is 170)
P2=${LEASE_P2:-280}   # backstop for the phase-2 students
DN=${LEASE_DN:-430}   # backstop for DenseNet201 (deadline_s 330)
nvidia-smi -L 2>/dev/null
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
run_group() {  # name timeout args...
  local g=$1 t=$2; shift 2
  ( timeout "$t" python3 -m train "$@" 2>&1 | grep --line-buffered -v -e "^\s*$" -e "^I0000" -e "^W0000" \
      | sed -u "s/^/[$g] /" ) >> "$OUT/train.log"
}
say "phase 1"
for g in ${LEASE_DENSENET-dn-report dn-adam}; do
  run_group "$g" "$DN" plan "$PLAN" --only "$g" ${LEASE_SET:+--set $LEASE_SET} &
done
[ -n "${LEASE_NO_BASELINE:-}" ] || run_group baseline "$DN" plan train/plans/report_table.json --only r01-baseline-128 r02-baseline-128-bn r03-baseline-128-do0.2 r04-baseline-128-do0.5 r05-baseline-128-do0.8 r06-baseline-224 r07-baseline-128-bn-do0.5-aug --set deadline_s=${LEASE_BASE_S:-30} ${LEASE_SET:+$LEASE_SET} &
LITE=()
for g in ${LEASE_LITE-lite0 lite0cw lite1 lite2}; do
  run_group "$g" "$P1" plan "$PLAN" --only "$g" ${LEASE_SET:+--set $LEASE_SET} &
  LITE+=($!)
done
wait "${LITE[@]}"
TEACHERS=${LEASE_TEACHERS:-$(python3 -m train.lease teachers --top ${LEASE_TOP:-3})}  # or given: a soft-target file
# model bundles that teach too (the shipped cxr_edge/models/default, say), comma-separated
[ -z "$TEACHERS" ] || [ -z "${LEASE_EXTRA_TEACHERS:-}" ] || TEACHERS="$TEACHERS,$LEASE_EXTRA_TEACHERS"
say "phase 2, teachers: $TEACHERS"
if [ -n "$TEACHERS" ]; then
  for g in ${LEASE_STUDENTS:-distill0 distill2}; do
    run_group "$g" "$P2" plan "$PLAN" --only "$g" --set teachers="$TEACHERS" ${LEASE_SET:+$LEASE_SET} &
  done
fi
wait
say "training done"
grep -h -e "best epoch" -e "probe" -e "Error" -e "error" "$OUT/train.log" | tail -n 40
python3 -m train.lease pack "$OUT" --budget-mib ${LEASE_BUDGET_MIB:-60}
say "packed"
ls -la "$OUT"
