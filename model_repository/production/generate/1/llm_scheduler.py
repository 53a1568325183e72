"""In-flight batching for the `generate` model: one loop per model instance decodes every running request in one
engine call per step. Imports nothing of Triton, so every piece is tested on its own.

The pieces follow vLLM's split (scheduler / model runner / output processor):

* `Sequence` — one request's state: its prompt, sampling parameters, tokens so far, its row in the engine's KV
  cache, and what has not been sent yet. It moves waiting → running → finished.
* `Scheduler` — decides which requests run. New requests wait in FIFO order; at every step boundary the waiting
  ones that fit (a free row, and their prompt + max_tokens inside the KV budget: admission reserves the worst
  case, so a running request is never evicted) are prefilled together, then every running row decodes one
  token in one `engine.decode` call. A request that leaves — end of sequence, length, stop string,
  cancellation, server shutdown — is an ordinary event at a step boundary, and its row is free at once.
* the engine (`KVEngine`: kv_padded.py, kv_shared.py) — owns the KV cache and turns rows into engine calls.
* `TextStream` — incremental detokenization and stop strings, per request.

Sampling is per row: each request has its own generator, seeded by its `seed`, and draws once per token from
its own logits row, so a seeded request gets the same tokens alone and in company.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


class RequestError(Exception):
    """The request is unusable; its message goes back to the client and the server keeps serving."""


class ServerBusy(RequestError):
    """The queue is full: refused at once, never dropped silently."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    skip_special_tokens: bool = True

    def validate(self, max_output_len: int) -> None:
        if not 1 <= self.max_tokens <= max_output_len:
            raise RequestError(f"max_tokens must lie in 1..{max_output_len}, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must lie in 0..2**64-1, got {self.seed}")


class Sampler:
    """Greedy at temperature 0; otherwise softmax(logits / temperature), cut to the top-p nucleus, drawn from
    this request's own generator."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            nucleus = np.zeros_like(p)
            nucleus[keep] = p[keep]
            p = nucleus / nucleus.sum()
        return int(self.rng.choice(p.shape[0], p=p))


class TextStream:
    """Detokenizes incrementally and applies stop strings; `push` returns only text that can no longer change:
    an incomplete UTF-8 character (a trailing U+FFFD) and a tail that may begin a stop string are held back.

    Each token decodes only a short window — the tokens since the last emitted piece, after the piece before it
    as context (a tokenizer may drop a leading space at the start of a decode; the difference of two decodes
    of the same start cancels it) — and stop strings are searched only where new text could complete one, so a
    token costs the same at position 10 and 10 000 (decoding the whole text at every token is quadratic).
    With `incremental=False` (no streaming, no stop strings) nothing is decoded until `finish`."""

    def __init__(self, decode, stop: list[str], incremental: bool = True):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.incremental = incremental or bool(self.stop)
        self.tokens: list[int] = []
        self.prefix = 0  # first token of the decode window
        self.read = 0  # tokens before this one are in `text`
        self.partial = 0  # characters of the open window already in `text`
        self.text = ""  # the final text so far (stop string removed); complete after `finish`
        self.emitted = 0
        self.stopped = False
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self._before: tuple = (None, "")  # ((prefix, read), decode of tokens[prefix:read])

    def _held(self, text: str) -> int:
        for k in range(min(len(text), self.longest_stop - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def _extend(self, final: bool) -> None:
        """Move the text that the tokens past `read` complete (all of it when `final`) into `text`."""
        window = self.decode(self.tokens[self.prefix :])
        if self._before[0] != (self.prefix, self.read):  # constant while the window stays open: decoded once
            text = self.decode(self.tokens[self.prefix : self.read]) if self.read > self.prefix else ""
            self._before = ((self.prefix, self.read), text)
        before = self._before[1]
        new = window[len(before) :] if len(window) > len(before) else ""
        start = len(self.text)
        if new.endswith("\ufffd") and not final:
            # an incomplete character: what precedes it is final, the window stays open
            stable = new.rstrip("\ufffd")
            self.text += stable[self.partial :]
            self.partial = max(self.partial, len(stable))
        else:
            self.text += new[self.partial :]
            self.partial = 0
            self.prefix, self.read = self.read, len(self.tokens)
        search_from = max(0, start - self.longest_stop + 1)
        found = [at for at in (self.text.find(s, search_from) for s in self.stop) if at >= 0]
        if found:
            self.stopped = True
            self.text = self.text[: min(found)]

    def push(self, token: int) -> str:
        self.tokens.append(token)
        if not self.incremental:
            return ""
        self._extend(final=False)
        if self.stopped:
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held(self.text))

    def finish(self) -> str:
        """The rest of the text (incomplete characters as U+FFFD); `text` is then the whole completion."""
        if not self.stopped and self.read < len(self.tokens):
            self._extend(final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class Sequence:
    """One request inside the scheduler. `handle` is whatever the caller needs to answer it (a Triton response
    sender); the scheduler never looks at it."""

    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    handle: object = None
    arrival: float = 0.0
    status: str = WAITING
    row: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # length | stop | eos | cancelled | shutdown
    first_token_at: float | None = None
    admitted_at: float | None = None
    cancelled: bool = False  # set from any thread; acted on at the next step boundary
    # not yet handed out by `Scheduler.step`
    pending_tokens: list[int] = field(default_factory=list)
    pending_text: str = ""
    sampler: Sampler | None = None

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params.temperature, self.params.top_p, self.params.seed)

    @property
    def reserved_tokens(self) -> int:
        """The KV positions this request may ever need: admission reserves them all."""
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass(frozen=True)
class Limits:
    max_rows: int  # sequences decoded together (the engine's batch)
    kv_budget_tokens: int  # KV positions reserved by running sequences, summed
    max_queue: int  # waiting requests; one more is refused with ServerBusy
    max_sequence_len: int  # prompt + generated tokens of one sequence
    max_prefill_tokens: int = 8192  # prompt tokens prefilled in one step (bounds a step's latency)

    def __post_init__(self) -> None:
        for name in ("max_rows", "kv_budget_tokens", "max_sequence_len", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be ≥ 0, got {self.max_queue}")


@dataclass
class StepStats:
    """What one step did, for the metrics."""

    prefilled: int = 0  # sequences prefilled
    decoded: int = 0  # rows in the decode call
    finished: int = 0
    tokens: int = 0  # tokens accepted (emitted to their streams)
    admitted: int = 0
    queue_s: float = 0.0  # summed wait of the admitted sequences
    first_tokens: int = 0
    ttft_s: float = 0.0  # summed arrival → first token of those


class Scheduler:
    """Owns the running batch. `submit` may be called from any thread; `step` only from the loop thread."""

    def __init__(self, engine, limits: Limits, eos: set[int], clock=time.monotonic):
        if engine.max_rows < limits.max_rows:
            raise ValueError(f"the engine holds {engine.max_rows} rows, the limits ask for {limits.max_rows}")
        self.engine, self.limits, self.eos, self.clock = engine, limits, set(eos), clock
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # row → sequence
        self.free_rows = list(range(limits.max_rows - 1, -1, -1))
        self.releasing: list[int] = []  # rows of sequences that finished this step
        self.reserved = 0
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.closed = False

    # -- any thread ------------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if seq.reserved_tokens > self.limits.kv_budget_tokens:
            raise RequestError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) exceeds this "
                f"deployment's KV-cache budget of {self.limits.kv_budget_tokens} tokens"
            )
        if len(seq.prompt_ids) + 1 > self.limits.max_sequence_len:
            raise RequestError(f"prompt has {len(seq.prompt_ids)} tokens; sequences hold at most {self.limits.max_sequence_len}")
        with self.lock:
            if self.closed:
                raise RequestError("the server is shutting down")
            if len(self.waiting) >= self.limits.max_queue:
                raise ServerBusy(
                    f"server busy: {len(self.waiting)} requests are waiting (queue limit {self.limits.max_queue}); retry later"
                )
            seq.arrival = self.clock()
            seq.status = WAITING
            self.waiting.append(seq)
            self.wakeup.notify()

    def wait_for_work(self, timeout: float) -> bool:
        """Block the loop until a request is waiting or running (or `timeout`)."""
        with self.lock:
            if not self.waiting and not self.running and not self.closed:
                self.wakeup.wait(timeout)
            return bool(self.waiting or self.running)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.wakeup.notify_all()

    @property
    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.waiting), len(self.running)

    # -- the loop thread ---------------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, done: list[Sequence], release: bool = True) -> None:
        seq.status, seq.finish_reason = FINISHED, reason
        seq.pending_text += seq.text.finish() if reason in ("length", "eos", "stop") else ""
        if seq.row is not None:
            del self.running[seq.row]
            if release:
                self.releasing.append(seq.row)  # released together at `_release` (each release copies the cache)
            else:
                self.free_rows.append(seq.row)
            self.reserved -= seq.reserved_tokens
            seq.row = None
        done.append(seq)

    def _release(self) -> None:
        if self.releasing:
            self.engine.release(self.releasing)
            self.free_rows.extend(self.releasing)
            self.releasing = []

    def _accept(self, seq: Sequence, token: int, done: list[Sequence], stats: StepStats) -> None:
        """Sampled `token` for a running sequence: emit it or end the sequence."""
        if token in self.eos and not seq.params.ignore_eos:
            self._finish(seq, "eos", done)
            return
        if seq.first_token_at is None:
            seq.first_token_at = self.clock()
            stats.first_tokens += 1
            stats.ttft_s += seq.first_token_at - seq.arrival
        stats.tokens += 1
        seq.tokens.append(token)
        seq.pending_tokens.append(token)
        seq.pending_text += seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", done)
        elif len(seq.tokens) >= seq.params.max_tokens or self.engine.cached(seq.row) + 1 >= self.limits.max_sequence_len:
            self._finish(seq, "length", done)

    def _sample(self, seqs: list[Sequence], logits: np.ndarray) -> list[int]:
        greedy = [i for i, s in enumerate(seqs) if s.sampler.greedy]
        tokens = [0] * len(seqs)
        if greedy:
            picks = np.argmax(logits[greedy], axis=-1)
            for i, t in zip(greedy, picks, strict=True):
                tokens[i] = int(t)
        for i, s in enumerate(seqs):
            if not s.sampler.greedy:
                tokens[i] = s.sampler(logits[i])
        return tokens

    def step(self, shutting_down: bool = False) -> tuple[list[Sequence], list[Sequence], StepStats]:
        """One step: drop cancelled requests, admit and prefill newcomers, decode every running row once.
        Returns (sequences with something to send, sequences that finished, stats); the caller sends and then
        clears `pending_*`."""
        done: list[Sequence] = []
        stats = StepStats()
        with self.lock:
            if shutting_down:
                while self.waiting:
                    self._finish(self.waiting.popleft(), "shutdown", done)
            else:
                kept = deque(s for s in self.waiting if not s.cancelled)
                for s in self.waiting:
                    if s.cancelled:
                        self._finish(s, "cancelled", done)
                self.waiting = kept
        for seq in [s for s in self.running.values() if s.cancelled or shutting_down]:
            self._finish(seq, "shutdown" if shutting_down else "cancelled", done)
        self._release()

        admitted = self._admit()
        stats.admitted = len(admitted)
        stats.queue_s = sum(s.admitted_at - s.arrival for s in admitted)
        if admitted:
            logits = self.engine.prefill([s.row for s in admitted], [s.prompt_ids for s in admitted])
            stats.prefilled = len(admitted)
            for seq, token in zip(admitted, self._sample(admitted, logits), strict=True):
                self._accept(seq, token, done, stats)
        self._release()
        # rows that got their first token in this step's prefill decode it in the same step: one call for all
        batch = [s for s in self.running.values() if s.status == RUNNING]
        if batch:
            last = [s.tokens[-1] for s in batch]
            logits = self.engine.decode([s.row for s in batch], last)
            stats.decoded = len(batch)
            for seq, token in zip(batch, self._sample(batch, logits), strict=True):
                self._accept(seq, token, done, stats)
        self._release()
        stats.finished = len(done)
        ready = [s for s in self.running.values() if s.pending_tokens or s.pending_text]
        return ready, done, stats

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        prefill_tokens = 0
        # lowest free row first: running rows stay packed at the low ids (an engine over one buffer calls a
        # contiguous span of rows)
        self.free_rows.sort(reverse=True)
        with self.lock:
            while self.waiting and self.free_rows:
                seq = self.waiting[0]
                if self.reserved + seq.reserved_tokens > self.limits.kv_budget_tokens:
                    break  # FIFO: nobody overtakes the head of the queue
                if admitted and prefill_tokens + len(seq.prompt_ids) > self.limits.max_prefill_tokens:
                    break
                self.waiting.popleft()
                seq.row = self.free_rows.pop()
                seq.status = RUNNING
                seq.admitted_at = self.clock()
                self.reserved += seq.reserved_tokens
                self.running[seq.row] = seq
                prefill_tokens += len(seq.prompt_ids)
                admitted.append(seq)
        return admitted

    def abort_running(self) -> list[Sequence]:
        """After an engine failure: every running sequence ends ("error") and the cache starts empty."""
        done: list[Sequence] = []
        for seq in list(self.running.values()):
            self._finish(seq, "error", done, release=False)
        try:
            self.engine.release(list(range(self.limits.max_rows)))
        except Exception:  # noqa: BLE001 — a broken engine may fail here too; its rows are free regardless
            pass
        return done

    @property
    def kv_used_tokens(self) -> int:
        return sum(self.engine.cached(row) for row in list(self.running))
