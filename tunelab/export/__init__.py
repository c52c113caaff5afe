"""Merge LoRA adapters and export models: verified HF merge, PEFT adapters, GGUF files.

Modules (import what you need; this package imports nothing heavy on its own):
  merge.py     ``merge_adapter``: fp32 merge, range checks, logit verification, atomic HF dir
  verify.py    prompts, logits and the dtype-dependent tolerances the merge is checked against
  qlora.py     tell whether an adapter was trained on an NF4 base; rebuild that base
  manifest.py  ``tunelab.json``: base / adapter hashes, dtype, verification figures
  peft.py      ``export_peft``: an adapter normalised to PEFT's format, with the tokenizer
  gguf.py      ``export_gguf``: llama.cpp / Ollama GGUF (f32, f16, q8_0)
  gguf_vocab.py  the tokenizer as GGUF metadata (byte-level BPE; llama.cpp pre-tokenizer names)
  commands.py  ``tunelab merge`` / ``tunelab export``
"""
