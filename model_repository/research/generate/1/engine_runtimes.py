"""Engine runners for the `generate` model, one per engine file, plus the largest batch one call may carry. The
repository writer picks the runtime from the deployment profile; the KV-cache engine (kv_padded.py) drives
whichever it gets.

* onnxruntime — an ONNX Runtime session in this process: CPU, or the CUDA execution provider on a GPU.
* tensorrt — a TensorRT plan (`import tensorrt`), the runtime Triton's TensorRT backend links.
* tensorrt_rtx — a TensorRT-RTX plan (`import tensorrt_rtx`), which stock Triton's TensorRT backend cannot load.

Each runner owns a `memory` (kv_memory.py: the host for ONNX Runtime on the CPU, the GPU otherwise) in which the
engine allocates the KV cache, and `run_bound(host_feeds, device_feeds, device_outputs, host_outputs)` binds those
buffers as they are (ONNX Runtime's IOBinding, TensorRT's tensor addresses): per step only the small host feeds
(token ids, mask, positions) go in and the host outputs (the logits) come out. A runner whose memory is a GPU says
so (`binds_device`) and the engine calls it that way; called as `run(feeds, output_names) -> list[np.ndarray]` a
runner takes and returns numpy arrays instead (on the CPU: read in place, nothing copied to avoid).

The TensorRT runners, and ONNX Runtime with the CUDA execution provider, are UNVERIFIED: no GPU exists where
r1deploy is developed, and deserializing a plan needs one. A runtime that is not installed fails the model's load
with one line naming the package.

Imports numpy and kv_memory (copied beside it) only at module level: copied next to the generate model's model.py.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
from kv_memory import CudaMemory, HostMemory, MissingRuntime, check, import_cudart

__all__ = ["MissingRuntime", "OrtRunner", "TensorRTRunner", "load_runner"]


# ONNX Runtime fuses an INT4 DequantizeLinear -> MatMul into MatMulNBits, which by default quantizes the
# activations to int8 as well (`session.qdq_matmulnbits_accuracy_level` 4): "fp32" keeps them FP32 — the weights-only
# model the quantize stage measured and gated — and "int8" takes the faster kernels (docs/serving.md "INT4 on ONNX
# Runtime"). Repository parameter `ort_int4_activations`.
INT4_ACCURACY_LEVEL = {"fp32": "0", "int8": "4"}


def load_runner(runtime: str, engine_file: Path, config: dict, device_id: int = 0):
    params = config.get("parameters", {})

    def param(key: str, default: str) -> str:
        return params.get(key, {}).get("string_value", default)

    if runtime == "onnxruntime":
        return OrtRunner(engine_file, int(param("intra_op_num_threads", "1")),
                         json.loads(param("ort_providers", '["CPUExecutionProvider"]')), device_id,
                         param("ort_int4_activations", "fp32")), None
    if runtime in ("tensorrt", "tensorrt_rtx"):
        runner = TensorRTRunner(runtime, engine_file, device_id)
        return runner, runner.max_batch
    raise ValueError(f"engine_runtime must be onnxruntime, tensorrt or tensorrt_rtx, not {runtime!r}")


class OrtRunner:
    """An ONNX Runtime session. With CUDAExecutionProvider the session runs on GPU `device_id` and so does the
    cache, bound by address (`binds_device`; UNVERIFIED). On the CPU the engine calls it with numpy instead: the
    session reads numpy inputs in place and writes `present` once, so binding avoids no copy there, and rebinding
    2 × layers buffers per step cost ~12% of a decode step on r1-distill-tiny (docs/serving.md "Engine runners").
    `run_bound` works on the CPU all the same (tests/test_kv_device.py drives it)."""

    def __init__(self, path: Path, threads: int, providers: list[str], device_id: int = 0,
                 int4_activations: str = "fp32"):
        import onnxruntime as ort

        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise MissingRuntime(f"ONNX Runtime here lacks {', '.join(missing)} (install onnxruntime-gpu for CUDAExecutionProvider)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", INT4_ACCURACY_LEVEL[int4_activations])
        if "CUDAExecutionProvider" in providers:
            self.memory = CudaMemory(device_id)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}) if p == "CUDAExecutionProvider" else p
                         for p in providers]
        else:
            self.memory = HostMemory()
        self.binds_device = not self.memory.is_host
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def __call__(self, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)

    def run_bound(self, host_feeds: dict, device_feeds: dict, device_outputs: dict, host_outputs: list[str]) -> list:
        """`device_*`: the memory's buffers (their shapes are the call's); `host_*`: numpy in, numpy out."""
        io = self.session.io_binding()
        for name, arr in host_feeds.items():
            io.bind_cpu_input(name, arr)
        device, device_id = self.memory.ort_device
        for name, buf in device_feeds.items():
            io.bind_input(name, device, device_id, buf.dtype, list(buf.shape), buf.ptr)
        for name in host_outputs:  # bound first: the first values of get_outputs()
            io.bind_output(name, "cpu")
        for name, buf in device_outputs.items():
            io.bind_output(name, device, device_id, buf.dtype, list(buf.shape), buf.ptr)
        self.memory.sync()  # cache copies queued on the memory's stream land before ONNX Runtime reads them
        self.session.run_with_iobinding(io)
        values = io.get_outputs()
        return [values[i].numpy() for i in range(len(host_outputs))]


def _import_trt(runtime: str):
    names = {"tensorrt": ["tensorrt"], "tensorrt_rtx": ["tensorrt_rtx", "tensorrt_rtx_bindings"]}[runtime]
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingRuntime(f"the {runtime} Python runtime is not installed in this server's image (pip install {names[0]})")


class TensorRTRunner:
    """One execution context over a deserialized plan; picks, per call, the optimization profile whose ranges
    hold every input shape (the engine stage builds `context` — prompt, empty past — and `generation` — one
    token, past ≥ 1). The cache buffers of `run_bound` are bound by address; only the host feeds are copied in
    (staged in device buffers kept here) and the host outputs out, on the memory's stream."""

    binds_device = True

    def __init__(self, runtime: str, plan: Path, device_id: int = 0):
        trt = _import_trt(runtime)
        self.cudart = import_cudart()
        self.trt = trt
        err, count = self.cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            raise MissingRuntime(f"no CUDA device is visible to this model instance (cudaGetDeviceCount: {err!s}); "
                                 f"{runtime} plans run only on a GPU")
        if device_id >= count:
            raise MissingRuntime(f"GPU {device_id} asked for, {count} visible")
        check(self.cudart.cudaSetDevice(device_id))
        self.memory = CudaMemory(device_id)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{runtime} could not deserialize {plan} (built by another TensorRT version, or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = self.memory.stream  # the cache's copies and the engine's work in one order
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
                check(self.cudart.cudaFree(ptr))
            ptr = int(check(self.cudart.cudaMalloc(max(nbytes, 1))))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _use_profile(self, shapes: dict) -> None:
        for p, prof in enumerate(self.profiles):
            if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], prof[n][0], prof[n][2], strict=True))
                   for n in self.inputs):
                if p != self.profile:
                    self.context.set_optimization_profile_async(p, self.stream)
                    self.profile = p
                return
        raise RuntimeError(f"no optimization profile of the engine holds shapes {shapes}")

    def _nptype(self, name: str):
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _stage_in(self, name: str, arr: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(arr, dtype=self._nptype(name))
        self.context.set_input_shape(name, arr.shape)
        ptr = self._buffer(name, arr.nbytes)
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(self.cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
        self.context.set_tensor_address(name, ptr)
        return arr  # kept by the caller until the stream is synchronized

    def _execute(self, host_outputs: list[str]) -> list[np.ndarray]:
        results = []
        for name in host_outputs:
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._nptype(name))
            ptr = self._buffer(name, out.nbytes)
            self.context.set_tensor_address(name, ptr)
            results.append((out, ptr))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for out, ptr in results:
            check(self.cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
        check(self.cudart.cudaStreamSynchronize(self.stream))
        return [out for out, _ in results]

    def run_bound(self, host_feeds: dict, device_feeds: dict, device_outputs: dict, host_outputs: list[str]) -> list:
        """The cache buffers (device_feeds: past, device_outputs: present) bound by address, nothing of them copied."""
        shapes = {n: tuple(a.shape) for n, a in host_feeds.items()} | {n: tuple(b.shape) for n, b in device_feeds.items()}
        self._use_profile(shapes)
        staged = [self._stage_in(name, arr) for name, arr in host_feeds.items()]
        for name, buf in list(device_feeds.items()) + list(device_outputs.items()):
            if buf.dtype != self._nptype(name):
                raise ValueError(f"{name} is {self._nptype(name)} in the engine, {buf.dtype} in the KV cache "
                                 "(kv_cache dtype in config.pbtxt must match the plan)")
        for name, buf in device_feeds.items():
            self.context.set_input_shape(name, buf.shape)
            self.context.set_tensor_address(name, buf.ptr)
        for name, buf in device_outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if shape != tuple(buf.shape):
                raise RuntimeError(f"the engine writes {name} as {shape}, the KV cache buffer is {tuple(buf.shape)}")
            self.context.set_tensor_address(name, buf.ptr)
        results = self._execute(host_outputs)
        del staged
        return results

    def __call__(self, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
        """Every input and output through the host (the plain-numpy form)."""
        self._use_profile({n: tuple(feeds[n].shape) for n in self.inputs})
        staged = [self._stage_in(name, feeds[name]) for name in self.inputs]
        results = self._execute(outputs)
        del staged
        return results
