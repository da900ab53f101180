"""Run generations on one engine for many concurrent requests: a bounded asyncio-side queue in
front of one engine thread.

A waiting request is an awaiting coroutine, not a blocked worker thread, so the event loop (and
``GET /v1/models``) stays free however many wait; past ``max_queue`` waiting requests a new one is
refused at once (:class:`ServerBusy`, HTTP 429 with ``Retry-After``). The running generation
decodes on the engine's own thread and hands its text chunks to the loop; a client that goes away
sets the job's ``cancel`` event, which the decode loop checks before every token, and the engine
is handed to the next request as soon as that generation has returned.

A batched engine (several requests decoded together, each with its own deltas) can replace this
class behind the same two calls: ``await submit(...)`` and ``await job.next()``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cmc_edge.errors import CmcError, GenerationTimeout

log = logging.getLogger(__name__)


class ServerBusy(CmcError):
    """Too many requests are already waiting for the engine."""

    def __init__(self, problem: str, fix: str | None = None, *, retry_after_s: int = 1):
        self.retry_after_s = retry_after_s
        super().__init__(problem, fix)


class Job:
    """One generation's output, as events for the event loop: ``("chunk", text)``, then
    ``("end", Generation)`` or ``("error", exception)``. Set ``cancel`` to stop it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()     # bounded by max_tokens
        self.cancel = threading.Event()

    def put(self, kind: str, value) -> None:        # from the engine thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:                         # the loop is closed: the server is shutting down
            self.cancel.set()

    async def next(self) -> tuple[str, object]:
        return await self._events.get()


class EngineRunner:
    def __init__(self, engine, *, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._lock: asyncio.Lock | None = None        # made on first use, in the server's event loop
        self._waiting = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmc-engine")
        self._mean_s = 1.0                           # running mean of a generation's time, for Retry-After
        self._current: Job | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    async def submit(self, prompt, params, *, alphas, deadline: float, whole=None) -> Job:
        """Wait (at most until ``deadline``, a ``time.monotonic()`` value) for the engine, then start
        generating (``alphas`` and ``whole`` as in :meth:`Engine.generate`). Raises :class:`ServerBusy` when the queue is full, :class:`GenerationTimeout`
        when the engine stayed busy until the deadline."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._lock.locked() and self._waiting >= self.max_queue:
            retry = max(1, math.ceil(self._mean_s * (self._waiting + 1)))
            raise ServerBusy(f"{self._waiting} requests are already waiting for the model", fix=f"retry in {retry} s",
                             retry_after_s=retry)
        self._waiting += 1
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._lock.acquire()
        except TimeoutError:
            raise GenerationTimeout("the server stayed busy for the request's whole time limit",
                                    fix="retry later") from None
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        job = self._current = Job(loop)
        try:
            fut = self._thread.submit(self._work, job, prompt, params, alphas, deadline, whole)
        except BaseException:
            self._lock.release()
            raise
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(self._lock.release))
        return job

    def _work(self, job: Job, prompt, params, alphas, deadline, whole) -> None:
        t0 = time.monotonic()
        try:
            gen = self.engine.generate(prompt, params, alphas=alphas, deadline=deadline, cancel=job.cancel,
                                       whole=whole)
            for chunk in gen:
                job.put("chunk", chunk)
            job.put("end", gen)
        except CmcError as exc:
            job.put("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, logged here
            log.exception("generation failed")
            job.put("error", exc)
        finally:
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t0)

    def close(self) -> None:
        """Stop the running generation (before its next token) and wait for the engine thread, so the
        engine can be closed safely."""
        if self._current is not None:
            self._current.cancel.set()
        self._thread.shutdown(wait=True)
