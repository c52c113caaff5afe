"""The tokenizer as GGUF metadata, the way llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Supported: byte-level BPE fast tokenizers (GPT-2 / Llama 3 / Qwen / SmolLM), written as
``tokenizer.ggml.model = "gpt2"`` with tokens, token types, merges and ``tokenizer.ggml.pre``,
the pre-tokenizer name llama.cpp uses to split text. That name is found as llama.cpp finds it
(a hash of the token ids of a fixed text, for the families in ``KNOWN_PRE``), else from the
pre-tokenizer's split regex, else "default" with a warning.

Sentencepiece-style tokenizers (Llama 2, Mistral v0.1-v0.3: BPE with byte fallback and "▁")
raise a TunelabError: llama.cpp's "llama" vocabulary needs sentencepiece scores a
``tokenizer.json`` does not carry, and a file that loads but splits text differently is worse
than a clear refusal. So do WordPiece, Unigram and slow-only tokenizers.
Ids past the tokenizer's vocabulary up to the embedding's rows become ``[PAD{id}]`` (UNUSED).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

# llama.cpp's probe text (convert_hf_to_gguf.py, get_vocab_base_pre) and the hashes of its
# token ids for the tokenizers of the model families tunelab runs.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
# Split regexes of tokenizer.json pre-tokenizers -> llama.cpp names (when the hash is unknown).
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, eos_fallback: int | None) -> str:
    """Write the tokenizer, special ids and chat template into ``writer``; return the
    pre-tokenizer name."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise TunelabError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
            f"{vocab_size} rows; the tokenizer does not belong to this model."
        )
    if model.get("type") != "BPE" or not _has_type(spec, "ByteLevel"):
        kind = "sentencepiece-style BPE" if model.get("byte_fallback") else model.get("type")
        raise TunelabError(
            f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM); this "
            f"model's is {kind!r} (e.g. Llama 2, Mistral v0.1-v0.3). Export it with "
            "--format hf and convert that directory with llama.cpp's convert_hf_to_gguf.py."
        )
    pre = _add_byte_level(writer, tokenizer, spec, vocab, vocab_size)
    _add_specials(writer, tokenizer, eos_fallback)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (default, tool_use, ...): GGUF's list form
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)
    return pre


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError(
            "GGUF export needs a fast tokenizer (tokenizer.json); this model only has a slow "
            "one. Save it with transformers' fast tokenizer first, or export --format hf."
        )
    return json.loads(backend.to_str())


def _has_type(node: Any, name: str) -> bool:
    """Whether a tokenizer.json component of type ``name`` appears anywhere in ``node``."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _add_byte_level(writer, tokenizer, spec, vocab: dict[str, int], vocab_size: int) -> str:
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken; their text is not byte-mapped
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            if i not in added:
                types.append(TOKEN_NORMAL)
            else:
                types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER)
    pre = pre_tokenizer_name(tokenizer, spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes merges as "a b" (old) or ["a", "b"] (new)
    merges = spec["model"].get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_add_space_prefix(False)
    return pre


def pre_tokenizer_name(tokenizer: Any, spec: dict[str, Any]) -> str:
    """llama.cpp's name for how this byte-level tokenizer splits text before BPE."""
    ids = tokenizer.encode(CHKTXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    pre = spec.get("pre_tokenizer") or {}
    for split in _find(pre, "Split"):
        name = _SPLITS.get((split.get("pattern") or {}).get("Regex", ""))
        if name:
            return name
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    log.warning(
        "unknown pre-tokenizer (hash %s); writing 'default': llama.cpp may split some text "
        "differently from transformers",
        digest[:12],
    )
    return "default"


def _find(node: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [node] if node.get("type") == name else []
        return found + [x for v in node.values() for x in _find(v, name)]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, name)]
    return []


def _add_specials(writer: Any, tokenizer: Any, eos_fallback: int | None) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    eos = eos if eos is not None else eos_fallback
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    probe = tokenizer("a")["input_ids"]  # does encoding add BOS / EOS by itself?
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(bool(probe) and eos is not None and probe[-1] == eos)
