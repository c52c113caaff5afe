"""``tunelab serve`` and ``tunelab deploy``: flags and the functions behind them."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

from tunelab.engine.flags import add_device_flag, add_engine_flags, engine_config
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

BACKENDS = ("tunelab", "vllm", "sglang", "lmdeploy")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model spec (default: %(default)s)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also serve the PEFT LoRA adapter at PATH as model NAME (repeatable)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="largest LoRA adapter rank accepted (default: 64; also passed to vllm)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a free slot before new ones get 429 (default: 256)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: --model)"
    )
    add_device_flag(p)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "bf16", "fp16", "fp32"],
        help="weights and KV cache (default: bf16 where the accelerator supports it, fp32 on CPU)",
    )
    p.add_argument(
        "--backend", default="tunelab", choices=BACKENDS, help="server (default: %(default)s)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests before aborting them (default: 30)",
    )
    add_engine_flags(p)


def parse_adapters(items: list[str], served_model_name: str | None = None) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{NAME: PATH}``; names must be distinct from the base's."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TunelabError(f"--adapter takes NAME=PATH, got {item!r}.")
        if name in out:
            raise TunelabError(f"--adapter {name} is given twice; each name serves one adapter.")
        if name == served_model_name:
            raise TunelabError(
                f"--adapter {name} has the base model's name; give the adapter another name "
                "(or the base another --served-model-name)."
            )
        out[name] = path
    return out


def check_adapters(adapters: dict[str, str]) -> None:
    """Fail fast on an --adapter whose directory is not a usable PEFT LoRA adapter."""
    from tunelab.models.peft_io import read_adapter_config

    for name, path in adapters.items():
        try:
            read_adapter_config(path)
        except TunelabError as e:
            raise TunelabError(f"--adapter {name}={path}: {e}") from None


def check_listen(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be served (a port in use, a
    host that is not this machine's): uvicorn would only find out after."""
    import socket

    if not 0 <= port <= 65535:
        raise TunelabError(f"--port {port} is not a port number (0..65535).")
    try:  # every address the host resolves to, as the server's bind will try them all
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
                sock.bind(address)
    except OSError as e:
        why = e.strerror or str(e)
        raise TunelabError(
            f"cannot listen on {host}:{port} ({why}); choose another --port, or a --host of "
            "this machine."
        ) from None


def _check_serve_numbers(args: argparse.Namespace) -> None:
    if args.max_queue < 0:
        raise TunelabError(f"--max-queue must be >= 0 (got {args.max_queue}).")
    if args.shutdown_timeout < 0:
        raise TunelabError(f"--shutdown-timeout must be >= 0 (got {args.shutdown_timeout}).")


def run_serve(args: argparse.Namespace) -> int:
    name = args.served_model_name or str(args.model)
    adapters = parse_adapters(args.adapter, name)
    check_adapters(adapters)  # before the (slow) model load
    _check_serve_numbers(args)
    check_listen(args.host, args.port)
    if args.backend != "tunelab":
        from tunelab.hub import resolve_model

        cmd = backend_command(args.backend, str(resolve_model(args.model)), args, name, adapters)
        log.info("starting %s: %s", args.backend, " ".join(cmd))
        # signals (SIGTERM) go straight to the backend's server
        os.execvpe(cmd[0], cmd, backend_env(args.backend, args))
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise TunelabError(
            "serving needs FastAPI and uvicorn: pip install 'tunelab[serve]' "
            "(or pip install fastapi uvicorn)."
        ) from None

    from tunelab.engine.async_engine import AsyncEngine
    from tunelab.serve.app import create_app

    config = engine_config(args)
    if args.max_lora_rank is not None:
        config.max_lora_rank = args.max_lora_rank
    engine = AsyncEngine.from_pretrained(args.model, args.device, args.dtype, config)
    for adapter, path in adapters.items():  # before the engine loop starts: no step runs
        engine.engine.load_adapter(adapter, path)
    app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue)
    log.info("serving %s as %r on http://%s:%d", args.model, name, args.host, args.port)
    for adapter, path in adapters.items():
        log.info("serving LoRA adapter %s as %r", path, adapter)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    return 0


def _dtype(dtype: str | None) -> str | None:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype or "", dtype)


# Our flag -> (its value in args, the value meaning "not given") for the checks below.
_NOT_GIVEN = {
    "--max-num-batched-tokens": ("max_num_batched_tokens", None),
    "--max-cache-tokens": ("max_cache_tokens", None),
    "--memory-fraction": ("memory_fraction", 0.9),
    "--attention-backend": ("attention_backend", "auto"),
    "--cuda-graphs": ("cuda_graphs", "auto"),
    "--no-prefix-caching": ("no_prefix_caching", False),
    "--max-queue": ("max_queue", 256),
    "--shutdown-timeout": ("shutdown_timeout", 30.0),
    "--max-lora-rank": ("max_lora_rank", None),
}


# Our flag -> the backend's option taking the same value, or its switch for ours.
_BACKEND_OPTIONS = {
    "vllm": {
        "--max-num-batched-tokens": "--max-num-batched-tokens",
        "--memory-fraction": "--gpu-memory-utilization",
        "--max-lora-rank": "--max-lora-rank",
    },
    "sglang": {
        "--max-num-batched-tokens": "--chunked-prefill-size",
        "--memory-fraction": "--mem-fraction-static",
        "--max-lora-rank": "--max-lora-rank",
    },
}
_BACKEND_SWITCHES = {
    "vllm": {
        "--no-prefix-caching": "--no-enable-prefix-caching",
        "--cuda-graphs": "--enforce-eager",
    },
    "sglang": {
        "--no-prefix-caching": "--disable-radix-cache",
        "--cuda-graphs": "--disable-cuda-graph",
    },
}


def _mapped_flags(backend: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """Our flag -> the backend's arguments for it (flags missing here have no equivalent)."""
    mapped = {
        ours: [theirs, str(getattr(args, _NOT_GIVEN[ours][0], None))]
        for ours, theirs in _BACKEND_OPTIONS.get(backend, {}).items()
    }
    mapped |= {ours: [theirs] for ours, theirs in _BACKEND_SWITCHES.get(backend, {}).items()}
    if "--cuda-graphs" in mapped and getattr(args, "cuda_graphs", "auto") != "off":
        mapped["--cuda-graphs"] = []  # on: both backends' default
    return mapped


def _given(args: argparse.Namespace, flag: str) -> bool:
    attr, default = _NOT_GIVEN[flag]
    return getattr(args, attr, default) not in (default, None)


def backend_command(
    backend: str, model_dir: str, args: argparse.Namespace, name: str, adapters: dict[str, str]
) -> list[str]:
    """The command line that starts ``backend``'s OpenAI server with our flags' equivalents.

    A flag the backend has no equivalent for is refused (never silently dropped). A device
    index (``cuda:1``) becomes ``CUDA_VISIBLE_DEVICES`` (``ASCEND_RT_VISIBLE_DEVICES``).
    """
    module = {"vllm": "vllm", "sglang": "sglang", "lmdeploy": "lmdeploy"}[backend]
    if importlib.util.find_spec(module) is None and shutil.which(module) is None:
        raise TunelabError(
            f"--backend {backend} needs {module}, which is not installed here: "
            f"`pip install {module}` (on a GPU machine), or use --backend tunelab."
        )
    if args.device and not args.device.startswith(("cuda", "npu")):
        raise TunelabError(f"--backend {backend} runs on GPUs/NPUs, not --device {args.device}.")
    dtype = _dtype(args.dtype)
    py = sys.executable
    if backend == "vllm":
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
        cmd += ["--host", args.host, "--port", str(args.port), "--served-model-name", name]
        cmd += ["--api-key", args.api_key] if args.api_key else []
        cmd += ["--dtype", dtype] if dtype and dtype != "auto" else []
        cmd += ["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []
        if adapters:
            cmd += ["--enable-lora", "--lora-modules", *(f"{k}={v}" for k, v in adapters.items())]
    elif backend == "sglang":
        cmd = [py, "-m", "sglang.launch_server", "--model-path", model_dir]
        cmd += ["--host", args.host, "--port", str(args.port), "--served-model-name", name]
        cmd += ["--api-key", args.api_key] if args.api_key else []
        cmd += ["--dtype", dtype] if dtype and dtype != "auto" else []
        cmd += ["--max-running-requests", str(args.max_num_seqs)] if args.max_num_seqs else []
        if adapters:
            cmd += ["--lora-paths", *(f"{k}={v}" for k, v in adapters.items())]
    else:
        cmd = ["lmdeploy", "serve", "api_server", model_dir]
        cmd += ["--server-name", args.host, "--server-port", str(args.port)]
        cmd += ["--model-name", name]
        cmd += ["--api-keys", args.api_key] if args.api_key else []
        cmd += ["--dtype", dtype] if dtype and dtype != "auto" else []
        cmd += ["--max-batch-size", str(args.max_num_seqs)] if args.max_num_seqs else []
        if adapters:
            cmd += ["--adapters", *(f"{k}={v}" for k, v in adapters.items())]
    mapped = _mapped_flags(backend, args)
    unmapped = [f for f in _NOT_GIVEN if _given(args, f) and f not in mapped]
    if unmapped:
        raise TunelabError(
            f"--backend {backend} has no equivalent of {', '.join(unmapped)}: drop "
            f"{'it' if len(unmapped) == 1 else 'them'}, or use --backend tunelab."
        )
    for flag, extra in mapped.items():
        if _given(args, flag):
            cmd += extra
    return cmd


def backend_env(backend: str, args: argparse.Namespace) -> dict[str, str]:
    """The environment for the backend's process: the device index as visible devices."""
    env = dict(os.environ)
    device = args.device or ""
    if ":" in device:
        kind, index = device.split(":", 1)
        var = "ASCEND_RT_VISIBLE_DEVICES" if kind == "npu" else "CUDA_VISIBLE_DEVICES"
        visible = [d.strip() for d in env.get(var, "").split(",") if d.strip()]
        if visible:  # cuda:1 is the second of the devices already visible, as torch sees it
            if not index.isdigit() or int(index) >= len(visible):
                raise TunelabError(f"--device {device}: only {len(visible)} visible ({var}).")
            index = visible[int(index)]
        env[var] = index
    return env


def add_deploy_flags(
    p: argparse.ArgumentParser, common: argparse.ArgumentParser
) -> dict[str, argparse.ArgumentParser]:
    """``deploy k8s`` flags; ``common`` holds --debug / -q (accepted after the target too).
    Returns the target parsers (for error messages in the target's own usage)."""
    sub = p.add_subparsers(dest="deploy_target", metavar="TARGET")
    sub.required = True
    k = sub.add_parser(
        "k8s",
        parents=[common],
        help="Dockerfile + Deployment/Service + KServe InferenceService",
        description="Write a Dockerfile that serves MODEL with `tunelab serve`, a Kubernetes "
        "Deployment + Service and a KServe InferenceService into --out; copy the model "
        "directory to OUT/model before `docker build` (README.txt there says how).",
    )
    k.add_argument("--model", required=True, help="model spec or directory to serve")
    k.add_argument("--out", required=True, help="output directory")
    k.add_argument("--name", default=None, help="resource name (default: from the model)")
    k.add_argument("--port", type=int, default=8000, help="container port (default: 8000)")
    k.add_argument("--image", default=None, help="image tag (default: tunelab-serve-NAME:latest)")
    k.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu per pod (default: 0)")
    k.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: --name)"
    )
    k.add_argument("--overwrite", action="store_true", help="replace files in --out")
    return sub.choices


def run_deploy(args: argparse.Namespace) -> int:
    from tunelab.hub import looks_like_path
    from tunelab.serve.k8s import write_k8s

    if args.gpus < 0:
        raise TunelabError(f"--gpus must be >= 0 (got {args.gpus}).")
    if not 1 <= args.port <= 65535:
        raise TunelabError(f"--port {args.port} is not a port number (1..65535).")
    model = str(args.model)
    local = model != "default" and "://" not in model and looks_like_path(model)
    if local and not Path(model).expanduser().exists():
        raise TunelabError(f"--model {model} does not exist; give a model directory or hub id.")

    for path in write_k8s(
        args.model,
        Path(args.out),
        name=args.name,
        port=args.port,
        image=args.image,
        gpus=args.gpus,
        served_model_name=args.served_model_name,
        overwrite=args.overwrite,
    ):
        print(path)
    return 0
