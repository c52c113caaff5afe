"""Shared fixtures: tiny random HF models with a small real tokenizer, global-state resets."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tunelab import device as dev

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? Tell me about machine learning and language models.",
    "Fine-tuning adapts a pretrained model to new data with a small learning rate.",
    "hello world, this is a tiny tokenizer for tests 0123456789 !?.,;:'\"()[]{}",
] * 4
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Each test starts from the same seeds and default dtype."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (~400 tokens) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, tiny_tokenizer) -> Callable[..., Path]:
    """``make_tiny_model("qwen3", tie_word_embeddings=True)`` -> HF dir with random weights."""
    import shutil

    import transformers

    cache: dict[tuple, Path] = {}

    def make(model_type: str = "llama", **overrides) -> Path:
        key = (model_type, json.dumps(overrides, sort_keys=True))
        if key in cache:
            return cache[key]
        cls_name, arch_defaults = TINY_ARCHS[model_type]
        kwargs = dict(
            vocab_size=416,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        kwargs.update(arch_defaults)
        kwargs.update(overrides)
        config = getattr(transformers, cls_name)(**kwargs)
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # random norms and biases, so a wrong order of ops shows up
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
        path = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model.save_pretrained(str(path))
        for f in Path(tiny_tokenizer).iterdir():
            shutil.copy2(f, path / f.name)
        cache[key] = path
        return path

    return make


def has_accelerator() -> bool:
    return dev.available_device_types()[0] != "cpu"


gpu = pytest.mark.skipif(not has_accelerator(), reason="needs a CUDA or NPU device")
