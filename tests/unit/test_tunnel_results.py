"""``ResultSink``: what goes inline, and that a cancel never cuts the shared stream's write.

Pure logic with a recording ``send`` and a stub that must not be used (the PushResults path
is covered end to end in ``test_query_tunnel.py``)."""

from __future__ import annotations

import asyncio

from launcher.protocol import controlplane_pb2 as pb
from launcher.worker.results import ResultSink


class _NoCalls:
    def PushResults(self) -> None:
        raise AssertionError("an inline result opened a PushResults call")


def test_a_small_result_goes_up_the_stream_as_one_message() -> None:
    sent: list[pb.WorkerMessage] = []

    async def send(message: pb.WorkerMessage) -> bool:
        sent.append(message)
        return True

    async def scenario() -> None:
        sink = ResultSink("q1", _NoCalls(), send)  # type: ignore[arg-type]
        await sink.add(b"schema")
        await sink.add(b"batch")
        assert await sink.finish(pb.Outcome(ok=True, rows=1))
        sink.close()

    asyncio.run(scenario())
    (message,) = sent
    assert message.result.query_id == "q1" and message.result.ipc == b"schemabatch"
    assert message.result.outcome.ok


def test_a_cancel_during_the_inline_write_lets_the_write_finish() -> None:
    """gRPC cancels a whole stream when one of its writes is cancelled: the write is shielded."""
    finished: list[bool] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def send(message: pb.WorkerMessage) -> bool:
            await release.wait()  # a write held up by flow control
            finished.append(True)
            return True

        sink = ResultSink("q1", _NoCalls(), send)  # type: ignore[arg-type]
        await sink.add(b"ipc")
        task = asyncio.create_task(sink.finish(pb.Outcome(ok=True)))
        await asyncio.sleep(0)  # the write has started
        task.cancel()  # the query's Cancel arrives
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert finished == [True]  # the write itself was not cancelled

    asyncio.run(scenario())
