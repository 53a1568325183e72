"""Where the KV cache lives, and the one primitive every move of it goes through.

A `Memory` allocates zeroed tensors where the engine runs and copies 2-D blocks: `height` lines of `width` bytes,
each line `pitch` bytes after the previous one (cudaMemcpy2D's model). A cache tensor is [rows, heads, length, dim]
and a row's heads follow each other, so positions [p0, p1) of rows [r0, r1) are one such block (`positions`): a
fork, a cached prompt written into a row, a block read back for the prefix cache, a pad-left merge and a trim are
each one 2-D copy per tensor (or per row). The engines (kv_shared.py, kv_padded.py) compute the blocks; the two
backends only differ in how they copy them:

* `HostMemory` ("cpu"): numpy arrays (`HostArray`, a numpy array with a `.ptr`), blocks copied through numpy views
  built from the same pointers and pitches. Every copy is counted by kind (`copies`, `copied_bytes`) and checked:
  a "device" side must lie inside an allocation of this memory and a "host" side outside, so the tests on the CPU
  exercise the offsets and the directions the CUDA backend relies on.
* `CudaMemory` ("cuda:N"): device allocations through cuda-python's runtime API (cudaMallocAsync / cudaMemsetAsync
  / cudaMemcpy2DAsync / cudaMemset2DAsync on one stream, cudaFreeAsync when a buffer is dropped). UNVERIFIED: no GPU
  exists where r1deploy is developed; here it can only fail, with one line (`MissingRuntime`).

Imports numpy (and cuda-python, lazily) only: copied next to the generate model's model.py.
"""

from __future__ import annotations

import ctypes
import weakref
from collections import Counter
from typing import NamedTuple

import numpy as np

KINDS = ("d2d", "h2d", "d2h")  # which side of a copy is device memory: d2d both, h2d the destination, d2h the source


class MissingRuntime(RuntimeError):
    """What the configuration asks for is not installed here, or has no device: the message is one line."""


class Block(NamedTuple):
    """`height` lines of `width` bytes, line i at `ptr + i * pitch`."""

    ptr: int
    pitch: int
    width: int
    height: int


def address(t) -> int:
    """The first byte of a buffer (HostArray, DeviceArray) or a plain numpy array."""
    ptr = getattr(t, "ptr", None)
    return t.ctypes.data if ptr is None else ptr


def positions(t, rows: tuple[int, int], pos: tuple[int, int]) -> Block:
    """Positions [pos) of rows [rows) of a C-contiguous [rows, heads, length, dim] tensor: one line per (row, head)."""
    _, heads, length, dim = t.shape
    item = dim * np.dtype(t.dtype).itemsize
    (r0, r1), (p0, p1) = rows, pos
    return Block(address(t) + ((r0 * heads) * length + p0) * item, length * item, (p1 - p0) * item, (r1 - r0) * heads)


def memory_for(device: str) -> HostMemory | CudaMemory:
    """`cpu`, `cuda` or `cuda:N`."""
    if device == "cpu":
        return HostMemory()
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index.isdigit() or index == ""):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    return CudaMemory(int(index or 0))


class HostArray(np.ndarray):
    """A numpy array that is a HostMemory allocation (or a view of one): `.ptr` and `.rows()` as a DeviceArray."""

    @property
    def ptr(self) -> int:
        return self.ctypes.data

    def rows(self, lo: int, hi: int) -> HostArray:
        return self[lo:hi]


class _Memory:
    """What both backends do the same way on top of their own `copy2d`."""

    def download(self, t) -> np.ndarray:
        """A host copy of a whole [rows, heads, length, dim] tensor."""
        out = np.empty(t.shape, t.dtype)
        rows = (0, t.shape[0])
        self.copy2d(positions(out, rows, (0, t.shape[2])), positions(t, rows, (0, t.shape[2])), "d2h")
        return out


class HostMemory(_Memory):
    device = "cpu"
    ort_device = ("cpu", 0)  # ONNX Runtime IOBinding's device type and id
    is_host = True

    def __init__(self):
        self._live = weakref.WeakValueDictionary()  # id → each live allocation (a step's outputs are adopted: cheap)
        self.copies: Counter = Counter()  # kind → 2-D copies made (and "zero" → blocks zeroed)
        self.copied_bytes: Counter = Counter()

    def alloc(self, shape, dtype, zero: bool = True) -> HostArray:
        make = np.zeros if zero else np.empty
        return self.adopt(make(tuple(shape), dtype))

    def adopt(self, array: np.ndarray) -> HostArray:
        """A C-contiguous numpy array (a runner's output) as an allocation of this memory, without a copy."""
        if not array.flags.c_contiguous:
            raise ValueError("adopt: the array must be C-contiguous")
        out = array.view(HostArray)
        self._live[id(out)] = out
        return out

    def copy2d(self, dst: Block, src: Block, kind: str) -> None:
        if dst.width != src.width or dst.height != src.height:
            raise ValueError(f"copy2d: {dst.height} lines of {dst.width} bytes from {src.height} of {src.width}")
        if kind not in KINDS:
            raise ValueError(f"copy2d: kind must be one of {KINDS}, not {kind!r}")
        self._check(dst, kind != "d2h", kind)
        self._check(src, kind != "h2d", kind)
        self.copies[kind] += 1
        self.copied_bytes[kind] += dst.width * dst.height
        if dst.width and dst.height:
            _lines(dst)[...] = _lines(src)

    def zero(self, dst: Block) -> None:
        self._check(dst, True, "zero")
        self.copies["zero"] += 1
        if dst.width and dst.height:
            _lines(dst)[...] = 0

    def sync(self) -> None:
        pass

    def _check(self, b: Block, on_device: bool, kind: str) -> None:
        if not (b.width and b.height):
            return
        start, end = b.ptr, b.ptr + (b.height - 1) * b.pitch + b.width
        inside = any(a.ptr <= start and end <= a.ptr + max(a.nbytes, 1) for a in list(self._live.values()))
        if inside != on_device:
            side = "device" if on_device else "host"
            raise ValueError(f"copy2d ({kind}): a {side} block is " + ("not " if on_device else "") + "in device memory")


def _lines(b: Block) -> np.ndarray:
    raw = np.frombuffer((ctypes.c_char * ((b.height - 1) * b.pitch + b.width)).from_address(b.ptr), np.uint8)
    return np.lib.stride_tricks.as_strided(raw, (b.height, b.width), (b.pitch, 1))


# -- CUDA (UNVERIFIED: no GPU where this is developed) ------------------------------------------------------------

def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise MissingRuntime("cuda-python is not installed in this server's image (pip install cuda-python)") from None
    return cudart


def check(result):
    """A cuda-python call's (error, values...) → the values; an error raises."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {int(err)} ({err!s})")
    return rest[0] if len(rest) == 1 else (rest or None)


class DeviceArray:
    """A CudaMemory allocation (or a view of one): a device pointer with a shape and a dtype."""

    __slots__ = ("ptr", "shape", "dtype", "owner", "__weakref__")

    def __init__(self, ptr: int, shape: tuple, dtype, owner=None):
        self.ptr, self.shape, self.dtype, self.owner = ptr, tuple(shape), np.dtype(dtype), owner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, lo: int, hi: int) -> DeviceArray:
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return DeviceArray(self.ptr + lo * row, (hi - lo,) + self.shape[1:], self.dtype, self if self.owner is None else self.owner)


class CudaMemory(_Memory):
    """Allocations and copies on one stream of GPU `device_id`. Copies are asynchronous: `sync()` before another
    stream (ONNX Runtime's) reads what they wrote; a TensorRT runner executes on `stream` itself."""

    is_host = False

    def __init__(self, device_id: int = 0):
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            raise MissingRuntime(f"no CUDA device is visible for the KV cache on cuda:{device_id} "
                                 f"(cudaGetDeviceCount: {getattr(err, 'name', err)})")
        if device_id >= count:
            raise MissingRuntime(f"GPU {device_id} asked for, {count} visible")
        self.cudart, self.device_id = cudart, device_id
        self.device, self.ort_device = f"cuda:{device_id}", ("cuda", device_id)
        check(cudart.cudaSetDevice(device_id))
        self.stream = check(cudart.cudaStreamCreate())
        kind = cudart.cudaMemcpyKind
        self._kinds = {"d2d": kind.cudaMemcpyDeviceToDevice, "h2d": kind.cudaMemcpyHostToDevice,
                       "d2h": kind.cudaMemcpyDeviceToHost}
        self.copies: Counter = Counter()
        self.copied_bytes: Counter = Counter()
        self._pending = False  # work queued on `stream` since the last sync

    def alloc(self, shape, dtype, zero: bool = True) -> DeviceArray:
        self._pending = True
        out = DeviceArray(0, shape, dtype)
        out.ptr = int(check(self.cudart.cudaMallocAsync(max(out.nbytes, 1), self.stream)))
        if zero and out.nbytes:
            check(self.cudart.cudaMemsetAsync(out.ptr, 0, out.nbytes, self.stream))
        finalizer = weakref.finalize(out, self.cudart.cudaFreeAsync, out.ptr, self.stream)
        finalizer.atexit = False  # the CUDA context goes with the process
        return out

    def copy2d(self, dst: Block, src: Block, kind: str) -> None:
        if dst.width != src.width or dst.height != src.height:
            raise ValueError(f"copy2d: {dst.height} lines of {dst.width} bytes from {src.height} of {src.width}")
        self.copies[kind] += 1
        self.copied_bytes[kind] += dst.width * dst.height
        if dst.width and dst.height:
            self._pending = True
            check(self.cudart.cudaMemcpy2DAsync(dst.ptr, dst.pitch, src.ptr, src.pitch, dst.width, dst.height,
                                                self._kinds[kind], self.stream))
            if kind == "d2h":
                self.sync()  # the host reads it next

    def zero(self, dst: Block) -> None:
        self.copies["zero"] += 1
        if dst.width and dst.height:
            self._pending = True
            check(self.cudart.cudaMemset2DAsync(dst.ptr, dst.pitch, 0, dst.width, dst.height, self.stream))

    def sync(self) -> None:
        if self._pending:
            check(self.cudart.cudaStreamSynchronize(self.stream))
            self._pending = False
