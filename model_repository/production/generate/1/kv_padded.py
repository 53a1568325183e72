"""`PaddedKVEngine`: the KV cache of the running batch for the generic exported decoder graph (the one torch
emits: `past_key_values.*` in, `present.* = concat(past, new)` out, a 2-D attention mask and position ids).

Layout: one array per cache slot, [rows in the batch, heads, L, dim], each row's positions right-aligned and
left-padded with zeros; the attention mask hides the padding and position ids count real positions only, so a
row computes exactly what it would alone. Every running row decodes in one engine call.

Bytes copied per generated token (the graph decides most of it): the graph's Concat writes `present`, i.e. the
whole cache of the batch, every step — rows × layers × 2 × heads × L × dim × element size — so a step's cost
grows linearly with the longest past in the batch (L). Nothing else copies the cache per step: `present` is fed
back as the next `past` as it is. A row joining or leaving copies the cache once (padding to a common L,
dropping the row and any all-padding columns). The in-place buffer of the fused graph (kv_shared.py) removes
the per-step copy.

Imports numpy only: copied next to the generate model's model.py and run inside Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CacheSlot:
    past: str  # input name, past_key_values.<i>.key|value
    present: str  # output name, present.<i>.key|value
    heads: int
    dim: int


class PaddedKVEngine:
    """KVEngine over `run(feeds, output_names) -> list[np.ndarray]` (an ONNX Runtime session, a TensorRT
    runner or a BLS call). `max_batch` bounds the rows of one engine call (an engine's shape profile)."""

    def __init__(self, run, slots: list[CacheSlot], kv_dtype: str, max_rows: int, logits: str = "logits",
                 pad_id: int = 0, max_batch: int | None = None):
        self.run, self.slots, self.dtype, self.logits = run, slots, np.dtype(kv_dtype), logits
        self.max_rows, self.pad_id = max_rows, pad_id
        self.max_batch = max_batch or max_rows
        self.outputs = [logits] + [s.present for s in slots]
        self.order: list[int] = []  # row id of each batch position
        self.lengths: dict[int, int] = {}  # row → cached positions
        self.cache: list[np.ndarray] = [self._empty(0, 0, s) for s in slots]

    def _empty(self, rows: int, length: int, slot: CacheSlot) -> np.ndarray:
        return np.zeros((rows, slot.heads, length, slot.dim), dtype=self.dtype)

    @property
    def width(self) -> int:
        """L: the positions every row of the batch spans (the longest cached row)."""
        return self.cache[0].shape[2] if self.cache else 0

    def cached(self, row: int) -> int:
        return self.lengths[row]

    def _forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for s, p in zip(self.slots, past, strict=True):
            feeds[s.past] = p
        out = self.run(feeds, self.outputs)
        return out[0], out[1:]

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
        logits_rows, caches, lengths = [], [], []
        for start in range(0, len(rows), self.max_batch):
            chunk = prompts[start : start + self.max_batch]
            width = max(len(p) for p in chunk)
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = p
                mask[i, width - len(p) :] = 1
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            logits, present = self._forward(ids, mask, positions, [self._empty(len(chunk), 0, s) for s in self.slots])
            logits_rows.append(np.asarray(logits[:, -1], dtype=np.float32))
            for p_arr in present:
                # padded positions hold whatever fully masked attention left there (undefined, possibly NaN):
                # zero them, since 0 × NaN would poison every later step of the batch
                for i, p in enumerate(chunk):
                    p_arr[i, :, : width - len(p)] = 0
            caches.append(present)
            lengths.extend(len(p) for p in chunk)
        for present in caches:
            self._merge(present)
        self.order.extend(rows)
        for row, n in zip(rows, lengths, strict=True):
            self.lengths[row] = n
        return np.concatenate(logits_rows, axis=0)

    def _prefill_after(self, row: int, prompt: list[int], blocks: list[dict]) -> np.ndarray:
        """One prompt whose first positions are cached: the rest computed with them as the past."""
        past = [np.concatenate([b[s.past] for b in blocks], axis=1)[None] for s in self.slots]
        m = past[0].shape[2]
        if m >= len(prompt):
            raise ValueError("prefill: the cached prefix must leave at least one prompt token to compute")
        ids = np.asarray([prompt[m:]], dtype=np.int64)
        mask = np.ones((1, len(prompt)), dtype=np.int64)
        positions = np.arange(m, len(prompt), dtype=np.int64)[None]
        logits, present = self._forward(ids, mask, positions, [p.astype(self.dtype) for p in past])
        self._merge(present)
        self.order.append(row)
        self.lengths[row] = len(prompt)
        return np.asarray(logits[:, -1], dtype=np.float32)

    def kv_blocks(self, row: int, start: int, end: int) -> dict:
        """A copy of positions [start, end) of a row's cache: {past input name: [heads, end - start, dim]}."""
        n = self.lengths.get(row, 0)
        if not 0 <= start < end <= n:
            raise ValueError(f"kv_blocks: positions {start}..{end} are not cached in row {row}")
        at, pad = self.order.index(row), self.width - n
        return {s.past: c[at, :, pad + start : pad + end].copy() for s, c in zip(self.slots, self.cache, strict=True)}

    def _merge(self, present: list[np.ndarray]) -> None:
        width = max(self.width, present[0].shape[2])
        merged = []
        for old, new in zip(self.cache, present, strict=True):
            parts = [self._pad_left(old, width), self._pad_left(new, width)]
            merged.append(np.concatenate(parts, axis=0))
        self.cache = merged

    @staticmethod
    def _pad_left(a: np.ndarray, width: int) -> np.ndarray:
        missing = width - a.shape[2]
        if missing == 0:
            return a
        return np.concatenate([np.zeros(a.shape[:2] + (missing,) + a.shape[3:], dtype=a.dtype), a], axis=2)

    def decode(self, rows: list[int], tokens: list[int]) -> np.ndarray:
        if sorted(rows) != sorted(self.order):
            raise ValueError("decode takes every running row once")
        at = {row: i for i, row in enumerate(self.order)}
        token_of = dict(zip(rows, tokens, strict=True))
        width = self.width
        ids = np.asarray([[token_of[r]] for r in self.order], dtype=np.int64)
        mask = np.zeros((len(self.order), width + 1), dtype=np.int64)
        for i, r in enumerate(self.order):
            mask[i, width - self.lengths[r] :] = 1
        positions = np.asarray([[self.lengths[r]] for r in self.order], dtype=np.int64)
        logits_parts, present_parts = [], []
        for start in range(0, len(self.order), self.max_batch):
            end = start + self.max_batch
            logits, present = self._forward(
                ids[start:end], mask[start:end], positions[start:end], [c[start:end] for c in self.cache]
            )
            logits_parts.append(np.asarray(logits[:, -1], dtype=np.float32))
            present_parts.append(present)
        if len(present_parts) == 1:
            self.cache = list(present_parts[0])
        else:
            self.cache = [np.concatenate(parts, axis=0) for parts in zip(*present_parts, strict=True)]
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
        at = self.order.index(source)
        self.cache = [np.concatenate([c, np.repeat(c[at : at + 1], len(rows), axis=0)], axis=0) for c in self.cache]
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
        self.cache = [np.ascontiguousarray(c[keep, :, trim:]) for c in self.cache]
