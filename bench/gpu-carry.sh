#!/usr/bin/env bash
# Gathers here what a lent GPU host lacks for `python -m bench.gpu`, into .carry/ (ignored by git), so
# that a device session spends its minutes measuring, not installing: cp312 wheels of darkroom's
# dependencies that the host's image does not hold, at the versions this checkout's venv runs (`make
# install` first), and a redis-server with the libraries it links beyond the C runtime.
# bench/gpu-host.sh is the other half, run there. docs/gpu-bench.md says why each step is needed.
#
#   bash bench/gpu-carry.sh            # then, on the host: bash bench/gpu-host.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.carry
VENV_PY=${VENV_PY:-.venv/bin/python}
# The host's Python (the one that holds its torch; see the device tool's KINDS.md).
HOST_PYTHON_VERSION=${HOST_PYTHON_VERSION:-3.12}
# Not in the host's image, or needed at another version there. Its own packages (torch, transformers,
# accelerate, safetensors, numpy, pillow, httpx, rich, prometheus-client, opencv-python-headless, peft,
# uvloop, click, pyyaml) are used as they are. boto3 is left behind: the benchmark stores on local disk, and
# botocore alone is 17 MB of the 64 MiB that a device call carries.
WANTED=(
  diffusers importlib_metadata lazy-importer fastapi opentelemetry-api starlette uvicorn httptools pydantic pydantic_core pydantic-settings
  python-dotenv typing-inspection typing_extensions annotated-types annotated-doc python-multipart
  sse-starlette sqlalchemy greenlet alembic Mako psycopg psycopg-binary psycopg-pool celery kombu billiard
  vine amqp click-didyoumean click-plugins click-repl prompt_toolkit wcwidth tzlocal tzdata redis hiredis
  tenacity invisible-watermark PyWavelets
)

[ -x "$VENV_PY" ] || { echo "no $VENV_PY: run make install first (its versions are the ones carried)" >&2; exit 1; }
mkdir -p .git/info
grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/redis"

# name==version for each wanted distribution the venv has (one it lacks is not needed at run time).
pins=$("$VENV_PY" - "${WANTED[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
)
# pip matches each manylinux tag exactly: list the ones these wheels are built for.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# shellcheck disable=SC2086 # one argument per pin
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$HOST_PYTHON_VERSION" \
  --implementation cp "${platforms[@]}" -d "$CARRY/wheels" $pins

# redis-server and the shared libraries it needs, less the C runtime the host has (a newer one: glibc
# runs programs linked against older versions of itself, not the other way round).
server=$(command -v redis-server)
cp "$server" "$CARRY/redis/redis-server.bin"
ldd "$server" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
  libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux* | libstdc++.so.* | libgcc_s.so.*) ;;
  *) cp -L "$lib" "$CARRY/redis/" ;;
  esac
done
cat >"$CARRY/redis/redis-server" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
EOF
chmod +x "$CARRY/redis/redis-server"

echo "$(ls "$CARRY/wheels" | wc -l) wheels, redis-server with $(ls "$CARRY/redis" | grep -c '\.so') libraries;" \
  "$(du -sh "$CARRY" | cut -f1) in $CARRY (the device tool carries 64 MiB at most, the tree included)"
