"""The server's bounded queue: at most ``slots`` sequences in the engine, ``max_queue`` waiting.

A request takes ``n`` slots (its samples) while it runs; one that finds the engine full waits
in FIFO order, and one that finds the queue full is refused with 429 and Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from tunelab.serve.errors import APIError

DISCONNECT_POLL_S = 0.05  # how often a queued request checks that its client is still there


class Admission:
    def __init__(
        self,
        slots: int,
        max_queue: int,
        retry_after: int = 1,
        on_reject: Callable[[], object] | None = None,
    ):
        self.slots, self.max_queue, self.retry_after = max(1, slots), max(0, max_queue), retry_after
        self.on_reject = on_reject
        self.free = self.slots
        self.waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self.waiters)

    @asynccontextmanager
    async def slot(
        self, n: int, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[float]:
        """Hold ``n`` slots for the body; yields the seconds spent waiting for them.

        ``is_disconnected`` (the request's): polled while queued, so a client that gives up
        leaves the queue (499) instead of holding a place nobody waits for.
        """
        n = min(n, self.slots)
        start = time.perf_counter()
        if self.free >= n and not self.waiters:
            self.free -= n
        else:
            if len(self.waiters) >= self.max_queue:
                if self.on_reject is not None:
                    self.on_reject()
                raise APIError(
                    429,
                    f"the server is busy: {self.max_queue} requests are already queued; "
                    f"retry in {self.retry_after}s (or start the server with a larger "
                    "--max-queue).",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(self.retry_after)},
                )
            fut = asyncio.get_running_loop().create_future()
            entry = (n, fut)
            self.waiters.append(entry)
            try:
                await self._wait(fut, is_disconnected)
            except (asyncio.CancelledError, APIError):
                if entry in self.waiters:
                    self.waiters.remove(entry)
                elif fut.done() and not fut.cancelled():
                    self._release(n)  # granted just as we gave up
                raise
        try:
            yield time.perf_counter() - start
        finally:
            self._release(n)

    @staticmethod
    async def _wait(fut: asyncio.Future, is_disconnected) -> None:
        if is_disconnected is None:
            return await fut
        while not fut.done():
            await asyncio.wait([fut], timeout=DISCONNECT_POLL_S)
            if not fut.done() and await is_disconnected():
                raise APIError(499, "client disconnected while queued")

    def _release(self, n: int) -> None:
        self.free += n
        while self.waiters and self.free >= self.waiters[0][0]:
            need, fut = self.waiters.popleft()
            if fut.done():
                continue
            self.free -= need
            fut.set_result(None)
