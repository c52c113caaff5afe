#!/usr/bin/env bash
# The GPU checks and benchmarks, in stages that each fit one 10-minute device call:
#   bench/gpu/suite.sh tests      # Triton kernels compiled on CUDA, then the gpu-marked tests
#   bench/gpu/suite.sh engine-1b  # generate + engine throughput vs HF generate, 1B shape
#   bench/gpu/suite.sh engine-8b  # the same, 8B shape
#   bench/gpu/suite.sh train-1b   # LoRA training vs HF+PEFT, 1B (4x2048 and 2x2048)
#   bench/gpu/suite.sh train-8b   # the same, 8B (2x2048)
#   bench/gpu/suite.sh serve      # serving load sweep on the 1B shape
#   bench/gpu/suite.sh owed       # the owed issue figures in ONE call (see below)
# (engine / train run both shapes, for sessions with time to spare.) With only ~15 minutes of
# device time (machine start included, and a machine idle for 30 s goes back), run `owed`:
# kernel tests, the engine at batch 1 (roofline) and 256 (vs HF), LoRA training vs HF+PEFT
# on the 1B shape, then the rest of the gpu tests, each skipped once the call's BUDGET
# seconds (default 540) run out.
# Each command is cut at STEP_TIMEOUT seconds (default 540) and at what is left of BUDGET; the
# exit code is the first failing command's, so an early failure is not hidden by a later
# success.
# Needs the carried folders made by bench/gpu/prepare.sh: run(..., carry=[".whl", ".gpu"])
# (WHEELS_DIR names another wheel folder; a missing one installs nothing).
# Logs go to $OUT/<stage>.log (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: bench/gpu/suite.sh owed|tests|engine[-1b|-8b]|train[-1b|-8b]|serve}
OUT=${OUT:-/tmp/tunelab-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
wheels=${WHEELS_DIR:-.whl}
if [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
log="$OUT/$stage.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"
status=0
deadline=${BUDGET:-540}  # seconds since the script started (SECONDS): the install counts too
run() {
  local left=$((deadline - SECONDS)) limit=${STEP_TIMEOUT:-540}
  if [ "$left" -lt 20 ]; then echo "- skipped (out of BUDGET): $*" | tee -a "$log"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "+ $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "! exit $rc: $*" | tee -a "$log"; [ "$status" -eq 0 ] && status=$rc; fi
}
engine() {  # $1: shape (each script builds its own random-init model of that shape)
  run python3 bench/generate_throughput.py --shape "$1" --batch-sizes 1,64,256 \
    --prompt-len 256 --new-tokens 256 --repeats 1
  run python3 bench/engine_throughput.py --shape "$1" --num-prompts 256 \
    --min-prompt-len 256 --max-prompt-len 256 --output-len 256 --batch-size 256
  run python3 bench/engine_throughput.py --shape "$1" --num-prompts 1 \
    --min-prompt-len 256 --max-prompt-len 256 --output-len 256 --batch-size 1
}
# The ours/HF ratio for the issue comes from train_lora.py's own hf+peft row (same process,
# same settings, fused AdamW on both). The shared script is the performance.md reference run,
# reproduced for comparison with the doc's table (its printed mfu6N is not the doc's formula).
# The generate/engine figures are single runs (--repeats 1) to fit the device budget.
train() {
  case $1 in
    1b) run python3 bench/train_lora.py --shape 1b --batch 4 --seq 2048 --grad-ckpt 1
        run python3 bench/train_lora.py --shape 1b --batch 2 --seq 2048 --grad-ckpt 0
        [ -f .gpu/hf_peft_lora_train.py ] && BS=4 SEQ=2048 GC=1 run python3 .gpu/hf_peft_lora_train.py 1b ;;
    8b) run python3 bench/train_lora.py --shape 8b --batch 2 --seq 2048 --grad-ckpt 1
        [ -f .gpu/hf_peft_lora_train.py ] && BS=2 SEQ=2048 GC=1 run python3 .gpu/hf_peft_lora_train.py 8b ;;
  esac
}
case $stage in
  tests)  # kernels first: a device fault poisons the process, and this pins it to a kernel
    run python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_triton_attention.py
    run python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
  owed)
    run python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_triton_attention.py
    run python3 bench/engine_throughput.py --shape 1b --num-prompts 1 \
      --min-prompt-len 256 --max-prompt-len 256 --output-len 256 --batch-size 1
    run python3 bench/engine_throughput.py --shape 1b --num-prompts 256 \
      --min-prompt-len 256 --max-prompt-len 256 --output-len 256 --batch-size 256
    run python3 bench/train_lora.py --shape 1b --batch 4 --seq 2048 --grad-ckpt 1
    run python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
  engine-1b) engine 1b ;;
  engine-8b) engine 8b ;;
  engine) engine 1b; engine 8b ;;
  train-1b) train 1b ;;
  train-8b) train 8b ;;
  train) train 1b; train 8b ;;
  serve)
    run python3 bench/gpu/make_model.py 1b /tmp/llama-1b --tokenizer .gpu/tokenizer
    run python3 bench/serve_load.py --launch --model /tmp/llama-1b \
      --concurrency 1,8,32,64 --num-prompts 64 --max-tokens 128 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
exit $status
