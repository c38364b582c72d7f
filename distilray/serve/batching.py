"""Requests' texts gathered into shared forward passes (`TextBatcher`) or shared calls
(`CallCoalescer`): asyncio only, no Ray, no torch."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any


class QueueFull(Exception):
    """A request's texts could not start within the queue's wait budget: answered 503 with
    Retry-After, at once or when the budget ran out, instead of waiting for the caller's timeout."""

    def __init__(self, wait_s: float, budget_s: float, expired: bool, retry_after_s: float = 1.0):
        self.wait_s, self.budget_s, self.expired = wait_s, budget_s, expired
        self.retry_after_s = retry_after_s
        what = "waited" if expired else "would wait"
        super().__init__(f"{what} {wait_s:.2f}s to start, over the queue's {budget_s:.2f}s budget")

    def __reduce__(self):  # raised in a Classifier replica, re-raised in the Ingress
        return QueueFull, (self.wait_s, self.budget_s, self.expired, self.retry_after_s)


class AdmissionRate:
    """Requests refused and admitted over the last one to two seconds, for a `Retry-After`
    that spreads refused callers over the time the queue needs to take them: `base` while
    few are refused, `base` × refused / admitted under a flood (at most `cap_s`). With a
    fixed 1 s, 400 refused callers come back 400 times a second, and answering them takes
    the CPU the accepted requests' forward passes need."""

    def __init__(self, base_s: float, cap_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.base_s, self.cap_s, self.clock = base_s, cap_s, clock
        self.start = clock()
        self.now_counts = [0, 0]  # refused, admitted in the current second
        self.last_counts = [0, 0]  # ... in the second before

    def _roll(self) -> None:
        now = self.clock()
        if now - self.start >= 1.0:
            self.last_counts = self.now_counts if now - self.start < 2.0 else [0, 0]
            self.now_counts, self.start = [0, 0], now

    def count(self, refused: int = 0, admitted: int = 0) -> None:
        self._roll()
        self.now_counts[0] += refused
        self.now_counts[1] += admitted

    def refusing(self) -> bool:
        """Whether any request was refused in the last one to two seconds: overloaded."""
        self._roll()
        return self.now_counts[0] + self.last_counts[0] > 0

    def retry_after_s(self) -> float:
        self._roll()
        refused = self.now_counts[0] + self.last_counts[0]
        admitted = self.now_counts[1] + self.last_counts[1]
        return min(max(self.cap_s, self.base_s),
                   max(self.base_s, self.base_s * refused / max(admitted, 1)))


class _Request:
    """One request's texts in a queue: taken into one or more passes (calls), answered once
    all its texts have their results."""

    __slots__ = ("texts", "future", "timer", "taken", "results", "answered")

    def __init__(self, texts: list[str], future: asyncio.Future, timer: Any):
        self.texts, self.future, self.timer = texts, future, timer
        self.taken = 0  # texts already in a pass (call)
        self.results: list[Any] = [None] * len(texts)
        self.answered = 0

    @property
    def waiting(self) -> int:
        return len(self.texts) - self.taken


class TextQueue:
    """Requests' texts waiting to leave together, and handing each request its share back.

    Shared by `TextBatcher` (into one forward pass) and `CallCoalescer` (into one call).
    A request is admitted once, whatever its size: one over `max_batch_size` texts leaves in
    several passes (calls), and gets its answer when the last of them returns.

    The queue is bounded by time: with `max_wait_s`, a request that would wait longer than
    `min(max_wait_s, wait_passes × a pass)` to start (predicted from the queued texts and the
    measured time of a pass) is refused at once, and one still queued after `max_wait_s` is
    refused then. Accepted requests so wait at most about `wait_passes` passes, as at full
    but not excess load, and the refused learn it within `max_wait_s`.

    With `batches_ahead` it is bounded by texts as well: a request is refused while the texts
    ahead of it, queued and in the passes running, fill `batches_ahead` full batches per model
    replica, or one full batch if that is more (two calls in flight per replica still share
    one replica's passes). The time bound alone lets a flood keep a full pass running and a
    full one queued, so an admitted request waits for one such pass and rides the next; this
    keeps the passes, and so the latency, near their size at concurrency `max_batch_size`.
    """

    Batch = list[tuple[_Request, int, int]]
    """A pass's (call's) share of each request: (request, first text, number of texts)."""

    def __init__(self, max_batch_size: int, max_wait_s: float | None = None,
                 wait_passes: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 retry_after_s: float = 1.0, batches_ahead: float | None = None):
        self.max_batch_size = max_batch_size
        self.max_wait_s, self.wait_passes, self.clock = max_wait_s, wait_passes, clock
        self.admission = AdmissionRate(retry_after_s, clock=clock)
        self.pending: collections.deque[_Request] = collections.deque()
        self.queued_texts = 0
        self.pass_s: float | None = None  # moving average of a pass (or call) once one ran
        self.running: list[tuple[float, int]] = []  # (start time, texts) of each pass (call) now running
        self.batches_ahead = batches_ahead
        self.refused = 0

    def _lanes(self) -> int:
        """Passes (calls) that run side by side."""
        return 1

    def _replicas(self) -> int:
        """Model replicas the lanes feed (each runs one pass at a time)."""
        return 1

    def _busy(self) -> list[tuple[float, int]]:
        """The running passes (calls) that hold a lane now."""
        return self.running

    def predicted_wait_s(self, texts_ahead: int) -> float:
        """Seconds until a request behind `texts_ahead` queued texts starts."""
        if self.pass_s is None:
            return 0.0  # nothing measured yet
        lanes, now, busy = self._lanes(), self.clock(), self._busy()
        first_free = 0.0 if len(busy) < lanes else max(
            0.0, min(self.pass_s - (now - t) for t, _ in busy))
        return first_free + (texts_ahead // self.max_batch_size) * self.pass_s / lanes

    def budget_s(self) -> float | None:
        if self.max_wait_s is None:
            return None
        if self.pass_s is None:
            return self.max_wait_s
        return min(self.max_wait_s, self.wait_passes * self.pass_s)

    def refusal(self, waited_s: float = 0.0) -> QueueFull | None:
        """Why a request arriving now is refused (counted as refused), or None to admit it.
        Also asked before a request's body is read (`http.AdmissionGate`): its size does not
        matter, since a request is admitted whole. `waited_s`: how long it already waited
        before the server read it, which counts against the budget while the queue is
        refusing others (overloaded: a request read late in a flood would be answered late),
        and not otherwise (a request read a little late by a busy but not overloaded server
        is still answered well within its budget's purpose)."""
        budget = self.budget_s()
        if budget is None or not self.pending:
            return None
        wait = self.predicted_wait_s(self.queued_texts)
        if waited_s > 0 and self.admission.refusing():
            wait += waited_s
        if wait > budget:
            return self._refusal(wait, budget, expired=False)
        if self.batches_ahead is not None and self.pass_s is not None:
            ahead = self.queued_texts + sum(n for _, n in self._busy())
            per_pass = self.max_batch_size * self._replicas()
            limit = max(self.max_batch_size, self.batches_ahead * per_pass)
            if ahead >= limit:
                return self._refusal((ahead + 1) / per_pass * self.pass_s,
                                     limit / per_pass * self.pass_s, expired=False)
        return None

    def _enqueue(self, texts: list[str]) -> asyncio.Future:
        refused = self.refusal()
        if refused is not None:
            raise refused
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        timer = None
        if self.max_wait_s is not None:
            timer = loop.call_later(self.max_wait_s, self._expire, future, self.clock())
        self.pending.append(_Request(list(texts), future, timer))
        self.queued_texts += len(texts)
        return future

    def _refusal(self, wait_s: float, budget_s: float, expired: bool) -> QueueFull:
        self.refused += 1
        self.admission.count(refused=1)
        return QueueFull(wait_s, budget_s, expired, retry_after_s=self.admission.retry_after_s())

    def _expire(self, future: asyncio.Future, queued_at: float) -> None:
        if not future.done():  # nothing taken yet: _take cancels the timer of what it starts
            assert self.max_wait_s is not None
            future.set_exception(self._refusal(self.clock() - queued_at, self.max_wait_s, expired=True))

    def _take(self, limit: int | None = None) -> Batch:
        """Waiting texts, oldest request first, up to `limit` (max_batch_size by default; at
        least one text).

        A request that does not fit waits for the next pass whole, unless the pass would
        otherwise be empty: then it goes in parts of `limit`."""
        limit = limit or self.max_batch_size
        batch: TextQueue.Batch = []
        size = 0
        while self.pending and size < limit:
            req = self.pending[0]
            if req.future.done():  # cancelled by its caller (timeout, disconnect) or expired
                self.pending.popleft()
                self.queued_texts -= req.waiting
                continue
            if batch and size + req.waiting > limit:
                break
            n = min(req.waiting, limit - size)
            if req.taken == 0:
                if req.timer is not None:
                    req.timer.cancel()
                self.admission.count(admitted=1)
            batch.append((req, req.taken, n))
            req.taken += n
            self.queued_texts -= n
            size += n
            if req.waiting == 0:
                self.pending.popleft()
        return batch

    @staticmethod
    def texts_of(batch: Batch) -> list[str]:
        return [t for req, first, n in batch for t in req.texts[first: first + n]]

    def _pass_started(self, texts: int) -> tuple[float, int]:
        entry = (self.clock(), texts)
        self.running.append(entry)
        return entry

    def _pass_ended(self, entry: tuple[float, int], ok: bool = True) -> None:
        self.running.remove(entry)
        if not ok:  # a failed call says nothing about how long a pass takes
            return
        took = self.clock() - entry[0]
        self.pass_s = took if self.pass_s is None else 0.8 * self.pass_s + 0.2 * took

    @staticmethod
    def _settle(batch: Batch, results: Sequence[Any] | None = None,
                error: BaseException | None = None) -> None:
        """Each request still waiting gets its slice of `results` (its answer once all its
        texts have theirs), or `error`."""
        i = 0
        for req, first, n in batch:
            if not req.future.done():
                if error is not None:
                    req.future.set_exception(error)
                else:
                    req.results[first: first + n] = results[i: i + n]  # type: ignore[index]
                    req.answered += n
                    if req.answered == len(req.texts):
                        req.future.set_result(req.results)
            i += n


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
                 executor: concurrent.futures.Executor | None = None,
                 max_wait_s: float | None = None, wait_passes: float = 1.0,
                 retry_after_s: float = 1.0, batches_ahead: float | None = None):
        super().__init__(max_batch_size, max_wait_s, wait_passes, retry_after_s=retry_after_s,
                         batches_ahead=batches_ahead)
        self.run, self.wait_s = run, wait_s
        self.on_batch = on_batch
        self.executor = executor
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def forwarding(self) -> int:
        """Texts in the forward pass now running."""
        return sum(n for _, n in self.running)

    async def submit(self, texts: list[str]) -> list[Any]:
        """Predictions for `texts`, computed in shared forward passes (one per max_batch_size)."""
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = self._enqueue(texts)  # QueueFull when over its time or texts bound
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
            flat = self.texts_of(batch)
            if self.on_batch is not None:
                self.on_batch(len(flat))
            started = self._pass_started(len(flat))
            try:
                # off the event loop, so it keeps accepting and queueing requests
                preds = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.run, flat)
            except Exception as exc:
                self._pass_ended(started, ok=False)
                self._settle(batch, error=exc)
                continue
            self._pass_ended(started)
            self._settle(batch, preds)


class CallCoalescer(TextQueue):
    """Merges the texts of concurrent requests into shared downstream calls.

    One call per request costs an actor hop per request; under load the Classifier forwards
    what queued during its last pass anyway. Here a request that finds a free slot leaves at
    once (a lone request is never delayed); while every slot is busy, requests queue and
    leave together when one frees up, up to a replica's share of `max_batch_size` texts per
    call (`call_texts`).

    `call(texts)` returns `(source, results)`: the slots are `calls_per_source` per distinct
    source (model replica) that answered within `window_s`, so calls fan out as replicas are
    added. With one call per replica, a replica idles while its answer travels back and the
    next call comes; with two, the next call already waits in the replica's own queue and
    joins its next forward pass. A call then lasts up to two passes, and so does the wait
    budget of `wait_passes=1` (the measured "pass" here is a call).

    A call running past `STALL_PASSES` passes (at least `STALL_MIN_S`) stops holding its
    slot: its replica is likely gone with its node, and Ray says so only seconds later.
    Requests waiting behind it then leave for a live replica (one extra call per slot at
    most), instead of waiting for the error and its retry.
    """

    STALL_PASSES = 3.0
    STALL_MIN_S = 0.25

    def __init__(self, call: Callable[[list[str]], Any], max_batch_size: int,
                 window_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 on_queue: Callable[[int], None] | None = None,
                 max_wait_s: float | None = None, wait_passes: float = 1.0,
                 retry_after_s: float = 1.0, calls_per_source: int = 1,
                 batches_ahead: float | None = None):
        super().__init__(max_batch_size, max_wait_s, wait_passes, clock, retry_after_s, batches_ahead)
        self.call, self.window_s = call, window_s
        self.calls_per_source = calls_per_source
        self.on_queue = on_queue
        self.sources: dict[Any, float] = {}

    @property
    def in_flight(self) -> int:
        """Calls now running (stalled ones included)."""
        return len(self.running)

    @property
    def slots(self) -> int:
        now = self.clock()
        self.sources = {k: t for k, t in self.sources.items() if now - t <= self.window_s}
        return self.calls_per_source * max(1, len(self.sources))

    def _lanes(self) -> int:
        return self.slots

    def _replicas(self) -> int:
        return self.slots // self.calls_per_source

    def _stall_s(self) -> float | None:
        return None if self.pass_s is None else max(self.STALL_MIN_S, self.STALL_PASSES * self.pass_s)

    def _busy(self) -> list[tuple[float, int]]:
        limit, now = self._stall_s(), self.clock()
        if limit is None:
            return self.running
        live = [t for t, _ in self.running if now - t <= limit]
        n = max(len(live), len(self.running) - self.slots)  # ignore at most one stalled call per slot
        return self.running[len(self.running) - n:]

    async def submit(self, texts: list[str]) -> list[Any]:
        """Results for `texts`, from shared calls (one per `call_texts`)."""
        future = self._enqueue(texts)  # QueueFull when over its time or texts bound
        self._dispatch()
        return await future

    def call_texts(self) -> int:
        """Most texts in one call: a replica's share of a batch, max_batch_size / replicas.

        Serve's router balances calls, not texts: texts that queued while every slot was busy,
        sent as one call, became one replica's long pass while the other ran one-text calls
        (a flood's trace: 28 texts in a 155 ms pass beside passes of 1). Sent in shares, the
        rest leaves with the next free slot, most likely on the other replica."""
        return -(-self.max_batch_size // self._replicas())

    def _dispatch(self) -> None:
        slots = self.slots
        while self.pending and len(self._busy()) < slots:
            batch = self._take(self.call_texts())
            if not batch:
                break
            loop = asyncio.get_running_loop()
            loop.create_task(self._run(batch, self._pass_started(sum(n for _, _, n in batch))))
            stall = self._stall_s()
            if stall is not None:  # look again once this call would count as stalled
                loop.call_later(stall + 0.01, self._dispatch)
        if self.on_queue is not None:
            self.on_queue(self.queued_texts)

    async def _run(self, batch: TextQueue.Batch, started: tuple[float, int]) -> None:
        ok = False
        try:
            source, results = await self.call(self.texts_of(batch))
        except Exception as exc:
            self._settle(batch, error=exc)
        else:
            ok = True
            self.sources[source] = self.clock()
            self._settle(batch, results)
        finally:
            self._pass_ended(started, ok)
            self._dispatch()
