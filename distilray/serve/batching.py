"""Requests' texts gathered into shared forward passes (`TextBatcher`) or shared calls
(`CallCoalescer`): asyncio only, no Ray, no torch."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any


class TextQueue:
    """Requests' texts waiting to leave together, and handing each request its share back.

    Shared by `TextBatcher` (into one forward pass) and `CallCoalescer` (into one call).
    """

    Batch = list[tuple[list[str], asyncio.Future]]

    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.pending: collections.deque[tuple[list[str], asyncio.Future]] = collections.deque()
        self.queued_texts = 0

    def _enqueue(self, texts: list[str]) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((list(texts), future))
        self.queued_texts += len(texts)
        return future

    def _take(self) -> Batch:
        """Waiting requests, oldest first, up to max_batch_size texts (at least one request)."""
        batch: TextQueue.Batch = []
        size = 0
        while self.pending:
            texts, future = self.pending[0]
            if future.done():  # cancelled by its caller (timeout, disconnect): skip it
                self.pending.popleft()
                self.queued_texts -= len(texts)
                continue
            if batch and size + len(texts) > self.max_batch_size:
                break
            self.pending.popleft()
            self.queued_texts -= len(texts)
            batch.append((texts, future))
            size += len(texts)
        return batch

    @staticmethod
    def _settle(batch: Batch, results: Sequence[Any] | None = None,
                error: BaseException | None = None) -> None:
        """Each request still waiting gets its slice of `results`, or `error`."""
        i = 0
        for texts, future in batch:
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(results[i: i + len(texts)])  # type: ignore[index]
            i += len(texts)


class TextBatcher(TextQueue):
    """Continuous batching: one forward pass at a time, over every text queued meanwhile.

    `serve.batch` (Ray 2.60) keeps forming batches while a forward pass runs and queues them
    behind `max_concurrent_batches`, so under load it forwards many batches of one or two
    texts. Here a batch is formed only when the model is free: it takes every waiting request
    (up to `max_batch_size` texts), and waits `wait_s` for more only if it is not full.
    A lone request is therefore never delayed when `wait_s` is 0.
    """

    def __init__(self, run: Callable[[list[str]], list[Any]], max_batch_size: int,
                 wait_s: float = 0.0, on_batch: Callable[[int], None] | None = None,
                 executor: concurrent.futures.Executor | None = None):
        super().__init__(max_batch_size)
        self.run, self.wait_s = run, wait_s
        self.on_batch = on_batch
        self.executor = executor
        self.forwarding = 0  # texts in the forward pass now running
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, texts: list[str]) -> list[Any]:
        """Predictions for `texts`, computed in a shared forward pass."""
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = self._enqueue(texts)
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.wait_s > 0 and self.queued_texts < self.max_batch_size:
                await asyncio.sleep(self.wait_s)  # let a lightly loaded batch fill up
            batch = self._take()
            if not batch:
                continue
            flat = [t for texts, _ in batch for t in texts]
            if self.on_batch is not None:
                self.on_batch(len(flat))
            self.forwarding = len(flat)
            try:
                # off the event loop, so it keeps accepting and queueing requests
                preds = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.run, flat)
            except Exception as exc:
                self._settle(batch, error=exc)
                continue
            finally:
                self.forwarding = 0
            self._settle(batch, preds)


class CallCoalescer(TextQueue):
    """Merges the texts of concurrent requests into shared downstream calls.

    One call per request costs an actor hop per request; under load the Classifier forwards
    what queued during its last pass anyway. Here a request that finds a free slot leaves at
    once (a lone request is never delayed); while every slot is busy, requests queue and
    leave together, up to `max_batch_size` texts per call, when one frees up.

    `call(texts)` returns `(source, results)`: the slots are the distinct sources (model
    replicas) that answered within `window_s`, so calls fan out as replicas are added and a
    second call never waits behind the first on a lone replica with few texts.
    """

    def __init__(self, call: Callable[[list[str]], Any], max_batch_size: int,
                 window_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 on_queue: Callable[[int], None] | None = None):
        super().__init__(max_batch_size)
        self.call, self.window_s = call, window_s
        self.clock, self.on_queue = clock, on_queue
        self.in_flight = 0
        self.sources: dict[Any, float] = {}

    @property
    def slots(self) -> int:
        now = self.clock()
        self.sources = {k: t for k, t in self.sources.items() if now - t <= self.window_s}
        return max(1, len(self.sources))

    async def submit(self, texts: list[str]) -> list[Any]:
        future = self._enqueue(texts)
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        slots = self.slots
        while self.pending and self.in_flight < slots:
            batch = self._take()
            if not batch:
                break
            self.in_flight += 1
            asyncio.get_running_loop().create_task(self._run(batch))
        if self.on_queue is not None:
            self.on_queue(self.queued_texts)

    async def _run(self, batch: TextQueue.Batch) -> None:
        try:
            source, results = await self.call([t for texts, _ in batch for t in texts])
        except Exception as exc:
            self._settle(batch, error=exc)
        else:
            self.sources[source] = self.clock()
            self._settle(batch, results)
        finally:
            self.in_flight -= 1
            self._dispatch()
