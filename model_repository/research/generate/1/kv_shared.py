"""A KV-cache engine over r1deploy's fused decoder graph (`r1deploy export --graph fused`): one fixed buffer per
cache slot, [max_rows, kv_heads, capacity, head_dim], that ONNX Runtime updates in place.

Implements the KVEngine protocol of the `generate` model (prefill / decode / fork / kv_blocks / release /
cached). Row r of every buffer belongs to scheduler row id r. A call covers a contiguous span of rows: the graph's `past_key_values.*`
and `present.*` are bound (IOBinding) to the same memory, that span's rows of the buffers, so
GroupQueryAttention writes each row's new keys and values at that row's own length and nothing is copied —
the cost of a step does not grow with what the other rows hold. Per row the graph reads its length from
`seqlens_k` (cached after the step, minus one) and `query_seqlens` (its new tokens); a row inside the span that
takes no part in the call gets `query_seqlens = 0`, which leaves its cache untouched.

The buffers hold `max_seq + 1` positions: a row never caches more than `max_seq`, and the one spare position is
the room GroupQueryAttention asks of every row of a call, idle ones too (cached + new <= capacity).

The buffers live where the engine runs (kv_memory.py: `device="cpu"`, numpy; `"cuda:N"`, device memory bound with
the CUDA execution provider). Per step only the token ids and the per-row lengths go in (bound on the host; ONNX
Runtime moves them to where each node wants them — GroupQueryAttention on CUDA reads `total_sequence_length` on the
CPU) and the logits of each row's last new position come out, [rows, 1, vocab], into a host array. A fork, a cached
prompt prefix and a block read back for the prefix cache are 2-D copies of the memory layer. The CUDA path is
UNVERIFIED (no GPU where r1deploy is developed); note that ONNX Runtime's CUDA GroupQueryAttention has FP16 and BF16
kernels only, so an FP32 fused graph would run that node on the CPU.

Imports numpy, onnxruntime and kv_memory (copied beside it) only: this file is copied next to the Triton python
model.
"""

import numpy as np
import onnxruntime as ort
from kv_memory import MissingRuntime, memory_for, positions

# ONNX Runtime fuses an INT4 DequantizeLinear -> MatMul into MatMulNBits, which by default quantizes the
# activations to int8 as well (`session.qdq_matmulnbits_accuracy_level` 4): "fp32" keeps them FP32 — the weights-only
# model the quantize stage measured and gated — and "int8" takes the faster kernels (docs/serving.md "INT4 on ONNX
# Runtime"). Repository parameter `ort_int4_activations`.
INT4_ACCURACY_LEVEL = {"fp32": "0", "int8": "4"}

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SharedKVEngine:
    """KVEngine over an ONNX Runtime session of the fused graph. Not thread-safe: one loop owns it."""

    def __init__(self, session: "ort.InferenceSession", max_rows: int, max_seq: int, device: str = "cpu"):
        if max_rows < 1 or max_seq < 1:
            raise ValueError("max_rows and max_seq must be at least 1")
        self.session = session
        self.memory = memory_for(device)
        self.max_rows = max_rows
        self.max_seq = max_seq
        self.capacity = max_seq + 1
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in ("seqlens_k", "query_seqlens", "total_sequence_length", "logits_index") if n not in inputs]
        if missing:
            raise ValueError(f"not a fused decoder graph (no input {missing[0]!r}): export it with --graph fused")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.buffers = {}  # past input name → the memory layer's [max_rows, heads, capacity, dim] buffer
        for name in self.past_names:
            _, heads, _, dim = inputs[name].shape
            self.buffers[name] = self.memory.alloc((max_rows, heads, self.capacity, dim), _NUMPY[inputs[name].type])
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab = int(logits.shape[-1])
        self.logits_dtype = _NUMPY[logits.type]
        self._lengths = np.zeros(max_rows, np.int64)
        self._total = np.array(self.capacity, np.int32)
        self._steps: dict[tuple[int, int, int], _Step] = {}
        self._steady: _Step | None = None  # the last decode step, reused while the same rows decode
        self._epoch = 0  # bumped by prefill and release: a reused step must see the lengths they changed

    @classmethod
    def from_path(cls, onnx_path, max_rows: int, max_seq: int, threads: int = 0, device: str = "cpu",
                  int4_activations: str = "fp32") -> "SharedKVEngine":
        """`device` "cuda:N" runs the session with the CUDA execution provider on GPU N (UNVERIFIED);
        `int4_activations`: "fp32" | "int8" (INT4_ACCURACY_LEVEL)."""
        providers: list = ["CPUExecutionProvider"]
        if device != "cpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingRuntime(f"ONNX Runtime here lacks CUDAExecutionProvider, which device {device!r} needs "
                                     "(install onnxruntime-gpu)")
            index = device.partition(":")[2]
            providers = [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", INT4_ACCURACY_LEVEL[int4_activations])
        session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        return cls(session, max_rows, max_seq, device)

    # -- the KVEngine protocol ---------------------------------------------------------------------------------

    def prefill(self, rows: list[int], prompts: list[list[int]], cached: list | None = None) -> np.ndarray:
        """Prompts of free rows; one call per run of consecutive row ids (rows padded to the run's longest
        prompt). `cached[i]`, when given, is KV of the first positions of prompt i (`kv_blocks` of an earlier row,
        a list of blocks): written into the row, and only the rest of the prompt is computed. Returns each prompt's
        last-position logits, [len(rows), vocab], in the order given."""
        if len(rows) != len(prompts):
            raise ValueError("prefill: one prompt per row")
        for r, p in zip(rows, prompts, strict=True):
            self._check_row(r)
            if self._lengths[r]:
                raise ValueError(f"prefill: row {r} is in use (release it first)")
            if not 1 <= len(p) <= self.max_seq:
                raise ValueError(f"prefill: a prompt of {len(p)} tokens does not fit (1..{self.max_seq})")
        if len(set(rows)) != len(rows):
            raise ValueError("prefill: a row is listed twice")
        out = np.empty((len(rows), self.vocab), np.float32)
        where = {r: i for i, r in enumerate(rows)}
        start = dict.fromkeys(rows, 0)  # positions already cached, per row
        for i, blocks in enumerate(cached or []):
            if blocks:
                r, at = rows[i], 0
                for block in blocks:
                    n = next(iter(block.values())).shape[1]
                    for name, buf in self.buffers.items():
                        host = np.ascontiguousarray(block[name], buf.dtype)[None]
                        self.memory.copy2d(positions(buf, (r, r + 1), (at, at + n)), positions(host, (0, 1), (0, n)),
                                           "h2d")
                    at += n
                if at >= len(prompts[i]):
                    raise ValueError("prefill: the cached prefix must leave at least one prompt token to compute")
                start[r] = at
                self._lengths[r] = at
        for lo, hi in _runs(sorted(rows)):
            width = max(len(prompts[where[r]]) - start[r] for r in range(lo, hi))
            ids = np.zeros((hi - lo, width), np.int64)
            new = np.zeros(hi - lo, np.int32)
            for r in range(lo, hi):
                p = prompts[where[r]][start[r] :]
                ids[r - lo, : len(p)] = p
                new[r - lo] = len(p)
            logits = self._run(lo, hi, ids, new)
            for r in range(lo, hi):
                out[where[r]] = logits[r - lo]
            self._lengths[lo:hi] += new
        self._epoch += 1
        return out

    def decode(self, rows: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each listed running row, in ONE call over the span of their row ids."""
        n = len(rows)
        if n != len(tokens):
            raise ValueError("decode: one token per row")
        if not n:
            return np.empty((0, self.vocab), np.float32)
        step = self._steady
        if step is not None and step.rows == rows and step.epoch == self._epoch:
            # The same rows as the previous step and nothing prefilled or released since: each listed row is one
            # longer, so the lengths move by `query` (a handful of array operations per step, whatever B is).
            if step.longest >= self.max_seq:
                raise ValueError(f"decode: a row is full ({self.max_seq} positions)")
            step.seqlens += step.query
        else:
            step = self._prepare_decode(rows)
        if step.whole:  # rows == range(lo, hi): plain slices, no gathers
            step.ids[:, 0] = tokens
        else:
            step.ids[step.at, 0] = tokens
        step.run(self)
        self._lengths[step.lo : step.hi] += step.query
        step.longest += 1
        self._steady = step
        if step.whole:
            return step.logits[:, 0].astype(np.float32)  # a copy: the step's buffer is rewritten next call
        return step.logits[step.at, 0].astype(np.float32)

    def _prepare_decode(self, rows: list[int]) -> "_Step":
        at = np.asarray(rows, np.int64)
        lo, hi = int(at.min()), int(at.max()) + 1
        self._check_row(lo)
        self._check_row(hi - 1)
        at -= lo
        lengths = self._lengths[lo:hi]
        mine = lengths[at]
        if mine.min() == 0 or mine.max() >= self.max_seq:
            bad = rows[int(np.argmax((mine == 0) | (mine >= self.max_seq)))]
            raise ValueError(f"decode: row {bad} " + ("has no prompt (prefill it first)" if self._lengths[bad] == 0
                                                        else f"is full ({self.max_seq} positions)"))
        step = self._step(lo, hi, 1)
        step.query.fill(0)
        step.query[at] = 1
        if int(step.query.sum()) != len(rows):
            raise ValueError("decode: a row is listed twice")
        step.last.fill(0)
        # seqlens_k: cached after the step minus one; an idle row (query 0) claims its own length, at least 1.
        np.maximum(lengths + step.query, 1, out=step.seqlens, casting="unsafe")
        step.seqlens -= 1
        step.rows, step.at, step.epoch, step.longest = list(rows), at, self._epoch, int(mine.max())
        step.whole = bool(len(rows) == hi - lo and np.array_equal(at, np.arange(hi - lo)))
        return step

    def kv_blocks(self, row: int, start: int, end: int) -> dict:
        """A copy of positions [start, end) of a row's cache: {past input name: [heads, end - start, dim]}."""
        if not 0 <= start < end <= self._lengths[row]:
            raise ValueError(f"kv_blocks: positions {start}..{end} are not cached in row {row}")
        out = {}
        for name, buf in self.buffers.items():
            host = np.empty((1, buf.shape[1], end - start, buf.shape[3]), buf.dtype)
            self.memory.copy2d(positions(host, (0, 1), (0, end - start)), positions(buf, (row, row + 1), (start, end)),
                               "d2h")
            out[name] = host[0]
        return out

    def fork(self, source: int, rows: list[int]) -> None:
        """Free `rows` start as copies of running row `source` (the other choices of an n > 1 request): its
        cached positions copied into theirs."""
        self._check_row(source)
        n = int(self._lengths[source])
        if not n:
            raise ValueError(f"fork: row {source} has no prompt (prefill it first)")
        for r in rows:
            self._check_row(r)
            if self._lengths[r]:
                raise ValueError(f"fork: row {r} is in use (release it first)")
        for buf in self.buffers.values():
            for r in rows:
                self.memory.copy2d(positions(buf, (r, r + 1), (0, n)), positions(buf, (source, source + 1), (0, n)), "d2d")
        self._lengths[rows] = n
        self._epoch += 1

    def release(self, rows: list[int]) -> None:
        # Nothing to clear: a row's stale positions beyond its length are never read, and the next prompt
        # overwrites them.
        for r in rows:
            self._check_row(r)
            self._lengths[r] = 0
        self._epoch += 1

    def cached(self, row: int) -> int:
        self._check_row(row)
        return int(self._lengths[row])

    # -- one engine call ---------------------------------------------------------------------------------------

    def _check_row(self, r: int) -> None:
        if not 0 <= r < self.max_rows:
            raise ValueError(f"row {r} is outside 0..{self.max_rows - 1}")

    def _step(self, lo: int, hi: int, width: int) -> "_Step":
        """The binding of a call over rows [lo, hi) with `width` new positions, kept: in steady decoding the span
        stays the same from step to step, and a step then only writes its token ids and lengths into arrays
        ONNX Runtime already reads (binding the cache anew would cost more than the step's own inputs)."""
        key = (lo, hi, width)
        step = self._steps.get(key)
        if step is None:
            if len(self._steps) >= 16:
                self._steps.pop(next(iter(self._steps)))
            step = self._steps[key] = _Step(self, lo, hi, width)
        return step

    def _run(self, lo: int, hi: int, ids: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Rows [lo, hi): row r gets new[r - lo] tokens (0: idle this call). Returns [hi - lo, vocab] float32,
        the logits of each row's last new token (undefined for idle rows)."""
        step = self._step(lo, hi, ids.shape[1])
        step.ids[:] = ids
        step.query[:] = new
        # An idle row claims max(length, 1) cached tokens (seqlens_k >= 0 is required even for an empty row).
        np.maximum(self._lengths[lo:hi] + new, 1, out=step.seqlens, casting="unsafe")
        step.seqlens -= 1
        np.maximum(new - 1, 0, out=step.last[:, 0], casting="unsafe")
        step.run(self)
        return step.logits[:, 0].astype(np.float32)


class _Step:
    """One IOBinding and the arrays it reads and writes, all owned here (bound by address, so they must live
    as long as the binding): rows [lo, hi) of every cache buffer as both past and present (on the engine's
    device), the token ids, the per-row lengths and the logits (on the host)."""

    def __init__(self, engine: SharedKVEngine, lo: int, hi: int, width: int):
        self.lo, self.hi = lo, hi
        self.rows: list[int] = []  # decode: the rows it was prepared for, their offsets, the engine's epoch then
        self.at = np.zeros(0, np.int64)
        self.epoch, self.longest, self.whole = -1, 0, False
        rows = hi - lo
        self.ids = np.zeros((rows, width), np.int64)
        self.seqlens = np.zeros(rows, np.int32)
        self.query = np.zeros(rows, np.int32)
        self.last = np.zeros((rows, 1), np.int64)
        self.logits = np.zeros((rows, 1, engine.vocab), engine.logits_dtype)
        self.small = (("input_ids", self.ids), ("seqlens_k", self.seqlens), ("query_seqlens", self.query),
                      ("total_sequence_length", engine._total), ("logits_index", self.last))
        # ONNX Runtime copies an input bound on one device for a node on another when it is BOUND, not when it runs:
        # on the CPU the binding reads these arrays as they are at each run; on a GPU they are bound again each run.
        self.rebind = not engine.memory.is_host
        self.io = io = engine.session.io_binding()
        self._bind_small()
        io.bind_output("logits", "cpu", 0, self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        device, device_id = engine.memory.ort_device
        for name, buf in engine.buffers.items():
            span = buf.rows(lo, hi)
            io.bind_input(name, device, device_id, buf.dtype, list(span.shape), span.ptr)
            io.bind_output(name.replace("past_key_values.", "present.", 1), device, device_id, buf.dtype,
                           list(span.shape), span.ptr)

    def _bind_small(self) -> None:
        for name, arr in self.small:
            self.io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def run(self, engine: SharedKVEngine) -> None:
        if self.rebind:
            self._bind_small()
        engine.memory.sync()  # copies queued on the memory layer's stream land before ONNX Runtime's reads
        engine.session.run_with_iobinding(self.io)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row ids as [lo, hi) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
