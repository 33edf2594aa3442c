"""Micro-batching in the model's own thread: requests that arrive while the model is busy are answered together, and
a big batch request is cut into calls of bounded size so that it never holds up a single suggestion for long.

Most of a single suggestion's cost is fixed per call (scikit-learn's input checks and the per-target calibrators), so
one call for 8 texts costs about twice one call for 1 text. The batcher never waits for company: a request that
finds the model idle runs at once, alone; requests that arrive during a call join the next one. Results are the same
as one call per record (every step of the model works row by row), which the tests check.

Any call longer than a few milliseconds runs in the model's own worker thread, off the event loop: while it works,
the loop goes on accepting connections, answering ``/health`` and parsing the next requests. A job larger than one
call (``max_records`` records or ``max_chars`` characters) is cut into pieces of that size, and the batcher
alternates between the pieces of big jobs and the queue of small ones, so a single suggestion waits at most for one
piece (tens of milliseconds) instead of for a whole 256-record batch of long texts (seconds).

A call of at most ``inline_chars`` characters (16,000 by default: a few milliseconds of work) runs on the loop
itself. Handing every call to the thread cost a third of the throughput at 8 clients (the thread hand-off, and the
two threads taking the interpreter lock from each other in 5 ms slices while the loop has requests to read); a call
this small blocks the loop no longer than reading a large request does. ``inline_chars=0`` sends every call to the
thread. Calls never overlap: the model is used by one thread at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serve.logs import describe_exception

log = logging.getLogger("serve.batcher")

# A suggest function: (title, text) pairs and top_k in, one suggestion dict per pair out.
SuggestFn = Callable[[Sequence[tuple[str | None, str]], int], list[dict]]


def _chars(record: tuple[str | None, str]) -> int:
    return len(record[0] or "") + len(record[1])


@dataclass
class _Job:
    records: Sequence[tuple[str | None, str]]
    top_k: int
    future: asyncio.Future
    chars: int = 0
    large: bool = False  # cut into pieces
    done: int = 0  # records of a big job already answered
    results: list[dict] = field(default_factory=list)


class MicroBatcher:
    """Queues suggestion jobs and runs them through ``suggest``, ``max_records`` records and ``max_chars``
    characters at most per call (a single record longer than that is one call of its own); calls of more than
    ``inline_chars`` characters run in the model thread."""

    def __init__(
        self, suggest: SuggestFn, max_records: int = 64, max_chars: int = 64_000, inline_chars: int = 0
    ) -> None:
        self._suggest = suggest
        self.max_records = max_records
        self.max_chars = max_chars
        self.inline_chars = inline_chars
        # One thread: the model is called from this thread only (loading and warm-up included), one call at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sanshi-model")
        self._small: deque[_Job] = deque()  # jobs that fit one call; several are answered together
        self._large: deque[_Job] = deque()  # jobs cut into pieces, oldest first
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
        for job in (*self._small, *self._large):
            if not job.future.done():
                job.future.cancel()
        self._small.clear()
        self._large.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, records: Sequence[tuple[str | None, str]], top_k: int) -> list[dict]:
        """Suggestions for ``records``, computed in whichever calls they land in."""
        if self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        future = asyncio.get_running_loop().create_future()
        job = _Job(records, top_k, future, chars=sum(map(_chars, records)))
        job.large = len(records) > self.max_records or job.chars > self.max_chars
        (self._large if job.large else self._small).append(job)
        self._wakeup.set()
        return await future

    def _queued(self) -> int:
        return len(self._small) + len(self._large)

    def _take_small(self) -> list[tuple[_Job, int, int]]:
        """Small jobs for the next call, oldest first, within the call's limits (at least one job)."""
        taken: list[tuple[_Job, int, int]] = []
        size = chars = 0
        while self._small:
            job = self._small[0]
            if job.future.done():  # the request is gone (cancelled)
                self._small.popleft()
                continue
            if taken and (size + len(job.records) > self.max_records or chars + job.chars > self.max_chars):
                break
            taken.append((self._small.popleft(), 0, len(job.records)))
            size += len(job.records)
            chars += job.chars
        return taken

    def _take_piece(self) -> list[tuple[_Job, int, int]]:
        """The next piece of the oldest big job: records from where it stopped, within the call's limits."""
        while self._large and self._large[0].future.done():
            self._large.popleft()  # a request that is gone is not worked on any further
        if not self._large:
            return []
        job = self._large[0]
        start = end = job.done
        chars = 0
        while end < len(job.records) and (
            end == start or (end - start < self.max_records and chars + _chars(job.records[end]) <= self.max_chars)
        ):
            chars += _chars(job.records[end])
            end += 1
        return [(job, start, end)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        big_turn = False
        while True:
            if not self._queued():
                self._wakeup.clear()
                await self._wakeup.wait()
            # Let handlers already woken in this turn of the loop put their jobs in before the call is cut; when
            # the loop is otherwise idle this costs a few microseconds.
            for _ in range(3):
                before = self._queued()
                await asyncio.sleep(0)
                if self._queued() == before:
                    break
            # Alternate: a piece of a big job, then whatever small jobs are waiting, then the next piece.
            if self._large and (big_turn or not self._small):
                work = self._take_piece()
                big_turn = False
            else:
                work = self._take_small()
                big_turn = True
            if not work:
                continue
            records = [record for job, start, end in work for record in job.records[start:end]]
            top_k = max(job.top_k for job, _, _ in work)
            try:
                if sum(map(_chars, records)) <= self.inline_chars:
                    results = self._suggest(records, top_k)  # a few milliseconds: cheaper than a thread hand-off
                else:
                    results = await loop.run_in_executor(self.executor, self._suggest, records, top_k)
            except Exception as error:  # every waiting request gets the error (a 500 with a JSON body), not a hang
                log.error("suggestion call of %d records failed: %s", len(records), describe_exception(error))
                for job, _, _ in work:
                    if not job.future.done():
                        job.future.set_exception(error)
                    if job in self._large:
                        self._large.remove(job)
                continue
            self.calls += 1
            self.records += len(records)
            self._deliver(work, results, top_k)

    def _deliver(self, work: list[tuple[_Job, int, int]], results: list[dict], top_k: int) -> None:
        offset = 0
        for job, start, end in work:
            part = results[offset : offset + end - start]
            offset += end - start
            if job.top_k < top_k:
                part = [_trim_top_k(item, job.top_k) for item in part]
            if not job.large:
                answer = part
            else:
                job.results.extend(part)
                job.done = end
                if end < len(job.records):
                    continue
                self._large.remove(job)
                answer = job.results
            if not job.future.done():
                job.future.set_result(answer)


def _trim_top_k(suggestion: dict, k: int) -> dict:
    """The same suggestion with k labels per target (the list is ordered, so this equals asking for k)."""
    fields = {name: {**item, "top_k": item["top_k"][:k]} for name, item in suggestion["fields"].items()}
    return {**suggestion, "fields": fields}
