#!/usr/bin/env bash
# On a lent GPU host, from the repository root: installs what bench/gpu-carry.sh gathered beside the
# host's own packages, runs `python -m bench.gpu` on the carried redis-server, and leaves its output
# under $OUT: the figures (bench.log, whose last line is the JSON), the card and versions (host.txt), and
# the worker and API logs of each architecture (each call's size and time, each batch's storing).
# Arguments go to bench.gpu, e.g. `--arch sd15 --no-restart`. With the device tool:
#   run(command="bash bench/gpu-host.sh", carry=[".carry"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=${CARRY:-.carry}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/darkroom-gpu-out}
WORKDIR=${WORKDIR:-/tmp/darkroom-gpu}
# A rerun on a warm host starts afresh too: the same database, logs and compile cache would carry over.
rm -rf "$WORKDIR"
mkdir -p "$OUT"

if [ -d "$CARRY/wheels" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  nproc
  "$PYTHON" -c 'import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)'
  git log -1 --format='%h %s' 2>/dev/null || true
} >"$OUT/host.txt" 2>&1

redis=${REDIS_SERVER:-$CARRY/redis/redis-server}
PYTHONUNBUFFERED=1 "$PYTHON" -m bench.gpu --redis-server "$redis" --workdir "$WORKDIR" "$@" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}

# At most 8 files come back from $OUT: host.txt, bench.log and these.
for arch in sd15 sdxl; do
  for part in worker api; do
    [ -f "$WORKDIR/$arch/$part.log" ] && cp "$WORKDIR/$arch/$part.log" "$OUT/$arch-$part.log"
  done
done
exit "$status"
