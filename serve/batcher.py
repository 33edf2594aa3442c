"""Micro-batching: requests that arrive while the model is busy are answered together, by one Suggester call.

Most of a single suggestion's cost is fixed per call (scikit-learn's input checks and the per-target calibrators), so
one call for 8 texts costs about twice one call for 1 text. The batcher never waits for company: a request that
finds the model idle runs at once, alone; requests that arrive during a call join the next one. Results are the same
as one call per record (every step of the model works row by row), which the tests check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("serve.batcher")

# A suggest function: (title, text) pairs and top_k in, one suggestion dict per pair out.
SuggestFn = Callable[[Sequence[tuple[str | None, str]], int], list[dict]]


@dataclass
class _Job:
    records: Sequence[tuple[str | None, str]]
    top_k: int
    future: asyncio.Future


class MicroBatcher:
    """Queues suggestion jobs and runs them through ``suggest`` in batches of up to ``max_records`` records.

    The model runs on the event loop's own thread: a worker process serves one model call at a time either way (the
    GIL), and running inline avoids a thread hand-off per batch. A job larger than ``max_records`` runs alone.
    """

    def __init__(self, suggest: SuggestFn, max_records: int = 64) -> None:
        self._suggest = suggest
        self.max_records = max_records
        self._queue: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.calls = 0
        self.records = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sanshi-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self._queue:
            if not job.future.done():
                job.future.cancel()
        self._queue.clear()

    async def submit(self, records: Sequence[tuple[str | None, str]], top_k: int) -> list[dict]:
        """Suggestions for ``records``, computed in whichever batch they land in."""
        if self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(records, top_k, future))
        self._wakeup.set()
        return await future

    def _take(self) -> list[_Job]:
        """Jobs for the next call, oldest first, up to ``max_records`` records (at least one job)."""
        taken, size = [], 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # the client went away
                self._queue.pop(0)
                continue
            if taken and size + len(job.records) > self.max_records:
                break
            taken.append(self._queue.pop(0))
            size += len(job.records)
        return taken

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Let handlers already woken in this turn of the loop put their jobs in before the batch is cut; when
            # the loop is otherwise idle this costs a few microseconds.
            for _ in range(3):
                before = len(self._queue)
                await asyncio.sleep(0)
                if len(self._queue) == before:
                    break
            jobs = self._take()
            if not jobs:
                continue
            self._compute(jobs)
            # Give the handlers whose results are ready a turn to send their responses before the next batch.
            await asyncio.sleep(0)

    def _compute(self, jobs: list[_Job]) -> None:
        records = [record for job in jobs for record in job.records]
        top_k = max(job.top_k for job in jobs)
        try:
            results = self._suggest(records, top_k)
        except Exception as error:  # every waiting request gets the error (a 500 with a JSON body), not a hang
            log.exception("suggestion batch of %d records failed", len(records))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.calls += 1
        self.records += len(records)
        start = 0
        for job in jobs:
            part = results[start:start + len(job.records)]
            start += len(job.records)
            if job.top_k < top_k:
                part = [_trim_top_k(item, job.top_k) for item in part]
            if not job.future.done():
                job.future.set_result(part)


def _trim_top_k(suggestion: dict, k: int) -> dict:
    """The same suggestion with k labels per target (the list is ordered, so this equals asking for k)."""
    fields = {name: {**item, "top_k": item["top_k"][:k]} for name, item in suggestion["fields"].items()}
    return {**suggestion, "fields": fields}
