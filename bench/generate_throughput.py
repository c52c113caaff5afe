"""Offline batch generation: our SimpleGenerator vs HF ``generate`` on the same weights.

    python bench/generate_throughput.py --shape tiny --device cpu
    python bench/generate_throughput.py --shape 1b --batch-sizes 1,64,256 --prompt-len 256 \
        --new-tokens 256 --repeats 10          # on the GPU machine

Greedy decoding of random (seeded) prompt ids, exactly ``--new-tokens`` tokens per row (EOS is
ignored by both sides). Each side is loaded, warmed up once, timed ``--repeats`` times (median
reported, synchronized) and freed before the other side loads, so peak memory is per side.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from tunelab import device as dev
from tunelab.engine.sampler import SamplingParams
from tunelab.engine.simple import SimpleGenerator
from tunelab.models.config import ModelConfig
from tunelab.models.loading import load_model, load_tokenizer

# As in shared/bench/hf_generate.py (Llama-3.2-1B / Llama-3-8B shapes), plus a tiny one.
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
FIELDS += ("num_key_value_heads", "vocab_size", "tie_word_embeddings")
SHAPES = {
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "8b": (4096, 14336, 32, 32, 8, 128256, False),
    "tiny": (64, 128, 2, 4, 2, 512, False),
}
GiB = 2**30


class StubTokenizer:
    """Enough of a tokenizer for SimpleGenerator on token ids (random shapes have none)."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def build_shape(shape: str, out_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Random-init Llama of ``shape`` written to ``out_dir`` in HF format (no EOS: never stops)."""
    cfg = transformers.LlamaConfig(
        **dict(zip(FIELDS, SHAPES[shape], strict=True)),
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=None,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.save_pretrained(str(out_dir))
    del model


def free(device: torch.device) -> None:
    gc.collect()
    dev.empty_cache(device)


def timed(device: torch.device, repeats: int, fn, *fargs, **fkwargs) -> tuple[float, object]:
    """Median seconds of ``repeats`` synchronized calls ``fn(*fargs, **fkwargs)``, last result."""
    times, result = [], None
    for _ in range(repeats):
        dev.synchronize(device)
        t0 = time.perf_counter()
        result = fn(*fargs, **fkwargs)
        dev.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_ours(model_dir, tokenizer, prompts_by_bs, args, device, dtype) -> dict:
    gen = SimpleGenerator(load_model(model_dir, device, dtype), tokenizer)
    results = {}
    for bs, prompts in prompts_by_bs.items():
        dev.reset_peak_memory(device)
        warm = SamplingParams(max_tokens=min(8, args.new_tokens), temperature=0, ignore_eos=True)
        gen.generate_ids(prompts, warm)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        secs, outs = timed(device, args.repeats, gen.generate_ids, prompts, params)
        tokens = [o.token_ids for o in outs]
        assert all(len(t) == args.new_tokens for t in tokens), "ours stopped early"
        results[bs] = (secs, dev.peak_memory(device), tokens)
        report("ours", bs, args, results[bs])
    del gen
    free(device)
    return results


def run_hf(model_dir, prompts_by_bs, args, device, dtype) -> dict:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation="sdpa"
    )
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: exactly new-tokens tokens
    hf.generation_config.pad_token_id = 0
    results = {}
    for bs, prompts in prompts_by_bs.items():
        dev.reset_peak_memory(device)
        x = torch.tensor(prompts, device=device)
        mask = torch.ones_like(x)
        kw = dict(attention_mask=mask, do_sample=False, top_p=None, top_k=None, temperature=None)
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=min(8, args.new_tokens), **kw)
            secs, out = timed(
                device, args.repeats, hf.generate, x, max_new_tokens=args.new_tokens, **kw
            )
        assert out.shape[1] == x.shape[1] + args.new_tokens, "hf stopped early"
        results[bs] = (secs, dev.peak_memory(device), out[:, x.shape[1] :].tolist())
        report("hf", bs, args, results[bs])
    del hf
    free(device)
    return results


def first_mismatch(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def report(side: str, bs: int, args, result) -> None:
    secs, peak, _ = result
    tps = bs * args.new_tokens / secs
    print(f"{side:4} bs={bs:<4} {tps:10.1f} out tok/s  {secs:8.3f} s  peak {peak / GiB:.2f} GiB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="tunelab model spec (default: `default`)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama shape")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="bf16 / fp16 / fp32 (auto: device default)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--which", default="ours,hf", help="comma list of: ours, hf")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    if not which or set(which) - {"ours", "hf"}:
        p.error("--which takes a comma list of: ours, hf")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device = dev.resolve_device(args.device)
    dtype = dev.parse_dtype(args.dtype) or dev.default_dtype(device)

    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        if args.shape:
            model_dir, tokenizer, what = Path(tmp), StubTokenizer(), f"random llama {args.shape}"
            build_shape(args.shape, model_dir, device, dtype)
            free(device)
        else:
            from tunelab.hub import resolve_model

            spec = args.model or "default"
            model_dir, what = resolve_model(spec), spec
            tokenizer = load_tokenizer(model_dir)
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
        gen = torch.Generator().manual_seed(args.seed)
        prompts_by_bs = {
            bs: torch.randint(3, config.vocab_size, (bs, args.prompt_len), generator=gen).tolist()
            for bs in batch_sizes
        }
        n_params = ModelConfig.from_file(Path(model_dir) / "config.json").num_params
        print(f"# generate: {what} ({config.model_type}, {n_params / 1e6:.1f}M params), {dtype}")
        print(
            f"# device {dev.device_name(device)} ({device}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}"
        )
        print(
            f"# prompt {args.prompt_len}, new {args.new_tokens}, greedy, median of "
            f"{args.repeats} after 1 warm-up"
            + ("; cpu peak = process max RSS (not reset)" if device.type == "cpu" else "")
        )
        res = {}
        if "ours" in which:
            res["ours"] = run_ours(model_dir, tokenizer, prompts_by_bs, args, device, dtype)
        if "hf" in which:
            res["hf"] = run_hf(model_dir, prompts_by_bs, args, device, dtype)

    if len(res) == 2:
        bs0 = batch_sizes[0]  # the first batch decides yes/no; the others are reported too
        for bs in batch_sizes:
            ours_t, hf_t = res["ours"][bs][2], res["hf"][bs][2]
            same = sum(a == b for a, b in zip(ours_t, hf_t, strict=True))
            first = min(first_mismatch(a, b) for a, b in zip(ours_t, hf_t, strict=True))
            label = "tokens match" if bs == bs0 else "  also"
            where = f"; earliest mismatch at token {first}" if same < len(ours_t) else ""
            ok = "yes" if same == len(ours_t) else "no"
            print(f"{label}: {ok} ({same} of {len(ours_t)} rows, batch {bs}{where})")
    cols = [s for s in ("ours", "hf") if s in res]
    head = ["batch"] + [f"{s} tok/s" for s in cols] + (["ours/hf"] if len(cols) == 2 else [])
    head += [f"{s} peak GiB" for s in cols]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for bs in batch_sizes:
        tps = {s: bs * args.new_tokens / res[s][bs][0] for s in cols}
        row = [str(bs)] + [f"{tps[s]:.1f}" for s in cols]
        row += [f"{tps['ours'] / tps['hf']:.2f}x"] if len(cols) == 2 else []
        row += [f"{res[s][bs][1] / GiB:.2f}" for s in cols]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
