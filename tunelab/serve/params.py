"""OpenAI request fields -> prompt token ids + ``SamplingParams``, with the checks that give 400s.

Everything the engine would refuse is checked here first, so the client gets a clear 400
(with the numbers) before any stream starts.
"""

from __future__ import annotations

from typing import Any

from tunelab.engine.block_manager import blocks_for, kv_tokens_needed
from tunelab.engine.prompts import encode_chat, encode_prompt
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError
from tunelab.serve.errors import APIError
from tunelab.serve.protocol import ChatCompletionRequest, CompletionRequest, _Sampling


def completion_prompts(llm: Any, prompt: Any) -> list[list[int]]:
    """The token ids of each prompt of a completions request (string, list, ids, list of ids)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty: give at least one token.", "prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if llm.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids.", "prompt")
            try:
                out.append(list(encode_prompt(llm.tokenizer, p)))
            except TunelabError as e:
                raise APIError(400, str(e), "prompt") from None
        else:
            out.append(list(p))
    return out


def chat_prompt(
    llm: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    lora: str | None = None,
) -> list[int]:
    """Token ids of a chat; with ``lora``, in that adapter's own template if it has one."""
    if not messages:
        raise APIError(400, "messages is empty: give at least one message.", "messages")
    template = llm.lora.get(lora).chat_template if lora is not None else None
    try:
        return encode_chat(llm.tokenizer, messages, add_generation_prompt, template)
    except (TunelabError, ValueError) as e:  # ValueError: transformers' own template checks
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None


def check_prompts(
    llm: Any,
    prompts: list[list[int]],
    max_tokens: int | None,
    n: int,
    stop_token_ids: list[int] | None = None,
) -> int:
    """Validate token ids, context and cache size; return the max_tokens to use."""
    vocab, context = llm.model.config.vocab_size, llm.context
    bad = next((t for t in stop_token_ids or [] if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"stop token id {bad} is outside the vocabulary (0..{vocab - 1}).",
            "stop_token_ids",
        )
    bm = llm.block_manager
    longest = max(len(p) for p in prompts)
    for p in prompts:
        if not p:
            raise APIError(400, "the prompt is empty: give at least one token.", "prompt")
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is outside the vocabulary (0..{vocab - 1}).", "prompt"
            )
    if max_tokens is None:
        max_tokens = context - longest
    if longest >= context or longest + max_tokens > context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens, but you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt + {max_tokens} for the "
            "completion): shorten the prompt or lower max_tokens.",
            "max_tokens" if longest < context else "prompt",
            "context_length_exceeded",
        )
    need = n * blocks_for(kv_tokens_needed(longest, max_tokens, context), bm.block_size)
    need *= bm.block_size
    if need > bm.num_blocks * bm.block_size:
        raise APIError(
            400,
            f"the request needs {need} tokens of KV cache (n={n} x (prompt {longest} + "
            f"max_tokens {max_tokens} - 1)) but the server's cache holds "
            f"{bm.num_blocks * bm.block_size}: lower n or max_tokens.",
            "max_tokens",
        )
    return max_tokens


def _refuse_unsupported(req: _Sampling) -> None:
    if getattr(req, "logit_bias", None):
        raise APIError(400, "logit_bias is not supported by this server; drop it.", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise APIError(
                400,
                "suffix (fill-in-the-middle) is not supported: send the whole prompt instead.",
                "suffix",
            )
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported; use n instead.", "best_of")
    if isinstance(req, ChatCompletionRequest) and req.tools:
        raise APIError(400, "tools / function calling is not supported by this server.", "tools")


def sampling_params(
    req: _Sampling, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    """The engine's parameters for ``req`` (ranges were checked by the protocol models).

    ``prompt_logprobs``: top-k logprobs of the prompt tokens too (completions' echo + logprobs).
    """
    _refuse_unsupported(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty.", "stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            n=req.n,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except TunelabError as e:
        raise APIError(400, str(e)) from None
