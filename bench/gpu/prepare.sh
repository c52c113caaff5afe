#!/usr/bin/env bash
# Run here (CPU machine) before a GPU session: fetch the wheels the GPU image lacks into .whl/
# and copy the default model's tokenizer into .gpu/ (both git-ignored), so that
#   run(command="bench/gpu/suite.sh STAGE", carry=[".whl", ".gpu"])
# finds everything it needs on a machine with no network.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info
for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
bench/gpu/wheels.sh
PY=${PY:-.venv/bin/python}
src=$($PY -c "from tunelab.hub import resolve_model; print(resolve_model('default'))")
mkdir -p .gpu/tokenizer
for f in tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$src/$f" ] && cp "$src/$f" .gpu/tokenizer/
done
# The issue's HF+PEFT reference script, run by `suite.sh train` beside ours.
baseline=../shared/bench/hf_peft_lora_train.py
[ -f "$baseline" ] && cp "$baseline" .gpu/
du -sh .whl .gpu
