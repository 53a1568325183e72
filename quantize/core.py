"""Blocked 4-bit weight quantization in numpy: the one core behind both output formats.

Every weight is handled in a *canonical* layout `[K, M]`: rows run along the reduction axis (the axis the
MatMul sums over, which is also the axis the blocks of `block_size` consecutive values lie on), columns are
all other axes flattened. A `QuantizedWeight` keeps its codes and scales in the weight's own layout, so the
ONNX writers (`quantize.rewrite`) only reshape bytes.

Symmetric: `w ≈ scale · q`, q ∈ [-8, 7] (INT4), one scale per block. The scale is absmax/7 so that it stays
positive (TensorRT rejects negative scales) at the price of rarely using -8.
Asymmetric: `w ≈ scale · (q - zero_point)`, q and zero_point ∈ [0, 15] (UINT4); the block range always includes
0 so that the zero point is an integer in range.

AWQ (activation-aware weight quantization, Lin et al. 2023) in two searches, both minimising the MatMul's
output error on calibration activations `X`:

1. per-input-channel scales `s = mean|X|^alpha` (normalised), alpha on a grid: the weight is quantized as
   `Q(diag(s)·W)` and the activation multiplied by `1/s`, so salient input channels get finer steps;
   alpha = 0 is plain RTN, so the search can only improve on RTN for the calibration data;
2. per (block, column) clipping of the quantization range (ratio 1.0 … 0.5), with the error of each block
   measured through that block's activation Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

ALPHA_GRID = tuple(i / 10 for i in range(11))  # 0 = RTN … 1 = scale fully by activation magnitude
CLIP_GRID = tuple(1.0 - i / 40 for i in range(21))  # 1.0 … 0.5: shrink the block range by up to half
MAX_CALIBRATION_ROWS = 512  # activation rows used for the error estimates (the means use all rows)


@dataclass
class QuantizedWeight:
    """Codes, scales and zero points in the weight's own layout, blocked along `axis`."""

    q: np.ndarray  # int8 codes: [-8, 7] when symmetric, [0, 15] otherwise; same shape as the weight
    scales: np.ndarray  # float32; the weight's shape with `axis` reduced to ceil(K / block_size)
    zero_points: Optional[np.ndarray]  # uint8 [0, 15], shape of `scales`; None when symmetric
    axis: int
    block_size: int
    # AWQ: the weight was quantized as diag(s)·W along `axis`; the graph multiplies the activation by 1/s.
    input_scale: Optional[np.ndarray] = None
    alpha: float = 0.0

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def dequantize(self) -> np.ndarray:
        """The weight the graph computes with, in the original domain (AWQ scale divided back out)."""
        qc = to_canonical(self.q.astype(np.float32), self.axis)
        sc = to_canonical(self.scales, self.axis)
        k = qc.shape[0]
        if self.zero_points is not None:
            zc = to_canonical(self.zero_points.astype(np.float32), self.axis)
            qc = qc - np.repeat(zc, self.block_size, axis=0)[:k]
        deq = qc * np.repeat(sc, self.block_size, axis=0)[:k]
        if self.input_scale is not None:
            deq = deq / self.input_scale[:, None]
        return from_canonical(deq.astype(np.float32), self.axis, self.q.shape)


def to_canonical(w: np.ndarray, axis: int) -> np.ndarray:
    """[..., K (at `axis`), ...] → [K, M]."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def from_canonical(c: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_canonical`; `shape` is the weight's shape with `axis` holding `c.shape[0]` rows."""
    moved = [c.shape[0]] + [d for i, d in enumerate(shape) if i != axis]
    return np.moveaxis(c.reshape(moved), 0, axis)


def _blocks(wc: np.ndarray, block_size: int) -> np.ndarray:
    """[K, M] → [n_blocks, block_size, M]; K must be a multiple of the block size (the graph layer checks)."""
    k, m = wc.shape
    return wc.reshape(k // block_size, block_size, m)


def _quantize_canonical(
    wc: np.ndarray, block_size: int, symmetric: bool, clip: np.ndarray | float = 1.0
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """RTN on [K, M] with an optional range-shrink ratio per (block, column); returns codes, scales, zps."""
    wb = _blocks(wc, block_size)
    clip = np.asarray(clip, dtype=np.float32)
    if symmetric:
        amax = np.abs(wb).max(axis=1) * clip
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(wb / scale[:, None, :]), -8, 7)
        zp = None
    else:
        wmax = np.maximum(wb.max(axis=1), 0.0) * clip
        wmin = np.minimum(wb.min(axis=1), 0.0) * clip
        span = wmax - wmin
        scale = np.where(span > 0, span / 15.0, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-wmin / scale), 0, 15)
        q = np.clip(np.rint(wb / scale[:, None, :]) + zp[:, None, :], 0, 15)
        zp = zp.astype(np.uint8)
    return q.reshape(wc.shape).astype(np.int8), scale, zp


def _dequantize_canonical(q: np.ndarray, scale: np.ndarray, zp: Optional[np.ndarray], block_size: int) -> np.ndarray:
    qb = _blocks(q.astype(np.float32), block_size)
    if zp is not None:
        qb = qb - zp[:, None, :].astype(np.float32)
    return (qb * scale[:, None, :]).reshape(q.shape)


def _pack(w: np.ndarray, axis: int, block_size: int, q, scale, zp, input_scale=None, alpha=0.0) -> QuantizedWeight:
    nb_shape = tuple(d if i != axis else scale.shape[0] for i, d in enumerate(w.shape))
    return QuantizedWeight(
        q=from_canonical(q, axis, w.shape),
        scales=from_canonical(scale, axis, nb_shape),
        zero_points=None if zp is None else from_canonical(zp, axis, nb_shape),
        axis=axis,
        block_size=block_size,
        input_scale=input_scale,
        alpha=alpha,
    )


def quantize_rtn(w: np.ndarray, axis: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest with the full block range."""
    q, scale, zp = _quantize_canonical(to_canonical(w.astype(np.float32), axis), block_size, symmetric)
    return _pack(w, axis, block_size, q, scale, zp)


def quantize_clipped(w: np.ndarray, axis: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """RTN with a per-(block, column) clip ratio chosen by weight error alone, for weights without
    calibration activations (MoE experts: each sees only the tokens routed to it)."""
    wc = to_canonical(w.astype(np.float32), axis)
    clip = _search_clip(wc, None, block_size, symmetric)
    q, scale, zp = _quantize_canonical(wc, block_size, symmetric, clip)
    return _pack(w, axis, block_size, q, scale, zp)


def _block_grams(x: np.ndarray, block_size: int) -> np.ndarray:
    """[T, K] activations → [n_blocks, block_size, block_size] Gram matrix of each block of input channels."""
    t, k = x.shape
    xb = x.reshape(t, k // block_size, block_size).transpose(1, 0, 2)  # [n_blocks, T, block]
    return np.matmul(xb.transpose(0, 2, 1), xb)


def _search_clip(wc: np.ndarray, x: Optional[np.ndarray], block_size: int, symmetric: bool) -> np.ndarray:
    """Best range-shrink ratio per (block, column): minimises d·G·d per block, d the quantization error of
    that block's weights and G its activation Gram matrix (identity without activations)."""
    grams = _block_grams(x, block_size) if x is not None else None
    best_err = None
    best = np.ones((wc.shape[0] // block_size, wc.shape[1]), dtype=np.float32)
    for ratio in CLIP_GRID:
        q, scale, zp = _quantize_canonical(wc, block_size, symmetric, ratio)
        d = _blocks(wc - _dequantize_canonical(q, scale, zp, block_size), block_size)
        if grams is None:
            err = np.einsum("bim,bim->bm", d, d)
        else:
            err = (d * np.matmul(grams, d)).sum(axis=1)  # batched BLAS: ~50x faster than einsum here
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, ratio, best)
    return best


def _rows(x: np.ndarray, seed: int = 0) -> np.ndarray:
    if x.shape[0] <= MAX_CALIBRATION_ROWS:
        return x
    idx = np.random.default_rng(seed).choice(x.shape[0], MAX_CALIBRATION_ROWS, replace=False)
    return x[np.sort(idx)]


def quantize_awq(w: np.ndarray, x: np.ndarray, block_size: int, symmetric: bool) -> QuantizedWeight:
    """AWQ for a MatMul weight `w` [K, N] (reduction axis 0) with calibration activations `x` [T, K]."""
    w = w.astype(np.float32)
    x = x.astype(np.float32)
    act_mean = np.abs(x).mean(axis=0) + 1e-8
    xs = _rows(x)
    ref = xs @ w
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in ALPHA_GRID:
        s = act_mean**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        q, scale, zp = _quantize_canonical(w * s[:, None], block_size, symmetric)
        w_hat = _dequantize_canonical(q, scale, zp, block_size) / s[:, None]
        err = float(np.square(ref - xs @ w_hat).sum())
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    _, alpha, s = best
    ws = w * s[:, None]
    clip = _search_clip(ws, xs / s[None, :], block_size, symmetric)
    q, scale, zp = _quantize_canonical(ws, block_size, symmetric, clip)
    # alpha == 0 gives s == 1: no activation scaling needed, so no extra Mul in the graph.
    return _pack(w, 0, block_size, q, scale, zp, input_scale=None if alpha == 0 else s, alpha=alpha)


def output_error(w: np.ndarray, qw: QuantizedWeight, x: Optional[np.ndarray]) -> float:
    """Relative error the quantization adds to this weight's output: ‖X(W − Ŵ)‖² / ‖XW‖² (weights only
    when there are no activations). The per-layer sensitivity proxy of the mixed-precision search."""
    w_hat = qw.dequantize()
    if x is None or w.ndim != 2 or qw.axis != 0:
        return float(np.square(w - w_hat).sum() / max(np.square(w).sum(), 1e-30))
    xs = _rows(x.astype(np.float32))
    ref = xs @ w
    return float(np.square(ref - xs @ w_hat).sum() / max(np.square(ref).sum(), 1e-30))


def pack_nibbles(codes: np.ndarray) -> bytes:
    """Row-major 4-bit codes → bytes, first element in the low nibble (ONNX INT4/UINT4 and MatMulNBits)."""
    u = (codes.astype(np.int16).ravel() & 0xF).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def theoretical_bits_per_weight(block_size: int, symmetric: bool, scale_bits: int = 32) -> float:
    """4 bits per weight + one scale per block (+ one 4-bit zero point per block when asymmetric)."""
    return 4.0 + scale_bits / block_size + (0.0 if symmetric else 4.0 / block_size)
