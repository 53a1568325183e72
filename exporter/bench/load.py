"""Load at one level (a concurrency or a request rate), cut into measurement windows until the last few agree.

Closed loop: N workers, each sends its next request when the previous answered. Open loop: requests start on a
fixed schedule (1/rate apart) whatever the answers, with at most `max_outstanding` in flight. Every request
appends one record at completion, so a window is a slice of the record list between two marks. The warm-up is
load that no window counts. The level ends when `stable_windows` consecutive windows agree within
±`stability_pct` % on throughput and latency, after `max_trials` windows, or when the server stops answering.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .config import BenchConfig, StabilityLatency
from .inputs import Payload
from .result import LevelResult, LlmStats, Percentiles, ServerStats, Window
from .transport import FailedRequest, Transport, open_stats

_ERROR_BACKOFF_S = 0.01  # after a failed request: a dead server answers at once, don't spin


@dataclass
class _Mark:
    index: int  # len(records) at this instant
    t: float
    cpu: float
    stats: Optional[tuple[int, ...]]


@dataclass
class _Recorder:
    # plain: (t_start, t_end, ok); llm: (t_start, t_end, ok, t_first_token, t_last_token, tokens)
    records: list = field(default_factory=list)
    first_error: str = ""
    running: bool = True
    outstanding: int = 0

    def error(self, exc: BaseException) -> None:
        if not self.first_error:
            self.first_error = str(exc) or type(exc).__name__


def percentiles(values_ms: np.ndarray) -> Percentiles:
    if values_ms.size == 0:
        return Percentiles()
    p50, p90, p95, p99 = np.percentile(values_ms, [50, 90, 95, 99])
    return Percentiles(
        count=int(values_ms.size), avg=float(values_ms.mean()), min=float(values_ms.min()),
        p50=float(p50), p90=float(p90), p95=float(p95), p99=float(p99), max=float(values_ms.max()),
    )


class LevelRun:
    def __init__(self, cfg: BenchConfig, transport: Transport, payloads: list[Payload], llm: bool, level: float):
        self.cfg, self.transport, self.payloads, self.llm, self.level = cfg, transport, payloads, llm, level
        self.rec = _Recorder()
        self.tasks: list[asyncio.Task] = []
        self.server_died = False

    # ---- load generators -------------------------------------------------------------------------------
    async def _plain_worker(self, offset: int) -> None:
        cfg, rec = self.cfg, self.rec
        fns = [self.transport.infer_fn(cfg.model, cfg.model_version, p, cfg.timeout_s) for p in self.payloads]
        append, clock = rec.records.append, time.perf_counter
        for i in itertools.count(offset):
            if not rec.running:
                return
            infer = fns[i % len(fns)]
            t0 = clock()
            try:
                await infer()
                append((t0, clock(), True))
            except FailedRequest as exc:
                append((t0, clock(), False))
                rec.error(exc)
                await asyncio.sleep(_ERROR_BACKOFF_S)

    async def _llm_worker(self, offset: int) -> None:
        cfg, rec = self.cfg, self.rec
        session = self.transport.stream_session(cfg.model, cfg.model_version, cfg.timeout_s)
        clock = time.perf_counter
        try:
            for i in itertools.count(offset):
                if not rec.running:
                    return
                t0 = clock()
                try:
                    first, last, tokens = await session.generate(self.payloads[i % len(self.payloads)])
                    rec.records.append((t0, clock(), True, first, last, tokens))
                except FailedRequest as exc:
                    rec.records.append((t0, clock(), False, 0.0, 0.0, 0))
                    rec.error(exc)
                    await asyncio.sleep(_ERROR_BACKOFF_S)
        finally:
            await session.close()

    async def _one_open(self, payload: Payload, infer) -> None:
        rec, clock = self.rec, time.perf_counter
        rec.outstanding += 1
        t0 = clock()
        try:
            if self.llm:
                first, last, tokens = await infer(payload)
                rec.records.append((t0, clock(), True, first, last, tokens))
            else:
                await infer()
                rec.records.append((t0, clock(), True))
        except FailedRequest as exc:
            rec.records.append((t0, clock(), False, 0.0, 0.0, 0) if self.llm else (t0, clock(), False))
            rec.error(exc)
        finally:
            rec.outstanding -= 1

    async def _open_loop(self) -> None:
        """Requests 1/rate apart on the clock; a late tick sends at once (no burst catch-up beyond that)."""
        cfg, rec = self.cfg, self.rec
        interval = 1.0 / self.level
        if self.llm:
            sessions: list = []

            async def infer_llm(payload):
                session = sessions.pop() if sessions else self.transport.stream_session(
                    cfg.model, cfg.model_version, cfg.timeout_s)
                try:
                    return await session.generate(payload)
                finally:
                    sessions.append(session)

            send = [(p, infer_llm) for p in self.payloads]
        else:
            send = [(p, self.transport.infer_fn(cfg.model, cfg.model_version, p, cfg.timeout_s)) for p in self.payloads]
        pending: set[asyncio.Task] = set()
        start = time.perf_counter()
        try:
            for i in itertools.count():
                if not rec.running:
                    break
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                while rec.outstanding >= cfg.max_outstanding and rec.running:
                    await asyncio.sleep(0.001)
                payload, fn = send[i % len(send)]
                task = asyncio.ensure_future(self._one_open(payload, fn))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=cfg.timeout_s + 5)
        finally:
            for task in pending:
                task.cancel()
            if self.llm:
                for s in sessions:
                    await s.close()

    # ---- windows ---------------------------------------------------------------------------------------
    async def _mark(self) -> _Mark:
        try:
            stats = open_stats(await self.transport.statistics(self.cfg.model, self.cfg.model_version))
        except FailedRequest:
            stats = None
        return _Mark(len(self.rec.records), time.perf_counter(), time.process_time(), stats)

    async def _wait_window(self, start: _Mark) -> None:
        cfg = self.cfg
        if not cfg.window_requests:
            await asyncio.sleep(max(0.0, start.t + cfg.window_s - time.perf_counter()))
            return
        deadline = start.t + cfg.max_window_s
        target = start.index + cfg.window_requests
        while len(self.rec.records) < target and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)

    def _window(self, a: _Mark, b: _Mark) -> Window:
        rows = self.rec.records[a.index:b.index]
        ok = np.array([r[1] - r[0] for r in rows if r[2]]) * 1000
        seconds = b.t - a.t
        return Window(
            seconds=seconds, requests=int(ok.size), errors=len(rows) - int(ok.size),
            throughput_rps=ok.size / seconds if seconds > 0 else 0.0,
            avg_ms=float(ok.mean()) if ok.size else 0.0,
            p99_ms=float(np.percentile(ok, 99)) if ok.size else 0.0,
        )

    def _stable(self, windows: list[Window]) -> bool:
        k, pct = self.cfg.stable_windows, self.cfg.stability_pct / 100
        if len(windows) < k:
            return False
        last = windows[-k:]
        if any(w.requests == 0 or w.errors for w in last):
            return False
        lat = [w.p99_ms if self.cfg.stability_latency is StabilityLatency.P99 else w.avg_ms for w in last]
        for series in ([w.throughput_rps for w in last], lat):
            mean = sum(series) / k
            if any(abs(v - mean) > pct * mean for v in series):
                return False
        return True

    async def run(self) -> LevelResult:
        cfg, rec = self.cfg, self.rec
        if cfg.open_loop:
            self.tasks = [asyncio.ensure_future(self._open_loop())]
        else:
            worker = self._llm_worker if self.llm else self._plain_worker
            self.tasks = [asyncio.ensure_future(worker(i)) for i in range(int(self.level))]
        marks: list[_Mark] = []
        windows: list[Window] = []
        stable = False
        try:
            await asyncio.sleep(cfg.warmup_s)
            marks.append(await self._mark())
            for _ in range(cfg.max_trials):
                await self._wait_window(marks[-1])
                marks.append(await self._mark())
                windows.append(self._window(marks[-2], marks[-1]))
                if windows[-1].errors and not await self.transport.live():
                    self.server_died = True
                    break
                if all(t.done() for t in self.tasks):
                    break  # a load generator crashed: stop measuring, the exception surfaces below
                if self._stable(windows):
                    stable = True
                    break
        finally:
            rec.running = False
            done, not_done = await asyncio.wait(self.tasks, timeout=cfg.timeout_s + 5)
            for t in not_done:
                t.cancel()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        return self._result(marks, windows, stable)

    def _result(self, marks: list[_Mark], windows: list[Window], stable: bool) -> LevelResult:
        cfg = self.cfg
        res = LevelResult(stable=stable, windows=windows, first_error=self.rec.first_error)
        if cfg.open_loop:
            res.request_rate = float(self.level)
        else:
            res.concurrency = int(self.level)
        if not windows:
            return res
        k = min(cfg.stable_windows, len(windows))
        a, b = marks[-k - 1], marks[-1]
        rows = self.rec.records[a.index:b.index]
        ok_rows = [r for r in rows if r[2]]
        res.seconds = b.t - a.t
        res.requests, res.errors = len(ok_rows), len(rows) - len(ok_rows)
        res.throughput_rps = res.requests / res.seconds if res.seconds > 0 else 0.0
        res.latency_ms = percentiles(np.array([r[1] - r[0] for r in ok_rows]) * 1000)
        res.client_cpu_us_per_request = (b.cpu - a.cpu) * 1e6 / len(rows) if rows else 0.0
        if a.stats and b.stats:
            d = [y - x for x, y in zip(a.stats, b.stats, strict=True)]
            n = d[0]
            if n > 0:
                res.server = ServerStats(
                    requests=n, queue_us=d[1] / n / 1e3, compute_input_us=d[2] / n / 1e3,
                    compute_infer_us=d[3] / n / 1e3, compute_output_us=d[4] / n / 1e3,
                    avg_batch_size=d[5] / d[6] if d[6] else 0.0,
                )
        if self.llm:
            with_tokens = [r for r in ok_rows if r[5] > 0]
            ttft = np.array([r[3] - r[0] for r in with_tokens]) * 1000
            # one response carrying every token (stream=false) has no inter-token latency
            itl = np.array([(r[4] - r[3]) / (r[5] - 1) for r in with_tokens if r[5] > 1 and r[4] > r[3]]) * 1000
            tokens = sum(r[5] for r in ok_rows)
            res.llm = LlmStats(
                ttft_ms=percentiles(ttft), itl_ms=percentiles(itl), output_tokens=tokens,
                output_tokens_per_s=tokens / res.seconds if res.seconds > 0 else 0.0,
                tokens_per_request=tokens / len(ok_rows) if ok_rows else 0.0,
            )
        return res
