"""Engine runners for the `generate` model: each is a `run(feeds, output_names) -> list[np.ndarray]` callable over
one engine file, plus the largest batch one call may carry. The repository writer picks the runtime from the
deployment profile; the KV-cache engine (kv_padded.py) drives whichever it gets.

* onnxruntime — an ONNX Runtime session in this process: CPU, or the CUDA execution provider on a GPU.
* tensorrt — a TensorRT plan (`import tensorrt`), the runtime Triton's TensorRT backend links.
* tensorrt_rtx — a TensorRT-RTX plan (`import tensorrt_rtx`), which stock Triton's TensorRT backend cannot load.

The TensorRT runners are UNVERIFIED: no GPU exists where r1deploy is developed, and deserializing a plan needs
one. They stage every input and output through host memory (cuda-python's runtime API), so the KV cache
round-trips through the host at every step — correct, not fast; a device-resident cache is the next step and
needs a GPU to test. A runtime that is not installed fails the model's load with one line naming the package.

Imports numpy only at module level: copied next to the generate model's model.py.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np


class MissingRuntime(RuntimeError):
    pass


def load_runner(runtime: str, engine_file: Path, config: dict, device_id: int = 0):
    params = config.get("parameters", {})

    def param(key: str, default: str) -> str:
        return params.get(key, {}).get("string_value", default)

    if runtime == "onnxruntime":
        return _onnxruntime(engine_file, int(param("intra_op_num_threads", "1")),
                            json.loads(param("ort_providers", '["CPUExecutionProvider"]'))), None
    if runtime in ("tensorrt", "tensorrt_rtx"):
        runner = TensorRTRunner(runtime, engine_file, device_id)
        return runner, runner.max_batch
    raise ValueError(f"engine_runtime must be onnxruntime, tensorrt or tensorrt_rtx, not {runtime!r}")


def _onnxruntime(path: Path, threads: int, providers: list[str]):
    import onnxruntime as ort

    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise MissingRuntime(f"ONNX Runtime here lacks {', '.join(missing)} (install onnxruntime-gpu for CUDAExecutionProvider)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=providers)
    return lambda feeds, outputs: session.run(outputs, feeds)


def _import_trt(runtime: str):
    names = {"tensorrt": ["tensorrt"], "tensorrt_rtx": ["tensorrt_rtx", "tensorrt_rtx_bindings"]}[runtime]
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingRuntime(f"the {runtime} Python runtime is not installed in this server's image (pip install {names[0]})")


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise MissingRuntime("cuda-python is not installed in this server's image (pip install cuda-python)") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {int(err)}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTRunner:
    """One execution context over a deserialized plan; picks, per call, the optimization profile whose ranges
    hold every input shape (the engine stage builds `context` — prompt, empty past — and `generation` — one
    token, past ≥ 1)."""

    def __init__(self, runtime: str, plan: Path, device_id: int = 0):
        trt = _import_trt(runtime)
        self.cudart = _import_cudart()
        self.trt = trt
        err, count = self.cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            raise MissingRuntime(f"no CUDA device is visible to this model instance (cudaGetDeviceCount: {err!s}); "
                                 f"{runtime} plans run only on a GPU")
        if device_id >= count:
            raise MissingRuntime(f"GPU {device_id} asked for, {count} visible")
        _check(self.cudart.cudaSetDevice(device_id))
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{runtime} could not deserialize {plan} (built by another TensorRT version, or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.profiles = [
            {n: self.engine.get_tensor_profile_shape(n, p) for n in self.inputs}
            for p in range(self.engine.num_optimization_profiles)
        ]
        self.max_batch = max(int(prof["input_ids"][2][0]) for prof in self.profiles) if self.profiles else None
        self.buffers: dict[str, tuple[int, int]] = {}  # name → (device pointer, bytes)
        self.profile = -1

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(max(nbytes, 1)))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _pick_profile(self, feeds: dict) -> int:
        for p, prof in enumerate(self.profiles):
            if all(all(lo <= d <= hi for d, lo, hi in zip(feeds[n].shape, prof[n][0], prof[n][2], strict=True))
                   for n in self.inputs):
                return p
        raise RuntimeError(f"no optimization profile of the engine holds shapes {({n: feeds[n].shape for n in self.inputs})}")

    def __call__(self, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
        cudart, trt = self.cudart, self.trt
        p = self._pick_profile(feeds)
        if p != self.profile:
            self.context.set_optimization_profile_async(p, self.stream)
            self.profile = p
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            feeds[name] = arr
            self.context.set_input_shape(name, arr.shape)
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        results = []
        for name in outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            ptr = self._buffer(name, out.nbytes)
            self.context.set_tensor_address(name, ptr)
            results.append((name, out, ptr))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        for _, out, ptr in results:
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return [out for _, out, _ in results]
