"""The server's bounded queue (serve/admission.py), driven directly."""

from __future__ import annotations

import asyncio

import pytest

from tunelab.serve.admission import Admission
from tunelab.serve.errors import APIError


def test_a_client_that_leaves_while_queued_frees_its_place():
    async def main():
        admission = Admission(slots=1, max_queue=1)
        gone = asyncio.Event()

        async def disconnected() -> bool:
            return gone.is_set()

        async with admission.slot(1):  # the engine is full
            waiter = asyncio.create_task(admission.slot(1, disconnected).__aenter__())
            await asyncio.sleep(0.01)
            assert admission.num_waiting == 1
            with pytest.raises(APIError) as full:  # the queue is full too
                await admission.slot(1).__aenter__()
            assert full.value.status == 429
            gone.set()  # the queued client hangs up
            with pytest.raises(APIError) as left:
                await waiter
            assert left.value.status == 499 and admission.num_waiting == 0
            queued = asyncio.create_task(admission.slot(1, disconnected).__aenter__())
            await asyncio.sleep(0.01)
            assert admission.num_waiting == 1  # room in the queue again
            gone.clear()
        await queued  # granted when the running request ends
        assert admission.free == 0

    asyncio.run(main())
