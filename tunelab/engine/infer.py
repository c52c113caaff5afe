"""``tunelab infer``: batch inference over a JSONL file, resumable.

Input lines are ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}``. A
``prompt`` goes through the model's chat template as one user message (like ``generate``)
unless ``raw``; ``messages`` always do. Each result is appended to the output as soon as it
is done and flushed, so an interrupted run loses nothing: running again skips the ids already
in the output.

Output lines: ``{"id", "output", "finish_reason", "prompt_tokens", "completion_tokens"}``
(``outputs``: the list of texts when ``n`` > 1; ``error`` when the request failed). Ids keep
their JSON type; they are matched as text, so ``1`` and ``"1"`` are the same id. A failed
request's line is dropped and the request retried when the same command runs again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.atomic import atomic_file
from tunelab.engine.llm_engine import EngineConfig, LLMEngine
from tunelab.engine.outputs import RequestOutput
from tunelab.engine.prompts import check_strings
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024  # requests queued in the engine at once (bounds memory on huge files)


@dataclass
class InferSummary:
    written: int  # result lines this call appended
    failed: int  # of them, requests that failed (their line holds "error")


def run_infer(
    model: str,
    input_path: str | Path,
    output_path: str | Path,
    params: SamplingParams,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapter: str | None = None,
    raw: bool = False,
    system: str | None = None,
    engine_config: EngineConfig | None = None,
    show_progress: bool = True,
) -> InferSummary:
    """Complete every record of ``input_path`` not yet in ``output_path``.

    ``adapter``: a PEFT LoRA adapter directory applied to every request (not merged).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    _check_output(input_path, output_path)
    records = read_records(input_path)
    done = finished_ids(output_path)
    todo = [r for r in records if key(r) not in done]
    if done:
        log.info("resuming: %d of %d records already in %s", len(done), len(records), output_path)
    if not todo:
        return InferSummary(0, 0)
    engine = LLMEngine.from_pretrained(model, device, dtype, engine_config)
    lora = None
    if adapter is not None:
        lora = engine.load_adapter("adapter", adapter).name
    ids = {key(r): r["id"] for r in todo}  # request id (text) -> the id as the input gave it
    summary = InferSummary(0, 0)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as out, _progress(show_progress) as bar:
        task = bar.add_task("infer", total=len(records), completed=len(records) - len(todo))

        def write(result: RequestOutput) -> None:
            _write(out, result, ids[result.request_id])
            bar.advance(task)
            summary.written += 1
            summary.failed += result.error is not None

        in_flight = 0
        for record in todo:  # fill the engine, then refill as results come out
            prompt = _prompt(record, raw, system)
            engine.add_request(prompt, params, request_id=key(record), lora=lora)
            in_flight += 1
            if in_flight < MAX_IN_FLIGHT:
                continue
            in_flight -= _drain(engine, write, until_one=True)
        while engine.has_unfinished():
            _drain(engine, write, until_one=False)
    return summary


def key(record: dict) -> str:
    """A record's id as text: what resume matches on (and the engine's request id)."""
    return str(record["id"])


def _check_output(input_path: Path, output_path: Path) -> None:
    if output_path.is_dir():
        raise TunelabError(f"--output {output_path} is a directory; give a .jsonl file path.")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise TunelabError(
            f"--output {output_path} is the input file; write the results to another file."
        )


def _drain(engine: LLMEngine, write, until_one: bool) -> int:
    """Step the engine, writing finished requests; stop after one result if ``until_one``."""
    written = 0
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finished:
                write(engine.pop_output(delta.request_id))
                written += 1
        if until_one and written:
            break
    return written


def _write(out, result: RequestOutput, record_id: Any) -> None:
    texts = [o.text for o in result.outputs]
    line: dict[str, Any] = {
        "id": record_id,
        "output": texts[0],
        "finish_reason": result.outputs[0].finish_reason,
        "prompt_tokens": len(result.prompt_token_ids),
        "completion_tokens": sum(len(o.token_ids) for o in result.outputs),
    }
    if len(texts) > 1:
        line["outputs"] = texts
    if result.error:
        line["error"] = result.error
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()


def _prompt(record: dict, raw: bool, system: str | None):
    if "messages" in record:
        return record["messages"]
    if raw:
        return record["prompt"]
    system_msg = [{"role": "system", "content": system}] if system else []
    return [*system_msg, {"role": "user", "content": record["prompt"]}]


def read_records(path: Path) -> list[dict]:
    """Parse and check the input JSONL (ids unique as text: ``1`` and ``"1"`` clash)."""
    if path.is_dir():
        raise TunelabError(f"--input {path} is a directory; give a JSONL file.")
    if not path.is_file():
        raise TunelabError(f"input file {path} does not exist.")
    records, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TunelabError(f"{where} is not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or "id" not in record:
                raise TunelabError(
                    f'{where}: each line needs an "id" (and "prompt" or "messages").'
                )
            check_strings(record, where)  # JSON allows lone surrogates: "\\ud800"
            has_prompt = isinstance(record.get("prompt"), str)
            has_messages = isinstance(record.get("messages"), list)
            if has_prompt == has_messages:
                raise TunelabError(
                    f'{where}: give exactly one of "prompt" (text) or "messages" (a list of '
                    '{"role", "content"}).'
                )
            if not isinstance(record["id"], str | int) or isinstance(record["id"], bool):
                raise TunelabError(f'{where}: "id" must be a string or an integer.')
            if key(record) in seen:
                raise TunelabError(
                    f"{where}: id {key(record)!r} appears twice; ids must be unique."
                )
            seen.add(key(record))
            records.append(record)
    return records


def finished_ids(path: Path) -> set[str]:
    """Ids (as text) already done in ``path``. A torn last line (a crash mid-write) is cut
    off, and the lines of failed requests are dropped, so that they are tried again."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s ends with an incomplete line; it will be redone", path)
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        data = data[:keep]
    ids, kept, failed = set(), [], 0
    # Split the bytes on b"\n" (not splitlines(): outputs may hold U+2028 / U+0085), and keep
    # the kept lines' bytes as they are when the failed ones are dropped.
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            result = json.loads(raw.decode("utf-8", errors="replace"))
            record_id = str(result["id"])
        except (json.JSONDecodeError, TypeError, KeyError):
            raise TunelabError(
                f"{path}:{lineno} is not a result line of tunelab infer (no JSON with an "
                '"id"): point --output at a new file, or delete that line to resume.'
            ) from None
        if result.get("error") is not None:
            failed += 1
            continue
        ids.add(record_id)
        kept.append(raw + b"\n")
    if failed:
        log.info("retrying %d failed request(s) from %s", failed, path)
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"".join(kept))
    return ids


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
