"""Peak extra memory of the training loss: tunelab's fused chunked loss vs full logits + CE.

    python bench/loss_memory.py                                # CPU, fp32 and bf16 autocast
    python bench/loss_memory.py --tokens 8192 --vocab 128256 --device cuda

The baseline is what HF transformers does: ``lm_head`` over every position, then
``F.cross_entropy`` on the (tokens x vocab) logits, then backward. Ours is
``chunked_cross_entropy`` (forward computes the gradients; backward only scales them).
Each case runs in its own process on CPU (peak RSS is per process) and reports the peak
above what the inputs already use, also in units of one fp32 (chunk x vocab) buffer.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from tunelab.train.loss import chunked_cross_entropy


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(side: str, dtype: str, args) -> int:
    """Peak bytes one loss forward + backward adds (run in a fresh process on CPU)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    h = torch.randn(1, args.tokens + 1, args.hidden, device=device, requires_grad=True)
    w = torch.randn(args.vocab, args.hidden, device=device) * 0.02
    y = torch.randint(0, args.vocab, (1, args.tokens + 1), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_bytes(device) if device.type == "cpu" else torch.cuda.memory_allocated(device)
    bf16 = dtype == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if side == "ours":
            loss, n = chunked_cross_entropy(h, w, y, args.chunk)
            loss = loss / n
        else:
            logits = F.linear(h[:, :-1], w).float()
            loss = F.cross_entropy(logits.reshape(-1, args.vocab), y[:, 1:].reshape(-1))
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak_bytes(device) - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="target tokens in the batch")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=4096, help="ours: tokens per loss chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=2, metavar=("SIDE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # child process: print one figure
        print(measure(*args.one, args))
        return
    unit = min(args.chunk, args.tokens) * args.vocab * 4
    print(f"# loss peak memory: {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, "
          f"chunk {args.chunk}, {args.device}, torch {torch.__version__}")  # fmt: skip
    print("| side | dtype | extra peak GiB | fp32 chunk buffers |\n|---|---|---|---|")
    for dtype in ("fp32", "bf16"):
        for side in ("ours", "full-logits"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", side, dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            extra = int(out.strip().splitlines()[-1])
            print(f"| {side} | {dtype} | {extra / 2**30:.2f} | {extra / unit:.2f} |")


if __name__ == "__main__":
    main()
