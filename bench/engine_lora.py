"""Cost of per-request LoRA adapters in the engine: the same workload four ways.

    python bench/engine_lora.py                              # default model, CPU
    python bench/engine_lora.py --shape tiny --num-prompts 4 --output-len 4
    python bench/engine_lora.py --shape 1b --num-prompts 256 --output-len 128   # GPU machine

1. ``base``: no adapter loaded (plain linears);
2. ``base, adapters loaded``: the same base requests through the LoRA layers (fast path: no
   adapter token in any step), whose tokens must equal 1's;
3. ``one adapter``: every request on adapter a0;
4. ``N adapters mixed``: request i on adapter a(i mod N), so every step mixes N adapters.

Adapters are random, rank --rank, on every linear (the most expensive case). Prefix caching
is off so that every scenario computes the same tokens. Greedy, EOS ignored. Scenario 1 runs
on its own copy of the model; the scenarios take turns for --repeats rounds and the median
time is reported (a lone run on a shared CPU is noise).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from generate_throughput import SHAPES, build_shape

from tunelab import device as dev
from tunelab.engine.llm import LLM
from tunelab.engine.sampler import SamplingParams
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.models.lora import LoraConfig, apply_lora
from tunelab.models.peft_io import save_adapter


def write_random_adapters(model_dir, out: Path, count: int, rank: int) -> dict[str, str]:
    """``count`` random all-linear adapters for the model in ``model_dir``."""
    paths = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        model = load_model(model_dir, "cpu", torch.float32)
        cfg = LoraConfig(rank=rank, alpha=2 * rank)
        apply_lora(model, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        save_adapter(model, cfg, out / f"a{i}", base_model_name_or_path=str(model_dir))
        paths[f"a{i}"] = str(out / f"a{i}")
        del model
    return paths


def timed(llm: LLM, prompts, params, lora) -> tuple[float, list[list[int]]]:
    dev.synchronize(llm.engine.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora=lora)
    dev.synchronize(llm.engine.device)
    elapsed = time.perf_counter() - start
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error]
    return elapsed, [o.outputs[0].token_ids for o in outs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="tunelab model spec (default: `default`)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama shape")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="bf16 / fp16 / fp32 (auto: device default)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--min-prompt-len", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4, help="adapters in the mixed scenario")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = dev.resolve_device(args.device)
    dtype = dev.parse_dtype(args.dtype) or dev.default_dtype(device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            model_dir = Path(tmp) / "model"
            build_shape(args.shape, model_dir, device, dtype)
            tokenizer = None
        else:
            from tunelab.hub import resolve_model

            model_dir = resolve_model(args.model or "default")
            tokenizer = load_tokenizer(model_dir)
        adapters = write_random_adapters(model_dir, Path(tmp), args.adapters, args.rank)
        plain = LLM(load_model(model_dir, device, dtype), tokenizer=tokenizer,
                    enable_prefix_caching=False)  # fmt: skip
        llm = LLM(load_model(model_dir, device, dtype), tokenizer=tokenizer,
                  enable_prefix_caching=False, adapters=adapters)  # fmt: skip
        g = torch.Generator().manual_seed(args.seed)
        vocab = plain.engine.model.config.vocab_size
        lengths = torch.randint(args.min_prompt_len, args.max_prompt_len + 1, (args.num_prompts,),
                                generator=g)  # fmt: skip
        prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        n = args.num_prompts
        mixed = [f"a{i % args.adapters}" for i in range(n)]
        scenarios = [
            ("base", plain, None),
            ("base, adapters loaded", llm, None),
            ("one adapter", llm, "a0"),
            (f"{args.adapters} adapters mixed", llm, mixed),
        ]
        for _, engine, lora in scenarios:  # warm-up
            engine.generate(prompts[:2], SamplingParams(max_tokens=2), lora=lora and "a0")
        times: dict[str, list[float]] = {name: [] for name, _, _ in scenarios}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):
            for name, engine, lora in scenarios:
                seconds, tokens[name] = timed(engine, prompts, params, lora)
                times[name].append(seconds)
        rows = [(name, statistics.median(times[name]), tokens[name]) for name in times]

    lens = f"{args.min_prompt_len}..{args.max_prompt_len}"
    print(f"device {device}, dtype {dtype}, {n} prompts of {lens} tokens, {args.output_len} new, "
          f"rank {args.rank}, all-linear, median of {args.repeats}")  # fmt: skip
    print("| scenario | total s | out tok/s | vs base |")
    print("|---|---|---|---|")
    base_s = rows[0][1]
    for name, seconds, _ in rows:
        tps = n * args.output_len / seconds
        print(f"| {name} | {seconds:.2f} | {tps:.1f} | {seconds / base_s:.2f}x time |")
    same = rows[0][2] == rows[1][2]
    print(f"base tokens identical with adapters loaded: {'yes' if same else 'NO'}")
    differ = sum(a != b for a, b in zip(rows[0][2], rows[2][2], strict=True))
    print(f"rows changed by adapter a0: {differ} of {n}")


if __name__ == "__main__":
    main()
