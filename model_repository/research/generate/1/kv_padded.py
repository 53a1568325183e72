"""`PaddedKVEngine`: the KV cache of the running batch for the generic exported decoder graph (the one torch
emits: `past_key_values.*` in, `present.* = concat(past, new)` out, a 2-D attention mask and position ids).

Layout: one array per cache slot, [rows in the batch, heads, L, dim], each row's positions right-aligned and
left-padded with zeros; the attention mask hides the padding and position ids count real positions only, so a
row computes exactly what it would alone. Every running row decodes in one engine call.

Where the cache lives (kv_memory.py): a runner that `binds_device` (engine_runtimes.py: ONNX Runtime with the CUDA
execution provider through IOBinding, TensorRT through tensor addresses) brings its `memory` — device memory on a
GPU — and the engine keeps the cache there: a step's `present` buffers are allocated by the engine ([rows, heads, L + 1, dim]) and bound as the
graph's outputs, and become the next step's `past` as they are. Per step only the token ids, the attention mask and
the position ids go in from the host, and the logits come out to it ([rows, S, vocab] or, from a graph that returns
the last position only, [rows, 1, vocab]: the engine takes `[:, -1]` of either). Any other `run(feeds, output_names)
-> list[np.ndarray]` (a BLS call, a bare session) gets numpy arrays and returns numpy arrays, and the cache lives on
the host.

Bytes copied per generated token (the graph decides most of it): the graph's Concat writes `present`, i.e. the
whole cache of the batch, every step — rows × layers × 2 × heads × L × dim × element size — so a step's cost
grows linearly with the longest past in the batch (L). A row joining or leaving copies the cache once, on the device
(padding to a common L, dropping the row and any all-padding columns); each of those moves is a 2-D copy of the
memory layer. The in-place buffer of the fused graph (kv_shared.py) removes the per-step copy.

Imports numpy and kv_memory (copied beside it) only: copied next to the generate model's model.py and run inside
Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kv_memory import HostMemory, positions


@dataclass(frozen=True)
class CacheSlot:
    past: str  # input name, past_key_values.<i>.key|value
    present: str  # output name, present.<i>.key|value
    heads: int
    dim: int


class PaddedKVEngine:
    """KVEngine over an engine runner (see the module's docstring: one that binds the memory layer's buffers, or a
    plain `run(feeds, output_names) -> list[np.ndarray]`). `max_batch` bounds the rows of one engine call (an
    engine's shape profile)."""

    def __init__(self, run, slots: list[CacheSlot], kv_dtype: str, max_rows: int, logits: str = "logits",
                 pad_id: int = 0, max_batch: int | None = None):
        self.run, self.slots, self.dtype, self.logits = run, slots, np.dtype(kv_dtype), logits
        self.max_rows, self.pad_id = max_rows, pad_id
        self.max_batch = max_batch or max_rows
        self.binds = bool(getattr(run, "binds_device", False))
        self.memory = run.memory if self.binds else HostMemory()
        self.outputs = [logits] + [s.present for s in slots]
        self.order: list[int] = []  # row id of each batch position
        self.lengths: dict[int, int] = {}  # row → cached positions
        self.cache = [self._alloc(0, 0, s) for s in slots]  # the memory layer's buffers, one per slot

    def _alloc(self, rows: int, length: int, slot: CacheSlot, zero: bool = True):
        return self.memory.alloc((rows, slot.heads, length, slot.dim), self.dtype, zero)

    @property
    def width(self) -> int:
        """L: the positions every row of the batch spans (the longest cached row)."""
        return self.cache[0].shape[2] if self.cache else 0

    def cached(self, row: int) -> int:
        return self.lengths[row]

    def _forward(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, past: list, out: list | None = None):
        """One engine call over the memory layer's `past` buffers: the logits (host) and the `present` buffers —
        `out`, or new ones, bound as the outputs; from a plain runner, its numpy outputs as they are."""
        host = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        if self.binds:
            if out is None:
                length = past[0].shape[2] + ids.shape[1]
                out = [self._alloc(len(ids), length, s, zero=False) for s in self.slots]
            (logits,) = self.run.run_bound(host, {s.past: p for s, p in zip(self.slots, past, strict=True)},
                                           {s.present: o for s, o in zip(self.slots, out, strict=True)}, [self.logits])
            return logits, out
        feeds = dict(host)
        for s, p in zip(self.slots, past, strict=True):
            feeds[s.past] = p.view(np.ndarray)
        result = self.run(feeds, self.outputs)
        return result[0], [self.memory.adopt(np.ascontiguousarray(a)) for a in result[1:]]

    def prefill(self, rows: list[int], prompts: list[list[int]], cached: list | None = None) -> np.ndarray:
        """`cached[i]`, when given, is KV of the first positions of prompt i (`kv_blocks` of an earlier row, a list
        of blocks): that prompt is run alone with it as its past, and only the rest of it is computed."""
        for row in rows:
            if row in self.lengths:
                raise ValueError(f"row {row} is already running")
        reused = [i for i, blocks in enumerate(cached or []) if blocks]
        if reused:
            fresh = [i for i in range(len(rows)) if i not in set(reused)]
            parts = []
            if fresh:
                parts.append((fresh, self.prefill([rows[i] for i in fresh], [prompts[i] for i in fresh])))
            for i in reused:
                parts.append(([i], self._prefill_after(rows[i], prompts[i], cached[i])))
            out = np.empty((len(rows), parts[0][1].shape[1]), np.float32)
            for where, logits in parts:
                out[where] = logits
            return out
        logits_rows, presents, lengths = [], [], []
        for start in range(0, len(rows), self.max_batch):
            chunk = prompts[start : start + self.max_batch]
            width = max(len(p) for p in chunk)
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = p
                mask[i, width - len(p) :] = 1
            position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            logits, present = self._forward(ids, mask, position_ids, [self._alloc(len(chunk), 0, s) for s in self.slots])
            logits_rows.append(np.asarray(logits[:, -1], dtype=np.float32))
            for buf in present:
                # padded positions hold whatever fully masked attention left there (undefined, possibly NaN):
                # zero them, since 0 × NaN would poison every later step of the batch
                for i, p in enumerate(chunk):
                    if width > len(p):
                        self.memory.zero(positions(buf, (i, i + 1), (0, width - len(p))))
            presents.append(present)
            lengths.extend(len(p) for p in chunk)
        self._join(presents)
        self.order.extend(rows)
        for row, n in zip(rows, lengths, strict=True):
            self.lengths[row] = n
        return np.concatenate(logits_rows, axis=0)

    def _prefill_after(self, row: int, prompt: list[int], blocks: list[dict]) -> np.ndarray:
        """One prompt whose first positions are cached: the blocks written into a past buffer, the rest of the
        prompt computed with it."""
        m = sum(b[self.slots[0].past].shape[1] for b in blocks)
        if m >= len(prompt):
            raise ValueError("prefill: the cached prefix must leave at least one prompt token to compute")
        past = []
        for s in self.slots:
            buf, at = self._alloc(1, m, s, zero=False), 0
            for b in blocks:
                host = np.ascontiguousarray(b[s.past], self.dtype)[None]
                n = host.shape[2]
                self.memory.copy2d(positions(buf, (0, 1), (at, at + n)), positions(host, (0, 1), (0, n)), "h2d")
                at += n
            past.append(buf)
        ids = np.asarray([prompt[m:]], dtype=np.int64)
        mask = np.ones((1, len(prompt)), dtype=np.int64)
        position_ids = np.arange(m, len(prompt), dtype=np.int64)[None]
        logits, present = self._forward(ids, mask, position_ids, past)
        self._join([present])
        self.order.append(row)
        self.lengths[row] = len(prompt)
        return np.asarray(logits[:, -1], dtype=np.float32)

    def kv_blocks(self, row: int, start: int, end: int) -> dict:
        """A copy of positions [start, end) of a row's cache: {past input name: [heads, end - start, dim]}."""
        n = self.lengths.get(row, 0)
        if not 0 <= start < end <= n:
            raise ValueError(f"kv_blocks: positions {start}..{end} are not cached in row {row}")
        at, pad = self.order.index(row), self.width - n
        out = {}
        for s, c in zip(self.slots, self.cache, strict=True):
            host = np.empty((1, s.heads, end - start, s.dim), c.dtype)
            self.memory.copy2d(positions(host, (0, 1), (0, end - start)),
                               positions(c, (at, at + 1), (pad + start, pad + end)), "d2h")
            out[s.past] = host[0]
        return out

    def _join(self, parts: list[list]) -> None:
        """The batch's rows followed by the rows of each part (present buffers, one per slot), every row
        right-aligned to the widest (pad-left): one new buffer per slot, one 2-D copy per piece."""
        width = max([self.width] + [p[0].shape[2] for p in parts])
        merged = []
        for k, slot in enumerate(self.slots):
            pieces = [self.cache[k]] + [p[k] for p in parts]
            out, at = self._alloc(sum(x.shape[0] for x in pieces), width, slot), 0
            for x in pieces:
                n, w = x.shape[0], x.shape[2]
                self.memory.copy2d(positions(out, (at, at + n), (width - w, width)), positions(x, (0, n), (0, w)), "d2d")
                at += n
            merged.append(out)
        self.cache = merged

    def decode(self, rows: list[int], tokens: list[int]) -> np.ndarray:
        if sorted(rows) != sorted(self.order):
            raise ValueError("decode takes every running row once")
        at = {row: i for i, row in enumerate(self.order)}
        token_of = dict(zip(rows, tokens, strict=True))
        width, n = self.width, len(self.order)
        ids = np.asarray([[token_of[r]] for r in self.order], dtype=np.int64)
        mask = np.zeros((n, width + 1), dtype=np.int64)
        for i, r in enumerate(self.order):
            mask[i, width - self.lengths[r] :] = 1
        position_ids = np.asarray([[self.lengths[r]] for r in self.order], dtype=np.int64)
        chunks = [(lo, min(lo + self.max_batch, n)) for lo in range(0, n, self.max_batch)]
        whole = len(chunks) == 1
        # one call: its present buffers are the new cache; several: each writes (or is copied into) its rows of one
        target = None if whole else [self._alloc(n, width + 1, s, zero=False) for s in self.slots]
        logits_parts = []
        for lo, hi in chunks:
            past = self.cache if whole else [c.rows(lo, hi) for c in self.cache]
            out = [t.rows(lo, hi) for t in target] if target is not None and self.binds else None
            logits, present = self._forward(ids[lo:hi], mask[lo:hi], position_ids[lo:hi], past, out)
            logits_parts.append(np.asarray(logits[:, -1], dtype=np.float32))
            if whole:
                target = present
            elif not self.binds:  # a plain runner's own arrays: their rows copied into the batch's buffers
                for t, p in zip(target, present, strict=True):
                    self.memory.copy2d(positions(t, (lo, hi), (0, width + 1)), positions(p, (0, hi - lo), (0, width + 1)),
                                       "d2d")
        self.cache = list(target)
        logits = np.concatenate(logits_parts, axis=0)
        for r in self.order:
            self.lengths[r] += 1
        return logits[[at[r] for r in rows]]

    def fork(self, source: int, rows: list[int]) -> None:
        """Free `rows` start as copies of running row `source` (the other choices of an n > 1 request)."""
        if source not in self.lengths:
            raise ValueError(f"fork: row {source} is not running")
        for row in rows:
            if row in self.lengths:
                raise ValueError(f"row {row} is already running")
        at, n, width = self.order.index(source), len(self.order), self.width
        grown = []
        for s, c in zip(self.slots, self.cache, strict=True):
            out = self._alloc(n + len(rows), width, s, zero=False)
            self.memory.copy2d(positions(out, (0, n), (0, width)), positions(c, (0, n), (0, width)), "d2d")
            for j in range(n, n + len(rows)):
                self.memory.copy2d(positions(out, (j, j + 1), (0, width)), positions(c, (at, at + 1), (0, width)), "d2d")
            grown.append(out)
        self.cache = grown
        self.order.extend(rows)
        for row in rows:
            self.lengths[row] = self.lengths[source]

    def release(self, rows: list[int]) -> None:
        gone = {r for r in rows if r in self.lengths}
        if not gone:
            return
        keep = [i for i, r in enumerate(self.order) if r not in gone]
        self.order = [self.order[i] for i in keep]
        for r in gone:
            del self.lengths[r]
        width = max((self.lengths[r] for r in self.order), default=0)
        trim = self.width - width  # columns that are padding for every remaining row
        kept = []
        for s, c in zip(self.slots, self.cache, strict=True):
            out = self._alloc(len(keep), width, s, zero=False)
            for dst, src, count in _runs(keep):
                self.memory.copy2d(positions(out, (dst, dst + count), (0, width)),
                                   positions(c, (src, src + count), (trim, trim + width)), "d2d")
            kept.append(out)
        self.cache = kept


def _runs(keep: list[int]) -> list[tuple[int, int, int]]:
    """Increasing batch positions as (new position, old position, count) runs of consecutive ones."""
    runs: list[tuple[int, int, int]] = []
    for new, old in enumerate(keep):
        if runs and runs[-1][1] + runs[-1][2] == old:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((new, old, 1))
    return runs
