#!/usr/bin/env bash
# The GPU checks and benchmarks, in stages that each fit one 10-minute device call:
#   bench/gpu/suite.sh tests    # gpu-marked tests + Triton kernels on CUDA (no interpreter)
#   bench/gpu/suite.sh engine   # generate + engine throughput vs HF generate, 1B and 8B shapes
#   bench/gpu/suite.sh train    # LoRA training vs HF+PEFT, 1B (4x2048) and 8B (2x2048)
#   bench/gpu/suite.sh serve    # serving load sweep on the 1B shape
# Needs the carried folders made by bench/gpu/prepare.sh: run(..., carry=[".whl", ".gpu"]).
# Logs go to $OUT/<stage>.log (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: bench/gpu/suite.sh tests|engine|train|serve}
OUT=${OUT:-/tmp/tunelab-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
log="$OUT/$stage.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"
run() { echo "+ $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }
case $stage in
  tests)
    run python3 -m pytest -q -m gpu -p no:cacheprovider tests
    run python3 -m pytest -q -p no:cacheprovider tests/engine/test_triton_attention.py ;;
  engine)
    for shape in 1b 8b; do
      run python3 bench/generate_throughput.py --shape "$shape" --batch-sizes 1,64,256 \
        --prompt-len 256 --new-tokens 256 --repeats 1
      run python3 bench/engine_throughput.py --shape "$shape" --num-prompts 256 \
        --min-prompt-len 256 --max-prompt-len 256 --output-len 256 --batch-size 256
      run python3 bench/engine_throughput.py --shape "$shape" --num-prompts 1 \
        --min-prompt-len 256 --max-prompt-len 256 --output-len 256 --batch-size 1
    done ;;
  train)
    run python3 bench/train_lora.py --shape 1b --batch 4 --seq 2048 --grad-ckpt 1
    run python3 bench/train_lora.py --shape 1b --batch 2 --seq 2048 --grad-ckpt 0
    run python3 bench/train_lora.py --shape 8b --batch 2 --seq 2048 --grad-ckpt 1
    if [ -f .gpu/hf_peft_lora_train.py ]; then  # the reference baseline, same call
      BS=4 SEQ=2048 GC=1 run python3 .gpu/hf_peft_lora_train.py 1b
      BS=2 SEQ=2048 GC=1 run python3 .gpu/hf_peft_lora_train.py 8b
    fi ;;
  serve)
    run python3 bench/gpu/make_model.py 1b /tmp/llama-1b --tokenizer .gpu/tokenizer
    run python3 bench/serve_load.py --launch --model /tmp/llama-1b \
      --concurrency 1,8,32,64 --num-prompts 64 --max-tokens 128 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
