"""Streaming API over the engine, for servers: ``add_request`` -> async iterator of deltas.

The engine steps in one background thread (model steps block; the event loop must not).
Requests and aborts are queued to that thread, which applies them between steps, so the
engine's state is only ever touched by it; deltas travel back to each request's
``asyncio.Queue`` through ``call_soon_threadsafe``.

>>> async with AsyncEngine.from_pretrained("default") as engine:
...     async for delta in engine.add_request("Hello", SamplingParams(max_tokens=16)):
...         print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.engine.llm_engine import EngineConfig, LLMEngine
from tunelab.engine.lora import LoadedAdapter
from tunelab.engine.outputs import StreamDelta
from tunelab.engine.prompts import Prompt
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

# A step that raises fails the requests in flight and the loop goes on; this many failed
# steps in a row (a broken device, not a bad request) stop it for good.
MAX_FAILED_STEPS = 3


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue
    lora: str | None = None


@dataclass
class _Abort:
    request_id: str
    add: _Add | None = None  # the stream that asked (a consumer leaving); None: the caller


@dataclass
class _Call:
    """Run ``fn(engine)`` in the engine thread, between steps (adapter loading)."""

    fn: Callable[[LLMEngine], Any]
    result: concurrent.futures.Future


class AsyncEngine:
    """Runs an ``LLMEngine`` in a background thread; many coroutines stream from it at once."""

    def __init__(self, engine: LLMEngine):
        engine.config.stream_text = True  # every delta carries its text
        self.engine = engine
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self._streams: dict[str, _Add] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        # Held while a command is queued and while shutdown() decides what is left, so that
        # a request added during a shutdown is run by a new loop instead of being lost.
        self._lock = threading.Lock()
        self._stopping = False  # shutdown() is waiting for the loop: start() must not race it
        self._error: BaseException | None = None
        self._failed_steps = 0  # consecutive steps that raised

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path = "default",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> AsyncEngine:
        return cls(LLMEngine.from_pretrained(spec, device, dtype, config))

    @property
    def error(self) -> BaseException | None:
        """What stopped the step loop (None while it is healthy); new requests are refused."""
        return self._error

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop (``add_request`` starts it too)."""
        if self._stopping:  # shutdown() restarts the loop itself if commands are left
            return
        if self._thread is None or not self._thread.is_alive():
            # OpenMP thread counts are per thread: give the loop the caller's setting.
            threads = torch.get_num_threads()
            self._thread = threading.Thread(
                target=self._loop, args=(threads,), name="tunelab-engine", daemon=True
            )
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the step loop; unfinished requests are aborted. Requests (or adapter calls)
        queued while it stops are not lost: a new loop starts for them."""
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                self._thread = None
                return
            self._commands.put(None)
            self._stopping = True
        try:
            thread.join()
        finally:  # (a Ctrl-C during the join must not leave start() disabled)
            with self._lock:
                mine = self._thread is thread  # a concurrent shutdown() may have gone first
                if mine:
                    self._thread, self._stopping = None, False
        if not mine:
            return
        with self._lock:
            left = []
            while True:
                try:
                    left.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            # Requests and calls queued behind the stop run on a new loop (with the aborts
            # of those whose consumer has left since); without any, the loop stays down.
            if not any(isinstance(c, _Add | _Call) for c in left):
                return
            if self._error is not None:  # the loop died: answer them rather than hang
                error = TunelabError(f"the engine loop stopped after an error: {self._error}")
                for command in left:
                    if isinstance(command, _Call):
                        command.result.set_exception(error)
                    elif isinstance(command, _Add):
                        self._notify(command, error)
                return
            for command in left:
                if command is not None:
                    self._commands.put(command)
            self.start()

    def _send(self, command: _Add | _Call) -> None:
        with self._lock:
            self.start()
            self._commands.put(command)

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.shutdown)

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Queue a prompt now; iterate the result for its deltas (the last has finished=True).

        Call it from a coroutine (it binds to the running event loop). ``lora`` names a loaded
        adapter (None: the base model). A request that cannot run (an unknown adapter too)
        yields one delta with finish_reason "error" and the message in ``error``.
        """
        if self._error is not None:
            raise TunelabError(f"the engine loop stopped after an error: {self._error}")
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        add = _Add(
            request_id,
            prompt,
            params or SamplingParams(),
            asyncio.get_running_loop(),
            asyncio.Queue(),
            lora,
        )
        self._send(add)
        return self._iterate(add)

    async def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load a PEFT LoRA adapter as ``name`` between two steps; raises if it is bad."""
        return await self._call(lambda engine: engine.load_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (refused while an unfinished request uses it)."""
        await self._call(lambda engine: engine.unload_adapter(name))

    async def _call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        if self._error is not None:
            raise TunelabError(f"the engine loop stopped after an error: {self._error}")
        call = _Call(fn, concurrent.futures.Future())
        self._send(call)
        return await asyncio.wrap_future(call.result)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" and its blocks are freed."""
        self._commands.put(_Abort(str(request_id)))

    async def _iterate(self, add: _Add) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            while not finished:
                delta = await add.deltas.get()
                if isinstance(delta, TunelabError):
                    raise delta
                if isinstance(delta, BaseException):
                    raise TunelabError(f"the engine loop failed: {delta}") from delta
                finished = delta.finished
                yield delta
        finally:
            if not finished:  # the consumer went away (client disconnect, break)
                self._commands.put(_Abort(add.request_id, add))

    # ---- the engine thread -----------------------------------------------------------------

    def _loop(self, threads: int) -> None:
        torch.set_num_threads(threads)
        engine = self.engine
        try:
            while True:
                idle = not engine.has_unfinished()
                try:  # block only while there is nothing to step
                    command = self._commands.get(block=idle)
                except queue.Empty:
                    command = False
                while command is not False:
                    if command is None:
                        return self._abort_all()
                    self._apply(command)
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = False
                if engine.has_unfinished():
                    try:
                        deltas = engine.step()
                    except Exception as e:
                        self._step_failed(e)
                        continue
                    self._failed_steps = 0
                    for delta in deltas:
                        self._deliver(delta)
        except BaseException as e:  # surface the failure to every waiting stream
            log.exception("engine loop failed")
            self._error = e
            for add in self._streams.values():
                self._notify(add, e)
            self._streams.clear()
            while True:  # nobody will run the queued calls: fail them rather than hang
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Call):
                    command.result.set_exception(TunelabError(f"the engine loop failed: {e}"))
                elif isinstance(command, _Add):  # queued before the failure: answer it
                    self._notify(command, TunelabError(f"the engine loop failed: {e}"))

    def _step_failed(self, e: Exception) -> None:
        """Fail every request in flight (which one broke the step is unknown) and free them;
        re-raise once steps keep failing."""
        self._failed_steps += 1
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise e
        log.exception("engine step failed; failing the %d requests in flight", len(self._streams))
        engine = self.engine
        for request_id in list(engine.requests):
            engine.abort(request_id)
            engine.pop_output(request_id)
        error = TunelabError(f"the engine step failed ({type(e).__name__}: {e})")
        for add in self._streams.values():
            self._notify(add, error)
        self._streams.clear()

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        engine = self.engine
        if isinstance(command, _Call):
            try:
                command.result.set_result(command.fn(engine))
            except Exception as e:  # a bad adapter: the caller gets the error, the loop goes on
                command.result.set_exception(e)
            return
        if isinstance(command, _Abort):
            add = self._streams.get(command.request_id)
            if add is None or command.add not in (None, add):
                return  # finished already, or another stream's (a refused duplicate id)
            deltas = engine.abort(command.request_id)
            for delta in deltas:
                self._deliver(delta)
            if not deltas:  # it had finished (failed at add time, say): end the stream
                self._streams.pop(command.request_id, None)
                engine.pop_output(command.request_id)
                abort = StreamDelta(command.request_id, 0, "", [], "abort", finished=True)
                self._notify(add, abort)
            return
        if command.request_id in self._streams or command.request_id in engine.requests:
            error = f"request id {command.request_id!r} is already in use; pick another."
            delta = StreamDelta(command.request_id, 0, "", [], "error", error=error, finished=True)
            self._notify(command, delta)
            return
        self._streams[command.request_id] = command
        engine.add_request(command.prompt, command.params, command.request_id, lora=command.lora)
        for delta in engine.take_failed():  # refused at add time: tell it now, not next step
            self._deliver(delta)

    def _deliver(self, delta: StreamDelta) -> None:
        add = self._streams.get(delta.request_id)
        if add is None:
            return
        if delta.finished:
            del self._streams[delta.request_id]
            self.engine.pop_output(delta.request_id)
        if not self._notify(add, delta):  # its event loop is gone: nobody reads it any more
            self._streams.pop(delta.request_id, None)
            if delta.request_id in self.engine.requests:
                self.engine.abort(delta.request_id)
                self.engine.pop_output(delta.request_id)

    @staticmethod
    def _notify(add: _Add, item: StreamDelta | BaseException) -> bool:
        """Hand ``item`` to the stream's event loop; False if that loop has closed."""
        try:
            add.loop.call_soon_threadsafe(add.deltas.put_nowait, item)
            return True
        except RuntimeError:  # "Event loop is closed": its asyncio.run() returned
            return False

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._apply(_Abort(request_id))
