"""LoRA training throughput: tunelab's step vs HF transformers + PEFT, same shapes, one run.

Both sides: random-init Llama-shaped model, bf16 (fp32 on CPU), LoRA r=16 on all linear
layers, AdamW, batch x seq random tokens, loss on every token. Reports tokens/s, MFU
(4N + attention, the project's formula), peak memory and the ratio.

    python bench/train_lora.py --shape 1b --batch 4 --seq 2048 --grad-ckpt 1   # H100
    python bench/train_lora.py --shape tiny --device cpu --steps 3                # smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import transformers

from tunelab import device as dev
from tunelab.hardware import peak_flops
from tunelab.models.attention import CAUSAL, DenseAttention
from tunelab.models.config import ModelConfig
from tunelab.models.decoder import Decoder
from tunelab.models.lora import LoraConfig, apply_lora, lora_modules
from tunelab.train.loss import chunked_cross_entropy
from tunelab.train.metrics import flops_per_token

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                 tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(shape: str) -> transformers.LlamaConfig:
    cfg = transformers.LlamaConfig(
        **SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def time_steps(step, n_warmup: int, n: int, device: torch.device) -> list[float]:
    for _ in range(n_warmup):
        step()
    dev.synchronize(device)
    dev.reset_peak_memory(device)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        dev.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def init_like_hf(model: torch.nn.Module, std: float) -> None:
    """HF's Llama init (normal(0, initializer_range) matrices, unit norms), so both sides see
    logits of the same spread (PyTorch's default N(0, 1) embedding, tied to the head, gives
    logits that underflow to denormals in the softmax and would time something else)."""
    for p in model.parameters():
        if p.ndim == 2:
            p.normal_(0.0, std)


def ours(cfg, args, device, dtype, x):
    torch.manual_seed(0)
    config = ModelConfig.from_dict(cfg.to_dict())
    with torch.device(device):
        model = Decoder(config).to(dtype)
        init_like_hf(model, cfg.initializer_range)
    model.model.rotary.reset(device)
    apply_lora(model, LoraConfig(rank=16, alpha=32, targets=TARGETS))
    for m in lora_modules(model).values():
        m.lora_A.float()
        m.lora_B.float()
    model.model.gradient_checkpointing = bool(args.grad_ckpt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    positions = torch.arange(x.shape[1], device=device).expand_as(x)
    attn = DenseAttention({None: CAUSAL})
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            hidden = model.model(x, positions, attn=attn)
            loss_sum, n = chunked_cross_entropy(hidden, model.lm_head.weight, x, args.chunk)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, args.warmup, args.steps, device)
    return times, dev.peak_memory(device), config


def hf_peft(cfg, args, device, dtype, x):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                          task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, args.warmup, args.steps, device), dev.peak_memory(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-ckpt", type=int, default=1, help="1 = activation checkpointing on")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk", type=int, default=4096, help="cross-entropy chunk (tokens)")
    p.add_argument("--device", default=None)
    p.add_argument("--which", default="ours,hf", help="comma list of ours,hf")
    args = p.parse_args()

    device = dev.resolve_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = hf_config(args.shape)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    peak = peak_flops(dev.device_name(device))
    print(f"# LoRA train step: shape={args.shape} batch={args.batch} seq={args.seq} "
          f"grad_ckpt={args.grad_ckpt} dtype={dtype}")  # fmt: skip
    print(f"# device {dev.device_name(device)}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")  # fmt: skip
    results = {}
    which = args.which.split(",")
    if "ours" in which:
        times, mem, config = ours(cfg, args, device, dtype, x)
        results["ours"] = (statistics.median(times), mem)
        fpt = flops_per_token(config, "lora", args.seq)
        gc.collect()
        dev.empty_cache(device)
    if "hf" in which:
        times, mem = hf_peft(cfg, args, device, dtype, x)
        results["hf+peft"] = (statistics.median(times), mem)
        config = ModelConfig.from_dict(cfg.to_dict())
        fpt = flops_per_token(config, "lora", args.seq)
    print("| path | step ms | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|")
    for name, (step_s, mem) in results.items():
        tps = tokens / step_s
        mfu = f"{tps * fpt / peak:.1%}" if peak else "-"
        print(f"| {name} | {step_s * 1000:.0f} | {tps:,.0f} | {mfu} | {mem / 2**30:.1f} |")
    if len(results) == 2:
        ratio = results["hf+peft"][0] / results["ours"][0]
        print(f"ours / hf+peft tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
