"""Helpers for the trainer tests: tiny chat datasets, configs, single-step probes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from tunelab.train.config import TrainConfig, load_train_config

WORDS = [
    "the", "capital", "of", "France", "is", "Paris", "Italy", "Rome", "what", "tell", "me",
    "about", "machine", "learning", "and", "language", "models", "fine", "tuning", "adapts",
    "a", "pretrained", "model", "to", "new", "data", "with", "small", "rate", "hello",
    "world", "this", "tiny", "tokenizer", "for", "tests",
]  # fmt: skip


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` short ChatML conversations ("messages" format) of varied lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
            messages = [
                {"role": "user", "content": f"{question}?"},
                {"role": "assistant", "content": f"{answer}. {i}"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def overrides(**keys) -> list[str]:
    """``overrides(train__lr=1e-3, method="full")`` -> ``["--train.lr", "0.001", ...]``."""
    out = []
    for key, value in keys.items():
        if isinstance(value, list | bool):
            value = json.dumps(value)
        out += ["--" + key.replace("__", "."), str(value)]
    return out


def tiny_config(model: Path, data: Path, out: Path, cache: Path, **keys) -> TrainConfig:
    """A CPU / fp32 config for a tiny model; ``keys`` as in ``overrides``."""
    base = dict(
        model=model,
        data__train=data,
        data__cache_dir=cache,
        data__max_length=64,
        output_dir=out,
        train__device="cpu",
        train__precision="fp32",
        train__max_steps=2,
        train__batch_size=4,
        train__warmup=0,
        lora__rank=4,
        lora__alpha=8,
    )
    return load_train_config(None, overrides(**{**base, **keys}))


@torch.no_grad()
def randomise_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA's B starts at zero (so A gets no gradient); give it values."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def one_step(trainer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run ``trainer._step`` on the first batches; return its log row and the gradients it
    produced (before clipping and the optimizer update)."""
    grads: dict[str, torch.Tensor] = {}
    step = trainer._optimizer_step

    def capture() -> float:
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
        return step()

    trainer._optimizer_step = capture
    try:
        row = trainer._step(trainer.train_plan.iterate(0, 0))
    finally:
        del trainer._optimizer_step
    return row, grads


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(run_dir) if "loss" in r}


def model_available_offline(spec: str) -> bool:
    """Whether resolving ``spec`` needs no download."""
    from tunelab.default_model import GGUF_NAME, WHEEL_ENV, tunelab_home
    from tunelab.hub import DEFAULT_NAME, models_dir

    if spec == "default":
        converted = (models_dir() / DEFAULT_NAME / "config.json").exists()
        gguf = (tunelab_home() / "downloads" / GGUF_NAME).exists()
        return converted or gguf or bool(os.environ.get(WHEEL_ENV))
    if Path(spec).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo = spec.removeprefix("hf://")
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


# Tiny configs of architectures our decoder does not implement (trained through transformers).
FALLBACK_ARCHS = {
    "gpt_neox": ("GPTNeoXConfig", {}),  # fused qkv, partial rotary, parallel residual, biases
    "phi": ("PhiConfig", {}),  # lm_head with a bias
    "gemma2": ("Gemma2Config", {"head_dim": 16, "num_key_value_heads": 2}),  # soft-capping
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),  # learned positions
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4}),  # Conv1D, not Linear
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_key_value_heads": 2}),  # 3-D experts
}


def make_hf_model(root: Path, tokenizer_dir: Path, arch: str, **overrides) -> Path:
    """A random tiny ``arch`` model (``FALLBACK_ARCHS``) with the test tokenizer, in ``root``."""
    import shutil

    import transformers

    cls_name, defaults = FALLBACK_ARCHS[arch]
    kwargs = dict(
        vocab_size=416,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = getattr(transformers, cls_name)(**{**kwargs, **defaults, **overrides})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so a wrong order of ops shows up
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    path = Path(root) / f"tiny-{arch}"
    model.save_pretrained(str(path))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy2(f, path / f.name)
    return path
