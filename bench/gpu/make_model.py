"""Write a random-init Llama of a benchmark shape, with a real tokenizer, for serving benches.

    python bench/gpu/make_model.py 1b /tmp/llama-1b --tokenizer .gpu/tokenizer --device cuda

The GPU machine has no hub access, so the tokenizer files (tokenizer.json and friends of the
default model, copied into a carried folder by ``bench/gpu/prepare.sh``) travel with the
tree; the vocabulary is cut to the tokenizer's size so every sampled id decodes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate_throughput import FIELDS, SHAPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    fields = dict(zip(FIELDS, SHAPES[args.shape], strict=True))
    vocab = len(json.loads((args.tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    fields["vocab_size"] = vocab  # added tokens sit inside the BPE vocabulary here
    cfg = transformers.LlamaConfig(**fields, max_position_embeddings=8192, bos_token_id=1,
                                   eos_token_id=2)  # fmt: skip
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(args.out))
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    print(f"wrote {args.shape} llama ({model.num_parameters() / 1e9:.2f}B, vocab {vocab}) "
          f"to {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
