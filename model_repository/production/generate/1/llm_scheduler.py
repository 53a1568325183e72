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
its own logits row, so a seeded request gets the same tokens alone and in company. Before the draw the batch's
logits go through the request's logits processing, as array operations over the rows that ask for it (vLLM's
order): repetition penalty (prompt and output tokens), frequency and presence penalties (output tokens),
logit_bias, end of sequence masked until min_tokens, and last the grammar of a structured-output request
(guided.py: the tokens its grammar forbids get -inf). Log-probabilities are the log-softmax of those processed
logits divided by the temperature (1 when greedy), before the top-p cut — vLLM's `processed_logprobs`; with no
penalty or bias and a temperature of 0 or 1 they equal vLLM's default `raw_logprobs`. A request with n > 1 is one
group of n sequences: the prompt is prefilled once and its KV row copied to the others (`engine.fork`); choice i
draws from a generator seeded with seed + i, so the same seed gives the same n choices.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

MAX_N = 16  # choices of one request (rows it may hold at once)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 1024  # tokens biased by one request
PREFIX_BLOCK = 16  # tokens per block of the prefix cache


class RequestError(Exception):
    """The request is unusable; its message goes back to the client and the server keeps serving."""


class ServerBusy(RequestError):
    """The queue is full: refused at once, never dropped silently."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): no cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1  # num_return_sequences
    logprobs: bool = False  # return_log_probs
    top_logprobs: int = 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def validate(self, max_output_len: int, vocab: int | None = None, max_n: int = MAX_N) -> None:
        if not 1 <= self.max_tokens <= max_output_len:
            raise RequestError(f"max_tokens must lie in 1..{max_output_len}, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 (no cut) or a positive number of tokens, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must lie in 0..2**64-1, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise RequestError(f"{name} must lie in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 2):
            raise RequestError(f"repetition_penalty must lie in (0, 2], got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must lie in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias holds at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias.items():
            if not (0 <= token < (vocab if vocab is not None else 2**31)):
                raise RequestError(f"logit_bias: token id {token} is outside the vocabulary (0..{(vocab or 2**31) - 1})")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise RequestError(f"logit_bias: the bias of token {token} must lie in [-100, 100], got {bias}")
        if not 1 <= self.n <= max_n:
            raise RequestError(f"num_return_sequences must lie in 1..{max_n}, got {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")


class Sampler:
    """One request's draw: greedy at temperature 0; otherwise softmax(logits / temperature), cut to the top_k most
    likely tokens (0: no cut) and then to the top-p nucleus of those, drawn from this request's own generator.
    `__call__` draws for one row; the scheduler draws for a whole batch at once with `sample_rows`."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, top_k: int = 0):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: np.ndarray) -> int:
        return int(sample_rows([self], np.asarray(logits, np.float32)[None, :])[0])


# Candidate thresholds of `sample_rows`, relative to a row's most likely token: the cut is searched among the
# tokens at least this likely, from the first threshold whose tokens hold it (almost always the first).
_CANDIDATE_FLOORS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-8, 1e-12, 0.0)
_BLOCK = 2048  # tokens per block of the two-level inverse CDF
# From this many candidates a top-p cut (without top_k) is found by bucketing their probabilities instead of sorting
# them all (a near-flat row keeps most of a 152 k vocabulary: a full sort per row was most of a step)
_BUCKETED_FROM = 4096
_PARALLEL_FROM = 1 << 20  # logits elements from which the numerators are computed by several threads


def sample_rows(samplers: list[Sampler], logits: np.ndarray, scratch: dict | None = None) -> np.ndarray:
    """One token per row of `logits` [rows, vocab], row i drawn by `samplers[i]` — batched: the greedy rows in one
    argmax; the sampled rows' softmax numerators and their block sums in four in-place array operations over all
    of them (split across threads for a large batch: numpy releases the GIL); then one vectorized two-level
    inverse CDF for the uncut rows, and per cut row a sort of its candidates only (never of the vocabulary).

    The draw is the inverse CDF of the kept tokens in vocabulary order at one uniform from the row's generator —
    numpy's `Generator.choice(p=...)` — so a seeded request draws the same tokens alone or in any batch. The
    nucleus is the shortest run of most likely tokens (ties: lower id first) whose probability reaches top_p,
    the token that crosses it included; with top_k it is taken over the top_k tokens' renormalised probabilities
    (vLLM's order: top-k, then top-p). Probabilities are float32; cumulative sums float64. `scratch`, a dict the
    caller keeps, holds the buffers and threads from call to call (a fresh [64, 151 936] array costs more in
    page faults than the exponentials)."""
    rows, vocab = logits.shape
    greedy = np.array([s.greedy for s in samplers], bool)
    if greedy.all():
        return np.argmax(logits, axis=1)
    tokens = np.zeros(rows, np.int64)
    drawn = np.flatnonzero(~greedy)
    if greedy.any():
        tokens[greedy] = np.argmax(logits[greedy], axis=1)
    e, blocks = _numerators(logits, drawn, np.array([1.0 / samplers[i].temperature for i in drawn], np.float32),
                            {} if scratch is None else scratch)
    u = np.array([samplers[i].rng.random() for i in drawn])  # one uniform per row, the generator's next
    top_k = np.array([samplers[i].top_k if 0 < samplers[i].top_k < vocab else 0 for i in drawn])
    top_p = np.array([samplers[i].top_p for i in drawn])
    whole = (top_k == 0) & (top_p >= 1.0)
    if whole.any():
        tokens[drawn[whole]] = _inverse_cdf(e, blocks, u, np.flatnonzero(whole), vocab)
    need = blocks.sum(axis=1, dtype=np.float64) * top_p  # the mass a top-p nucleus must reach
    for j in np.flatnonzero(~whole):
        row, k = e[j, :vocab], int(top_k[j])
        for floor in _CANDIDATE_FLOORS:
            ids = np.flatnonzero(row >= floor) if floor else np.arange(vocab)
            # every token of the cut is at least as likely as the least likely candidate once the candidates
            # hold top_k tokens, or (no top_k) top_p of the whole probability
            if (k and ids.size >= k) or (not k and row[ids].sum(dtype=np.float64) >= need[j]):
                break
        p = row[ids]
        if not k and ids.size >= _BUCKETED_FROM:
            keep = _nucleus_bucketed(p, need[j])
        else:
            if k and ids.size >= _BUCKETED_FROM:
                order = _top_k(p, k)
            else:
                order = np.argsort(-p, kind="stable")  # ids ascend: ties keep the lower id first
                if k:
                    order = order[:k]
            if top_p[j] < 1.0:
                c = np.cumsum(p[order], dtype=np.float64)
                # top_p of the whole distribution, or of the top_k tokens' when cut to them
                order = order[: int(np.searchsorted(c, c[-1] * top_p[j] if k else need[j])) + 1]
            keep = np.sort(order)  # back to vocabulary order for the draw
        c = np.cumsum(p[keep], dtype=np.float64)
        tokens[drawn[j]] = ids[keep[min(int(np.searchsorted(c, u[j] * c[-1], side="right")), keep.size - 1)]]
    return tokens


def _nucleus_bucketed(p: np.ndarray, need: float) -> np.ndarray:
    """The positions (ascending) of the top-p nucleus of the non-negative `p` — the shortest run of the largest
    values, ties by lower position, whose sum reaches `need`, the value that crosses it included — without sorting
    them all: the values are bucketed by the top 16 bits of their float32 pattern (for non-negative floats an
    order-preserving key: a value in a higher bucket is larger than every value in a lower one), the bucket where
    the running sum from the top crosses `need` is found from the buckets' sums, and only that bucket is sorted.
    The same nucleus as sorting every value (tests/test_scheduler.py), O(len(p)) but for one bucket."""
    key = p.view(np.int32) >> 16
    mass = np.bincount(key, weights=p, minlength=int(key.max()) + 1)[::-1]  # highest bucket first
    above = np.cumsum(mass)
    top = int(np.searchsorted(above, need))  # buckets (from the top) before the crossing one hold less than need
    top = min(top, mass.size - 1)
    crossing = mass.size - 1 - top
    inside = np.flatnonzero(key == crossing)
    order = inside[np.argsort(-p[inside], kind="stable")]  # positions ascend: ties keep the lower one first
    before = above[top - 1] if top else 0.0
    c = before + np.cumsum(p[order], dtype=np.float64)
    cut = min(int(np.searchsorted(c, need)) + 1, order.size)
    keep = key > crossing
    keep[order[:cut]] = True
    return np.flatnonzero(keep)


def _top_k(p: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k largest values of `p`, largest first, ties by lower position — what a stable sort of
    them all gives in its first k — from a partition and a sort of k."""
    if k >= p.size:
        return np.argsort(-p, kind="stable")
    kth = np.partition(p, p.size - k)[p.size - k]  # the k-th largest value
    greater = np.flatnonzero(p > kth)
    chosen = np.concatenate([greater, np.flatnonzero(p == kth)[: k - greater.size]])
    return chosen[np.argsort(-p[chosen], kind="stable")]  # chosen ascends within each part: ties keep lower first


def _numerators(logits: np.ndarray, drawn: np.ndarray, inv_t: np.ndarray, scratch: dict):
    """exp((x - max) / T) of the drawn rows into a kept buffer [rows, vocab padded to whole blocks] (the padding
    stays 0), and each row's block sums [rows, blocks]."""
    rows, vocab = logits.shape
    n, nb = drawn.size, -(-vocab // _BLOCK)
    buf = scratch.get("e")
    if buf is None or buf.shape[1] != nb * _BLOCK or buf.shape[0] < n:
        buf = scratch["e"] = np.zeros((max(n, rows), nb * _BLOCK), np.float32)
    blocks = np.empty((n, nb), np.float32)
    every = n == rows

    def part(lo: int, hi: int) -> None:
        x = logits[lo:hi] if every else logits[drawn[lo:hi]]
        e = buf[lo:hi, :vocab]
        np.subtract(x, x.max(axis=1, keepdims=True), out=e)
        e *= inv_t[lo:hi, None]
        np.exp(e, out=e)  # the most likely token is 1
        buf[lo:hi].reshape(hi - lo, nb, _BLOCK).sum(axis=2, out=blocks[lo:hi])

    pool, threads = _workers(scratch) if n * vocab >= _PARALLEL_FROM and n > 1 else (None, 1)
    if pool is None:
        part(0, n)
    else:
        bounds = np.linspace(0, n, min(threads, n) + 1).astype(int)
        for f in [pool.submit(part, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]:
            f.result()
    return buf[:n], blocks


def _workers(scratch: dict):
    """(thread pool, its size) kept in `scratch`, one thread per core up to 8; (None, 1) on one core."""
    if "threads" not in scratch:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        scratch["threads"] = max(1, min(cores, 8))
        if scratch["threads"] > 1:
            import concurrent.futures

            scratch["pool"] = concurrent.futures.ThreadPoolExecutor(scratch["threads"], "sampling")
    return scratch.get("pool"), scratch["threads"]


def _inverse_cdf(e: np.ndarray, blocks: np.ndarray, u: np.ndarray, rows: np.ndarray, vocab: int) -> np.ndarray:
    """For each of `rows` of the numerators `e` [n, blocks × _BLOCK], the token at cumulative probability u in
    vocabulary order, in two levels for all rows at once: the block from the block sums, then the token from
    that block's cumulative sum — never a cumulative sum over the vocabulary."""
    cb = np.cumsum(blocks[rows], axis=1, dtype=np.float64)
    target = u[rows] * cb[:, -1]
    b = np.minimum((cb <= target[:, None]).sum(axis=1), cb.shape[1] - 1)
    before = np.where(b > 0, cb[np.arange(rows.size), b - 1], 0.0)
    inner = np.cumsum(e.reshape(e.shape[0], cb.shape[1], _BLOCK)[rows, b], axis=1, dtype=np.float64)
    t = (inner <= (target - before)[:, None]).sum(axis=1)
    return np.minimum(b * _BLOCK + np.minimum(t, _BLOCK - 1), vocab - 1)


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


def _logprobs(seqs: list, logits: np.ndarray, tokens: list[int]) -> list[tuple[float, list[int], list[float]]]:
    """Per row: the log-probability of its token and its `top_logprobs` most likely tokens (ids, values, best
    first), from log-softmax(processed logits / temperature), the temperature taken as 1 for greedy rows."""
    temps = np.array([1.0 if s.sampler.greedy else s.params.temperature for s in seqs])[:, None]
    x = logits.astype(np.float64) / temps
    top = x.max(axis=1, keepdims=True)
    lp = x - (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))
    chosen = lp[np.arange(len(seqs)), tokens]
    k = max(s.params.top_logprobs for s in seqs)
    if k:
        k = min(k, lp.shape[1])
        best = np.argpartition(-lp, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(lp, best, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        best, values = np.take_along_axis(best, order, axis=1), np.take_along_axis(values, order, axis=1)
    out = []
    for j, s in enumerate(seqs):
        kk = s.params.top_logprobs
        out.append((float(chosen[j]), best[j, :kk].tolist() if kk else [], values[j, :kk].tolist() if kk else []))
    return out


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
    # with params.logprobs: per pending token its log-probability, and its top_logprobs (ids, values)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top: list[tuple[list[int], list[float]]] = field(default_factory=list)
    sampler: Sampler | None = None
    index: int = 0  # which of the request's n choices (0 for the one that is prefilled)
    # the other choices of an n > 1 request, on the first one only: they wait, are admitted and prefilled with it
    siblings: list[Sequence] = field(default_factory=list)
    counts: np.ndarray | None = None  # output tokens by id (penalties), made at the first processing
    prompt_seen: np.ndarray | None = None  # prompt tokens by id (the repetition penalty)
    cumulative_logprob: float = 0.0
    # structured output (guided.py's Guide): the tokens its grammar allows, once active (after a think block)
    guide: object = None

    def __post_init__(self) -> None:
        seed = self.params.seed
        if seed is not None:
            seed = (seed + self.index) % 2**64  # choice i of a seeded request: seed + i (vLLM's rule)
        self.sampler = Sampler(self.params.temperature, self.params.top_p, seed, max(self.params.top_k, 0))

    @property
    def group(self) -> list[Sequence]:
        return [self, *self.siblings]

    @property
    def reserved_tokens(self) -> int:
        """The KV positions this request may ever need: admission reserves them all."""
        return len(self.prompt_ids) + self.params.max_tokens


class PrefixCache:
    """KV of prompt prefixes kept after their prefill, reused by later prompts that start the same way (a system
    prompt, the earlier turns of a chat), block by block: a block is `block` consecutive prompt tokens, named by
    the chain of its content and everything before it (its parent's key), so a block is reused only after the very
    same prefix. At most `max_blocks` are kept; the least recently used goes first. Blocks are opaque to this
    class: the engine makes them (`kv_blocks`) and takes them back (`prefill(..., cached)`). A prompt always
    leaves its last token to compute (its logits are the first token's)."""

    def __init__(self, max_blocks: int, block: int = 16):
        from collections import OrderedDict

        if max_blocks < 1 or block < 1:
            raise ValueError("a prefix cache holds at least one block of at least one token")
        self.max_blocks, self.block = max_blocks, block
        self.blocks: OrderedDict = OrderedDict()  # key → (parent key, tokens, kv)
        self.query_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found cached

    def _key(self, parent, tokens: tuple):
        return hash((parent, tokens))

    def match(self, prompt: list[int]) -> list:
        """The cached blocks that begin `prompt`, in order (leaving at least its last token out)."""
        b, found, parent = self.block, [], None
        self.query_tokens += len(prompt)
        for i in range((len(prompt) - 1) // b):
            tokens = tuple(prompt[i * b : (i + 1) * b])
            key = self._key(parent, tokens)
            entry = self.blocks.get(key)
            if entry is None or entry[0] != parent or entry[1] != tokens:  # the tokens checked: no hash collision
                break
            self.blocks.move_to_end(key)
            found.append(entry[2])
            parent = key
        self.hit_tokens += len(found) * b
        return found

    def store(self, prompt: list[int], have: int, row: int, engine) -> None:
        """Keep the full blocks of `prompt` (just prefilled in `row`) past the `have` it was given."""
        b, parent = self.block, None
        for i in range(len(prompt) // b):
            tokens = tuple(prompt[i * b : (i + 1) * b])
            key = self._key(parent, tokens)
            if i >= have and key not in self.blocks:
                self.blocks[key] = (parent, tokens, engine.kv_blocks(row, i * b, (i + 1) * b))
                while len(self.blocks) > self.max_blocks:
                    self.blocks.popitem(last=False)
            parent = key

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass(frozen=True)
class Limits:
    max_rows: int  # sequences decoded together (the engine's batch)
    kv_budget_tokens: int  # KV positions reserved by running sequences, summed
    max_queue: int  # waiting requests; one more is refused with ServerBusy
    max_sequence_len: int  # prompt + generated tokens of one sequence
    max_prefill_tokens: int = 8192  # prompt tokens prefilled in one step (bounds a step's latency)
    prefix_cache_tokens: int = 0  # KV positions of prompt prefixes kept for reuse (PrefixCache); 0: none

    def __post_init__(self) -> None:
        for name in ("max_rows", "kv_budget_tokens", "max_sequence_len", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be ≥ 0, got {self.max_queue}")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be ≥ 0, got {self.prefix_cache_tokens}")


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
    prefix_query_tokens: int = 0  # prompt tokens of the admitted sequences
    prefix_hit_tokens: int = 0  # of those, taken from the prefix cache instead of computed


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
        self._sampling_scratch: dict = {}  # sample_rows' buffer, kept from step to step
        self.prefix = PrefixCache(limits.prefix_cache_tokens // PREFIX_BLOCK) if (
            limits.prefix_cache_tokens >= PREFIX_BLOCK) else None

    # -- any thread ------------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """`seq` and its `siblings` (the other choices of an n > 1 request) join the queue as one."""
        n = len(seq.group)
        if n > self.limits.max_rows:
            raise RequestError(f"num_return_sequences ({n}) exceeds the rows this deployment decodes at once "
                               f"({self.limits.max_rows})")
        if seq.reserved_tokens * n > self.limits.kv_budget_tokens:
            times = f" × {n} sequences" if n > 1 else ""
            raise RequestError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}){times} exceeds this "
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
            for s in seq.group:
                s.arrival = self.clock()
                s.status = WAITING
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

    def _accept(self, seq: Sequence, token: int, done: list[Sequence], stats: StepStats, info=None) -> None:
        """Sampled `token` for a running sequence: emit it or end the sequence. `info`: its (logprob, top ids,
        top logprobs) when the request asked for them."""
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
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.guide is not None:
            seq.guide.accept(token)
        if info is not None:
            seq.cumulative_logprob += info[0]
            seq.pending_logprobs.append(info[0])
            seq.pending_top.append((info[1], info[2]))
        seq.pending_text += seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", done)
        elif len(seq.tokens) >= seq.params.max_tokens or self.engine.cached(seq.row) + 1 >= self.limits.max_sequence_len:
            self._finish(seq, "length", done)

    def _sample(self, seqs: list[Sequence], logits: np.ndarray) -> list[tuple[int, tuple | None]]:
        """One token per row, and its log-probabilities where asked for (see the module's docstring)."""
        logits = self._process(seqs, logits)
        tokens = sample_rows([s.sampler for s in seqs], logits, self._sampling_scratch).tolist()
        infos: list = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if want:
            for i, info in zip(want, _logprobs([seqs[i] for i in want], logits[want], [tokens[i] for i in want]),
                               strict=True):
                infos[i] = info
        return list(zip(tokens, infos, strict=True))

    def _process(self, seqs: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """The logits each row samples from: penalties, logit_bias and the min_tokens mask, applied to the rows
        that ask for them in a few array operations over the batch. Returns `logits` itself when no row asks."""
        pen = [i for i, s in enumerate(seqs) if s.params.penalized]
        bias = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        early = [i for i, s in enumerate(seqs) if len(s.tokens) < s.params.min_tokens and not s.params.ignore_eos]
        guided = [i for i, s in enumerate(seqs) if s.guide is not None and s.guide.active]
        if not (pen or bias or early or guided):
            return logits
        logits = np.array(logits, dtype=np.float32)
        vocab = logits.shape[1]
        if pen:
            for i in pen:
                s = seqs[i]
                if s.counts is None:
                    s.counts = np.bincount(np.asarray(s.tokens, np.int64), minlength=vocab).astype(np.int32)[:vocab]
                    s.prompt_seen = np.zeros(vocab, bool)
                    s.prompt_seen[[t for t in s.prompt_ids if t < vocab]] = True
            counts = np.stack([seqs[i].counts for i in pen])
            x = logits[pen]
            rep = np.array([seqs[i].params.repetition_penalty for i in pen], np.float32)[:, None]
            if (rep != 1).any():
                # vLLM's rule: a token seen in the prompt or the output has a positive logit divided by the
                # penalty and a negative one multiplied by it
                seen = np.stack([seqs[i].prompt_seen for i in pen]) | (counts > 0)
                x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
            freq = np.array([seqs[i].params.frequency_penalty for i in pen], np.float32)[:, None]
            pres = np.array([seqs[i].params.presence_penalty for i in pen], np.float32)[:, None]
            x = x - freq * counts - pres * (counts > 0)
            logits[pen] = x
        if bias:
            rows = np.concatenate([np.full(len(seqs[i].params.logit_bias), i) for i in bias])
            ids = np.concatenate([np.fromiter(seqs[i].params.logit_bias, np.int64) for i in bias])
            values = np.concatenate([np.fromiter(seqs[i].params.logit_bias.values(), np.float32) for i in bias])
            inside = ids < vocab
            logits[rows[inside], ids[inside]] += values[inside]
        if early and self.eos:
            eos = np.asarray(sorted(t for t in self.eos if t < vocab), np.int64)
            logits[np.ix_(early, eos)] = -np.inf
        if guided:
            # last: no bias brings back a token the grammar forbids
            guides = [seqs[i].guide for i in guided]
            allowed = guides[0].masks(guides, vocab)
            logits[guided] = np.where(allowed, logits[guided], -np.inf)
        return logits

    def step(self, shutting_down: bool = False) -> tuple[list[Sequence], list[Sequence], StepStats]:
        """One step: drop cancelled requests, admit and prefill newcomers, decode every running row once.
        Returns (sequences with something to send, sequences that finished, stats); the caller sends and then
        clears `pending_*`."""
        done: list[Sequence] = []
        stats = StepStats()
        with self.lock:
            if shutting_down:
                while self.waiting:
                    for s in self.waiting.popleft().group:
                        self._finish(s, "shutdown", done)
            else:
                kept = deque(s for s in self.waiting if not any(c.cancelled for c in s.group))
                for s in self.waiting:
                    if any(c.cancelled for c in s.group):
                        for c in s.group:
                            self._finish(c, "cancelled", done)
                self.waiting = kept
        for seq in [s for s in self.running.values() if s.cancelled or shutting_down]:
            self._finish(seq, "shutdown" if shutting_down else "cancelled", done)
        self._release()

        admitted = self._admit()
        stats.admitted = len(admitted)
        stats.queue_s = sum(s.admitted_at - s.arrival for s in admitted)
        if admitted:
            rows, prompts = [s.row for s in admitted], [s.prompt_ids for s in admitted]
            if self.prefix is not None:
                cached = [self.prefix.match(p) for p in prompts]
                logits = self.engine.prefill(rows, prompts, cached) if any(cached) else self.engine.prefill(rows, prompts)
                for s, blocks in zip(admitted, cached, strict=True):
                    self.prefix.store(s.prompt_ids, len(blocks), s.row, self.engine)
                stats.prefix_query_tokens = sum(len(p) for p in prompts)
                stats.prefix_hit_tokens = sum(len(b) for b in cached) * self.prefix.block
            else:
                logits = self.engine.prefill(rows, prompts)
            stats.prefilled = len(admitted)
            forked = [s for s in admitted if s.siblings]
            if forked:
                # the other choices start from the first one's prompt: its KV row copied, its logits shared
                at = {id(s): i for i, s in enumerate(admitted)}
                extra = []
                for s in forked:
                    self.engine.fork(s.row, [c.row for c in s.siblings])
                    extra += [at[id(s)]] * len(s.siblings)
                    admitted += s.siblings
                logits = np.concatenate([logits, logits[extra]], axis=0)
            for seq, (token, info) in zip(admitted, self._sample(admitted, logits), strict=True):
                self._accept(seq, token, done, stats, info)
        self._release()
        # rows that got their first token in this step's prefill decode it in the same step: one call for all
        batch = [s for s in self.running.values() if s.status == RUNNING]
        if batch:
            last = [s.tokens[-1] for s in batch]
            logits = self.engine.decode([s.row for s in batch], last)
            stats.decoded = len(batch)
            for seq, (token, info) in zip(batch, self._sample(batch, logits), strict=True):
                self._accept(seq, token, done, stats, info)
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
            while self.waiting:
                seq = self.waiting[0]
                group = seq.group
                if len(self.free_rows) < len(group):
                    break
                if self.reserved + seq.reserved_tokens * len(group) > self.limits.kv_budget_tokens:
                    break  # FIFO: nobody overtakes the head of the queue
                if admitted and prefill_tokens + len(seq.prompt_ids) > self.limits.max_prefill_tokens:
                    break
                self.waiting.popleft()
                for s in group:
                    s.row = self.free_rows.pop()
                    s.status = RUNNING
                    s.admitted_at = self.clock()
                    self.reserved += s.reserved_tokens
                    self.running[s.row] = s
                prefill_tokens += len(seq.prompt_ids)
                admitted.append(seq)  # its siblings are forked from it after the prefill
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
