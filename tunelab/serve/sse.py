"""Server-sent events that notice a client going away, even between tokens.

Starlette's ``StreamingResponse`` only notices a disconnect when a write fails (ASGI >= 2.4);
this one listens for ``http.disconnect`` while streaming, cancels the body at once (so the
engine request is aborted and its KV blocks freed) and always runs ``on_close`` (releases the
request's admission slot), even when the body never started.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class DisconnectAwareStream(StreamingResponse):
    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], Awaitable[object]] | None = None,
    ):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # OSError: the client is gone
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                await self.on_close()
