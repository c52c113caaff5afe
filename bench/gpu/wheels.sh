#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), for Python 3.12 x86_64.
# The GPU image has torch, transformers, peft, triton, accelerate, pyarrow, rich, pyyaml,
# matplotlib, httpx, pytest...; what tunelab needs beyond that is listed here with the
# versions this repo is tested with.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
WHEELS=(
  gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 annotated-doc
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  openai==3.54.0 jiter==0.19.0 distro sniffio==1.3.1
  torchao==0.18.0
)
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do PLAT+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" -d .whl "${WHEELS[@]}"
du -sh .whl
