"""Request batching: concurrent requests for the same model and sampling settings share one `generate` call.

Glossary: B rows of one generate call (padded to a power of two), N max new tokens of the call (bucketed).

A single worker thread owns the accelerator; the HTTP event loop only submits jobs and awaits their futures, so it
keeps accepting requests while `generate` runs. The worker takes the oldest waiting job and keeps collecting while
jobs keep coming: it stops once no new job has arrived for `window_s`, once `max_wait_s` has passed since the first,
or once `max_batch` rows are waiting (a burst of requests, e.g. clients answering the previous batch's responses,
becomes one call instead of a few that catch only its head). It groups the jobs by (model, temperature, top_p) (the
values `generate` takes for a whole batch) and runs one `generate` per group over all their rows, each row with its own PRNG key, so a
row's sample depends only on its seed and prompt, never on which requests it was batched with. Rows are padded to
a power of two (at least `min_batch`) and N is bucketed to a power of two (at least 16, capped by the context) so that the compiles are
few; each row is then cut to its own `max_tokens`. `close()` finishes every job already submitted, then stops.
`busy_s` sums the wall time of the `generate` calls (their duty cycle against the serving time is what a benchmark
compares with direct `generate`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from framework import inference
from framework.inference import bucket_length
from framework.routing.table import Model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Row:
    """One generated row: new tokens (the stop token included, if reached), their log-probs, whether it stopped."""

    tokens: np.ndarray
    logprobs: np.ndarray
    stopped: bool


@dataclasses.dataclass(eq=False)
class Job:
    """Rows to generate with one model and one setting; `future` receives a list of `Row`."""

    model: str
    prompts: Sequence[np.ndarray]
    seeds: Sequence[int]  # one per row
    max_tokens: int
    temperature: float
    top_p: float | None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    @property
    def group(self):
        return (self.model, float(self.temperature), None if self.top_p is None else float(self.top_p))


class Batcher:
    """The worker thread that serves `Job`s in shared `generate` calls (see the module docstring)."""

    def __init__(
        self,
        models: dict[str, Model],
        *,
        window_s: float = 0.005,
        max_batch: int = 64,
        min_batch: int = 1,
        max_wait_s: float | None = None,
    ):
        if window_s < 0 or max_batch < 1 or min_batch < 1:
            raise ValueError(
                f"Batcher: window_s must be >= 0, max_batch and min_batch >= 1; got {window_s}, {max_batch}, {min_batch}"
            )
        self.models, self.window_s, self.max_batch = models, float(window_s), int(max_batch)
        # Bounds the wait of the first job of a batch however long a burst lasts.
        self.max_wait_s = 4.0 * self.window_s if max_wait_s is None else float(max_wait_s)
        if self.max_wait_s < self.window_s:
            raise ValueError(f"Batcher: max_wait_s {self.max_wait_s} must be >= window_s {self.window_s}")
        self.min_batch = int(min_batch)  # rows are padded to a power of two >= this: fewer distinct compiles
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.calls = 0  # generate calls made (for tests and benchmarks)
        self.rows = 0  # real rows generated
        self.busy_s = 0.0  # wall seconds spent inside generate calls
        self.trace: list | None = None  # set to [] to record each call's (model, padded prompts, N, sampling kwargs)
        self._thread = threading.Thread(target=self._loop, name="lumen-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queues a job; its future resolves to one `Row` per prompt."""
        if self._closed:
            raise RuntimeError("Batcher is closed")
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finishes every submitted job, then stops the worker."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, rows = [first], len(first.prompts)
        now = time.monotonic()
        hard, quiet = now + self.max_wait_s, now + self.window_s
        while rows < self.max_batch:
            left = min(hard, quiet) - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.prompts)
            quiet = time.monotonic() + self.window_s  # the burst goes on: wait for its next job
        return jobs, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            groups: dict = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
        # Chunks of at most max_batch rows (a single job may be larger; it is then split).
        chunks, cur, size = [], [], 0
        for job in jobs:
            if cur and size + len(job.prompts) > self.max_batch:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(job)
            size += len(job.prompts)
        chunks.append(cur)
        for chunk in chunks:
            try:
                results = self.generate(chunk)
            except Exception as e:  # noqa: BLE001 (the error belongs to the requests, not to the worker)
                log.exception("generate failed")
                for job in chunk:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, rows in zip(chunk, results):
                job.future.set_result(rows)

    def generate(self, jobs: list[Job]) -> list[list[Row]]:
        """One `generate` call over every row of `jobs` (same model and setting); rows per job."""
        model = self.models[jobs[0].model]
        cfg = model.cfg
        prompts = [p for j in jobs for p in j.prompts]
        seeds = [s for j in jobs for s in j.seeds]
        B = len(prompts)
        Bp = bucket_length(B, 1 << 30, minimum=self.min_batch)
        longest = max(len(p) for p in prompts)
        want = max(j.max_tokens for j in jobs)
        N = min(bucket_length(want, 1 << 30, minimum=16), cfg.max_seq_len - longest)
        temperature = jobs[0].temperature
        kw = {}
        if temperature > 0:
            keys = [jax.random.key(s) for s in seeds] + [jax.random.key(0)] * (Bp - B)
            kw = dict(temperature=temperature, top_p=jobs[0].top_p, rng=jax.numpy.stack(keys))
        padded = prompts + [prompts[0]] * (Bp - B)
        if self.trace is not None:
            self.trace.append((jobs[0].model, padded, N, kw, [j.max_tokens for j in jobs for _ in j.prompts]))
        t0 = time.perf_counter()
        out = inference.generate(model.params, cfg, padded, max_new_tokens=N, **kw)
        tokens, lps, lens = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
        self.busy_s += time.perf_counter() - t0
        self.calls += 1
        self.rows += B
        stops = set(cfg.eos_ids)
        results, r = [], 0
        for job in jobs:
            rows = []
            for _ in job.prompts:
                n = min(int(lens[r]), job.max_tokens)
                toks = tokens[r, :n]
                rows.append(Row(toks, lps[r, :n], bool(n and int(toks[-1]) in stops)))
                r += 1
            results.append(rows)
        return results
