#!/usr/bin/env bash
# The device command for one GPU lease (see train/lease.py). Each group of train/plans/gpu.json runs as
# its own process on the one GPU; all stop by LEASE_TRAIN_S seconds, then the best runs are packed.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
[ -n "${LEASE_LOCAL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax CXR_EDGE_DATA=.gpu/data/chest_xray \
  CXR_EDGE_CACHE=.gpu/cache XLA_PYTHON_CLIENT_MEM_FRACTION=${LEASE_MEM_FRACTION:-0.3} PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
for g in ${LEASE_GROUPS:-densenet lite0 lite2}; do
  ( timeout "${LEASE_TRAIN_S:-470}" python3 -m train plan "${LEASE_PLAN:-train/plans/gpu.json}" --only "$g" \
      ${LEASE_SET:+--set $LEASE_SET} 2>&1 | grep --line-buffered -v "^\s*$" | sed -u "s/^/[$g] /" ) >> "$OUT/train.log" &
done
wait
tail -n 60 "$OUT/train.log"
python3 -m train.lease pack "$OUT"
ls -la "$OUT"
