"""Sampling parameters and next-token selection.

Each row of a batch carries its own ``SamplingParams`` and its own ``torch.Generator`` (seeded
per request), so a seeded request draws the same tokens whatever else is in the batch.
``sample_next`` is the simple per-row path (``SimpleGenerator``); ``sample_batch`` is the
engine's: vectorised filters and penalties, min-p, min_tokens and logprobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tunelab.errors import TunelabError

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL style; 1.0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Engine-only fields (the simple generator ignores them).
    n: int = 1  # independent samples per prompt (sample i is seeded with seed + i)
    min_p: float = 0.0  # drop tokens with probability < min_p * best probability; 0 = off
    presence_penalty: float = 0.0  # OpenAI style, on generated tokens; 0 = off
    frequency_penalty: float = 0.0  # OpenAI style, on generated tokens; 0 = off
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens are out
    logprobs: int | None = None  # top-k logprobs per generated token (+ the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token (evaluation)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 = off)"),
            (all(self.stop), "stop strings must not be empty"),
            (self.n >= 1, "n must be >= 1"),
            (
                self.seed is None or -(2**63) <= self.seed <= 2**64 - self.n,
                "seed must be in [-2**63, 2**64 - n] (sample i uses seed + i)",
            ),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "prompt_logprobs must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TunelabError(f"invalid sampling parameters: {message}.")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 sampling is greedy in all but ties (and 1e-46 is 0 in fp32: 0 / 0).
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def make_generator(self, device: torch.device, offset: int = 0) -> torch.Generator | None:
        """A generator seeded with ``seed + offset`` (offset = sample index), None unseeded."""
        if self.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed + offset)
        return gen


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: divide positive logits, multiply negative ones."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. logits: (V,)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; always keep the best.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def scale(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``logits / temperature`` with each row's maximum moved to 0 first: softmax is the same,
    and a tiny temperature (1e-40) gives -inf tails instead of an inf - inf = NaN row."""
    return (logits - logits.max(-1, keepdim=True).values) / temperature


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Pick one token per row. logits: (B, V); histories: prompt + generated ids per row."""
    logits = logits.float()
    out = []
    for row, p in enumerate(params):
        row_logits = apply_repetition_penalty(logits[row], histories[row], p.repetition_penalty)
        if p.greedy:
            out.append(int(row_logits.argmax()))
            continue
        row_logits = filter_top_k_top_p(scale(row_logits, p.temperature), p.top_k, p.top_p)
        probs = row_logits.softmax(-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[row])))
    return out


# ---- the engine's batched sampler ------------------------------------------------------------

Logprobs = dict[int, float]  # token id -> log-probability (the chosen token + the top-k)


@dataclass
class SampleInput:
    """What the batched sampler needs to know about one row besides its logits."""

    params: SamplingParams
    history: list[int]  # prompt + generated ids (repetition penalty)
    num_prompt_tokens: int  # history[num_prompt_tokens:] are generated (presence/frequency)
    generator: torch.Generator | None = None
    banned: list[int] = field(default_factory=list)  # masked this step (EOS before min_tokens)


def apply_penalties(logits: torch.Tensor, row: SampleInput) -> torch.Tensor:
    """Repetition (CTRL, over prompt + output), presence and frequency (OpenAI, over output)."""
    p = row.params
    logits = apply_repetition_penalty(logits, row.history, p.repetition_penalty)
    generated = row.history[row.num_prompt_tokens :]
    if (p.presence_penalty or p.frequency_penalty) and generated:
        counts = torch.bincount(
            torch.tensor(generated, device=logits.device), minlength=logits.numel()
        ).to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    if row.banned:
        logits = logits.clone()
        logits[torch.tensor(row.banned, device=logits.device)] = float("-inf")
    return logits


def _filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, top-p then min-p on (S, V) logits already divided by the temperature."""
    # Which filters run is decided on the host: no device sync on accelerators.
    V, device = logits.shape[-1], logits.device
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(ks) < V:
        top = torch.topk(logits, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor(ks, device=device)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1 for p in params):
        # inf for rows without top-p: with 1.0, a cumulative sum that rounds up to 1 in fp32
        # would cut their tail, and a seeded row's tokens would depend on its companions.
        top_p = torch.tensor([p.top_p if p.top_p < 1 else math.inf for p in params], device=device)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Same rule as filter_top_k_top_p: drop a token once those before it reach top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs = logits.softmax(-1)
        cut = probs.max(-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < cut, float("-inf"))
    return logits


def sample_batch(
    logits: torch.Tensor, rows: list[SampleInput]
) -> tuple[list[int], list[Logprobs | None]]:
    """Pick one token per row of ``logits`` (S, V); also the logprobs rows asked for.

    Sampling draws ``argmax(probs / q)`` with ``q ~ Exp(1)`` (equivalent to sampling from
    ``probs``); a seeded row draws its noise from its own generator, so its tokens do not
    depend on the other rows. Logprobs are those of the raw model distribution, before
    penalties, temperature and filters (what evaluation needs).
    """
    logits = logits.float()
    raw = logits
    needs_penalty = [
        i
        for i, r in enumerate(rows)
        if r.banned
        or r.params.repetition_penalty != 1.0
        or r.params.presence_penalty
        or r.params.frequency_penalty
    ]
    if needs_penalty:
        logits = logits.clone()
        for i in needs_penalty:
            logits[i] = apply_penalties(logits[i], rows[i])
    # max().indices: the same first-maximum rule as argmax, about 2x faster on CPU.
    tokens = logits.max(-1).indices
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        params = [rows[i].params for i in sampled]
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        probs = _filter_rows(scale(logits[idx], temps[:, None]), params).softmax(-1)
        q = torch.empty_like(probs)
        for j, i in enumerate(sampled):
            q[j].exponential_(generator=rows[i].generator)
        # exponential_ can return exactly 0: keep the division finite.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        tokens[idx] = (probs / q).argmax(-1)
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, token_list, [r.params.logprobs for r in rows])


def _logprobs(
    logits: torch.Tensor, chosen: list[int], wanted: list[int | None]
) -> list[Logprobs | None]:
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[Logprobs | None] = [None] * len(wanted)
    if not rows:
        return out
    lp = logits[torch.tensor(rows, device=logits.device)].log_softmax(-1)
    chosen_t = torch.tensor([chosen[i] for i in rows], device=logits.device)
    picked = lp.gather(1, chosen_t[:, None])[:, 0].tolist()
    k = max(int(wanted[i] or 0) for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        n = int(wanted[i] or 0)
        out[i] = dict(zip(top_i[j][:n], top_v[j][:n], strict=True))
        out[i][chosen[i]] = picked[j]
    return out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[Logprobs]:
    """Per position: the target token's logprob and the top-k. logits (N, V), targets (N,)."""
    lp = logits.float().log_softmax(-1)
    picked = lp.gather(1, targets[:, None])[:, 0].tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    out = []
    for target, lp_t, vals, ids in zip(
        targets.tolist(), picked, top_v.tolist(), top_i.tolist(), strict=True
    ):
        d = dict(zip(ids, vals, strict=True))
        d[target] = lp_t
        out.append(d)
    return out
