"""A KV-cache engine over r1deploy's fused decoder graph (`r1deploy export --graph fused`): one fixed buffer per
cache slot, [max_rows, kv_heads, capacity, head_dim], that ONNX Runtime updates in place.

Implements the KVEngine protocol of the `generate` model (prefill / decode / release / cached). Row r of every
buffer belongs to scheduler row id r. A call covers a contiguous span of rows: the graph's `past_key_values.*`
and `present.*` are bound (IOBinding) to the same memory, that span's rows of the buffers, so
GroupQueryAttention writes each row's new keys and values at that row's own length and nothing is copied —
the cost of a step does not grow with what the other rows hold. Per row the graph reads its length from
`seqlens_k` (cached after the step, minus one) and `query_seqlens` (its new tokens); a row inside the span that
takes no part in the call gets `query_seqlens = 0`, which leaves its cache untouched.

The buffers hold `max_seq + 1` positions: a row never caches more than `max_seq`, and the one spare position is
the room GroupQueryAttention asks of every row of a call, idle ones too (cached + new <= capacity).

Self-contained (numpy and onnxruntime only): this file is copied next to the Triton python model.
"""

import numpy as np
import onnxruntime as ort

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SharedKVEngine:
    """KVEngine over an ONNX Runtime session of the fused graph. Not thread-safe: one loop owns it."""

    def __init__(self, session: "ort.InferenceSession", max_rows: int, max_seq: int):
        if max_rows < 1 or max_seq < 1:
            raise ValueError("max_rows and max_seq must be at least 1")
        self.session = session
        self.max_rows = max_rows
        self.max_seq = max_seq
        self.capacity = max_seq + 1
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [n for n in ("seqlens_k", "query_seqlens", "total_sequence_length", "logits_index") if n not in inputs]
        if missing:
            raise ValueError(f"not a fused decoder graph (no input {missing[0]!r}): export it with --graph fused")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.buffers: dict[str, np.ndarray] = {}
        for name in self.past_names:
            _, heads, _, dim = inputs[name].shape
            self.buffers[name] = np.zeros((max_rows, heads, self.capacity, dim), _NUMPY[inputs[name].type])
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab = int(logits.shape[-1])
        self.logits_dtype = _NUMPY[logits.type]
        self._lengths = np.zeros(max_rows, np.int64)
        self._total = np.array(self.capacity, np.int32)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    @classmethod
    def from_path(cls, onnx_path, max_rows: int, max_seq: int, threads: int = 0) -> "SharedKVEngine":
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return cls(session, max_rows, max_seq)

    # -- the KVEngine protocol ---------------------------------------------------------------------------------

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Prompts of free rows; one call per run of consecutive row ids (rows padded to the run's longest
        prompt). Returns each prompt's last-position logits, [len(rows), vocab], in the order given."""
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
        for lo, hi in _runs(sorted(rows)):
            width = max(len(prompts[where[r]]) for r in range(lo, hi))
            ids = np.zeros((hi - lo, width), np.int64)
            new = np.zeros(hi - lo, np.int32)
            for r in range(lo, hi):
                p = prompts[where[r]]
                ids[r - lo, : len(p)] = p
                new[r - lo] = len(p)
            logits = self._run(lo, hi, ids, new)
            for r in range(lo, hi):
                out[where[r]] = logits[r - lo]
            self._lengths[lo:hi] += new
        return out

    def decode(self, rows: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each listed running row, in ONE call over the span of their row ids."""
        if len(rows) != len(tokens):
            raise ValueError("decode: one token per row")
        if not rows:
            return np.empty((0, self.vocab), np.float32)
        for r in rows:
            self._check_row(r)
            if not self._lengths[r]:
                raise ValueError(f"decode: row {r} has no prompt (prefill it first)")
            if self._lengths[r] >= self.max_seq:
                raise ValueError(f"decode: row {r} is full ({self.max_seq} positions)")
        if len(set(rows)) != len(rows):
            raise ValueError("decode: a row is listed twice")
        lo, hi = min(rows), max(rows) + 1
        ids = np.zeros((hi - lo, 1), np.int64)
        new = np.zeros(hi - lo, np.int32)
        idx = np.asarray(rows) - lo
        ids[idx, 0] = tokens
        new[idx] = 1
        logits = self._run(lo, hi, ids, new)
        self._lengths[np.asarray(rows)] += 1
        return logits[idx]

    def release(self, rows: list[int]) -> None:
        # Nothing to clear: a row's stale positions beyond its length are never read, and the next prompt
        # overwrites them.
        for r in rows:
            self._check_row(r)
            self._lengths[r] = 0

    def cached(self, row: int) -> int:
        self._check_row(row)
        return int(self._lengths[row])

    # -- one engine call ---------------------------------------------------------------------------------------

    def _check_row(self, r: int) -> None:
        if not 0 <= r < self.max_rows:
            raise ValueError(f"row {r} is outside 0..{self.max_rows - 1}")

    def _binding(self, lo: int, hi: int) -> "ort.IOBinding":
        """An IOBinding with rows [lo, hi) of every buffer bound as both past and present (kept per span: in
        steady decoding the span stays the same, and binding the cache costs more than the step's own inputs)."""
        io = self._bindings.get((lo, hi))
        if io is None:
            if len(self._bindings) >= 16:
                self._bindings.pop(next(iter(self._bindings)))
            io = self.session.io_binding()
            for name, buf in self.buffers.items():
                view = buf[lo:hi]
                ptr = view.ctypes.data
                io.bind_input(name, "cpu", 0, buf.dtype, list(view.shape), ptr)
                io.bind_output(name.replace("past_key_values.", "present.", 1), "cpu", 0, buf.dtype, list(view.shape), ptr)
            self._bindings[(lo, hi)] = io
        return io

    def _run(self, lo: int, hi: int, ids: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Rows [lo, hi): row r gets new[r - lo] tokens (0: idle this call). Returns [hi - lo, vocab] float32,
        the logits of each row's last new token (undefined for idle rows)."""
        lengths = self._lengths[lo:hi]
        # An idle row claims max(length, 1) cached tokens (seqlens_k >= 0 is required even for an empty row).
        seqlens = np.maximum(lengths + new, 1).astype(np.int32) - 1
        io = self._binding(lo, hi)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("query_seqlens", new)
        io.bind_cpu_input("total_sequence_length", self._total)
        io.bind_cpu_input("logits_index", np.maximum(new.astype(np.int64) - 1, 0)[:, None])
        logits = np.empty((hi - lo, 1, self.vocab), self.logits_dtype)
        io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits[:, 0].astype(np.float32, copy=False)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row ids as [lo, hi) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
