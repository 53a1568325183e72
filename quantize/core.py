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

The searches and the quantizer run in torch (CPU, multi-threaded, in-place on one buffer): numpy allocated a
temporary per elementwise step and its BLAS ran the [T, K] x [K, N] products ~6x slower than torch's here, which
made AWQ at R1-Distill-Qwen-1.5B's shape ~70 s per layer (docs/benchmarks.md). The quantizer gives the same codes
and scales as the numpy one it replaced (division, round-half-even and max are exact IEEE operations in both);
only the searches' error sums are reduced in a different order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

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
    wb = _blocks(to_tensor(wc), block_size)
    clip_t = clip if isinstance(clip, float) else to_tensor(np.asarray(clip, dtype=np.float32))
    rng = _ranges(wb, symmetric)
    scale, zp = _scales(rng, clip_t, symmetric)
    q = torch.div(wb, scale[:, None, :]).round_()
    if zp is None:
        q.clamp_(-8, 7)
    else:
        q.add_(zp[:, None, :]).clamp_(0, 15)
    codes = q.reshape(wc.shape).to(torch.int8).numpy()
    return codes, scale.numpy(), None if zp is None else zp.to(torch.uint8).numpy()


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """float32 torch view of a numpy array (a copy only when it is not already contiguous float32)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    with warnings.catch_warnings():
        # Weights read from ONNX / safetensors buffers are read-only, and torch warns on every such view. Nothing
        # here writes to its inputs (every in-place op runs on a buffer of its own), so the view is safe and
        # spares a copy of the weight.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)



def _ranges(wb: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Per (block, column) range of [n_blocks, block, M]: (absmax,) or (max ∨ 0, min ∧ 0). Independent of the
    clip ratio, so the clip search computes it once."""
    if symmetric:
        return (wb.abs().amax(dim=1),)
    return wb.amax(dim=1).clamp_(min=0.0), wb.amin(dim=1).clamp_(max=0.0)


def _scales(rng: tuple[torch.Tensor, ...], clip, symmetric: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scales (and zero points, as float) of blocks with range `rng` shrunk by `clip` (float or [n_blocks, M])."""
    if symmetric:
        amax = rng[0] * clip
        return torch.where(amax > 0, amax / 7.0, 1.0), None
    wmax, wmin = rng[0] * clip, rng[1] * clip
    span = wmax - wmin
    scale = torch.where(span > 0, span / 15.0, 1.0)
    return scale, torch.div(-wmin, scale).round_().clamp_(0, 15)


def _qdq_error(wb: torch.Tensor, scale: torch.Tensor, zp: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(wb)) − wb into `out` ([n_blocks, block, M]), in place: one buffer, no temporaries."""
    s3 = scale[:, None, :]
    torch.div(wb, s3, out=out).round_()
    if zp is None:
        out.clamp_(-8, 7)
    else:
        z3 = zp[:, None, :]
        out.add_(z3).clamp_(0, 15).sub_(z3)
    return out.mul_(s3).sub_(wb)


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


def _block_grams(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[T, K] activations → [n_blocks, block_size, block_size] Gram matrix of each block of input channels."""
    t, k = x.shape
    xb = x.reshape(t, k // block_size, block_size).transpose(0, 1)  # [n_blocks, T, block]
    return torch.bmm(xb.transpose(1, 2), xb)


def _search_clip(wc, x, block_size: int, symmetric: bool) -> np.ndarray:
    """Best range-shrink ratio per (block, column): minimises d·G·d per block, d the quantization error of
    that block's weights and G its activation Gram matrix (identity without activations)."""
    wb = _blocks(wc if isinstance(wc, torch.Tensor) else to_tensor(wc), block_size)
    grams = None if x is None else _block_grams(x if isinstance(x, torch.Tensor) else to_tensor(x), block_size)
    rng = _ranges(wb, symmetric)
    d, gd = torch.empty_like(wb), None if grams is None else torch.empty_like(wb)
    best_err: Optional[torch.Tensor] = None
    best = torch.ones(wb.shape[0], wb.shape[2])
    for ratio in CLIP_GRID:
        _qdq_error(wb, *_scales(rng, ratio, symmetric), out=d)
        if gd is None:
            err = d.square().sum(dim=1)
        else:
            err = torch.bmm(grams, d, out=gd).mul_(d).sum(dim=1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.masked_fill_(better, ratio)
    return best.numpy()


def _rows(x: np.ndarray, seed: int = 0) -> np.ndarray:
    if x.shape[0] <= MAX_CALIBRATION_ROWS:
        return x
    idx = np.random.default_rng(seed).choice(x.shape[0], MAX_CALIBRATION_ROWS, replace=False)
    return x[np.sort(idx)]


def quantize_awq(w: np.ndarray, x: np.ndarray, block_size: int, symmetric: bool) -> QuantizedWeight:
    """AWQ for a MatMul weight `w` [K, N] (reduction axis 0) with calibration activations `x` [T, K]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    act_mean = np.abs(x).mean(axis=0) + 1e-8
    wt, xs = to_tensor(w), to_tensor(_rows(x))
    # ‖X·W − X·Ŵ‖² with Ŵ = dq(q(W·s))/s equals ‖(X/s)·(W·s − dq(q(W·s)))‖²: the error is measured in the scaled
    # domain, so each grid point costs one quantize/dequantize into a reused buffer and one product.
    ws, d = torch.empty_like(wt), torch.empty_like(wt)
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in ALPHA_GRID:
        s = act_mean**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        st = torch.from_numpy(s)
        wb = _blocks(torch.mul(wt, st[:, None], out=ws), block_size)
        _qdq_error(wb, *_scales(_ranges(wb, symmetric), 1.0, symmetric), out=_blocks(d, block_size))
        err = float(torch.mm(xs / st, d).square_().sum(dtype=torch.float64))
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    _, alpha, s = best
    st = torch.from_numpy(s)
    torch.mul(wt, st[:, None], out=ws)
    del d
    clip = _search_clip(ws, xs / st, block_size, symmetric)
    q, scale, zp = _quantize_canonical(ws.numpy(), block_size, symmetric, clip)
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
