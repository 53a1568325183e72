"""One small adapter over the two API-compatible TensorRT Python modules.

* full TensorRT (`import tensorrt`, extra ``r1deploy[gpu]``): builds for the GPU it runs on; portability through
  a hardware-compatibility level (Ampere+); a timing cache speeds up rebuilds.
* TensorRT-RTX (`import tensorrt_rtx_bindings`, extra ``r1deploy[rtx]``): builds ahead of time on a machine
  without a GPU for the compute capabilities it is told (SM75…SM121, no SM90); portability through a list of
  compute capabilities; no hardware-compatibility level, and timing-cache calls are no-ops (checked at build time,
  not assumed).

Everything that differs between the two lives in `RuntimeSpec` and the few `TensorRTRuntime` methods below; the
builder has one code path. Neither module is imported until a build needs it.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BadInput, BrokenDependency, MissingDependency, StageFailed
from ..core.profiles import Runtime, sm_name
from ..core.ui import log


@dataclass(frozen=True)
class RuntimeSpec:
    runtime: Runtime
    display: str
    modules: tuple[str, ...]  # tried in order
    extra: str  # pip extra of r1deploy that installs it
    cli_tool: str  # the trtexec-style command-line tool shipped with the SDK
    aot_compute_capability: bool  # builds for named compute capabilities without that GPU present
    hardware_compatibility_level: bool  # IBuilderConfig.hardware_compatibility_level is honoured


SPECS = {
    Runtime.TENSORRT: RuntimeSpec(
        Runtime.TENSORRT, "TensorRT", ("tensorrt",), "gpu", "trtexec",
        aot_compute_capability=False, hardware_compatibility_level=True,
    ),
    Runtime.TENSORRT_RTX: RuntimeSpec(
        Runtime.TENSORRT_RTX, "TensorRT-RTX", ("tensorrt_rtx_bindings", "tensorrt_rtx"), "rtx", "tensorrt_rtx",
        aot_compute_capability=True, hardware_compatibility_level=False,
    ),
}

# Compute capabilities an "Ampere and later" hardware-compatible engine runs on.
AMPERE_PLUS = "ampere_plus"

_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8", "INT4": "int4", "FP4": "float4",
}


class TensorRTRuntime:
    def __init__(self, spec: RuntimeSpec, module):
        self.spec = spec
        self.trt = module
        self.version: str = str(getattr(module, "__version__", "unknown"))

    @property
    def runtime(self) -> Runtime:
        return self.spec.runtime

    # -- network ------------------------------------------------------------------------------------------
    def logger(self, verbose: bool = False):
        """A logger that keeps the errors (for one-line StageFailed messages) and shows the rest only with -v."""
        trt = self.trt

        class CapturingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg).strip())
                if verbose and int(severity) <= int(trt.ILogger.Severity.INFO):
                    log.warning("[%s] %s", self_name, msg)

        self_name = self.spec.display
        return CapturingLogger()

    def parse_onnx(self, onnx_path: Path, logger, model_bytes: bytes | None = None):
        """Builder, strongly typed network and parser for `onnx_path` — or for `model_bytes`, a rewritten graph of
        it (exporter.engine.serving_graph), whose external weights resolve against `onnx_path`'s directory.
        StageFailed names the failing node."""
        trt = self.trt
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        ok = (parser.parse_from_file(str(onnx_path)) if model_bytes is None
              else parser.parse(model_bytes, str(onnx_path)))
        if not ok:
            raise StageFailed(parser_error_line(parser, onnx_path, self.spec.display))
        return builder, network, parser

    def dtype_name(self, dtype) -> str:
        name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        return _DTYPES.get(name, name.lower())

    # -- targets ------------------------------------------------------------------------------------------
    def supported_compute_capabilities(self) -> list[str]:
        """"8.9"-style compute capabilities this runtime can build for ahead of time (RTX only)."""
        if not self.spec.aot_compute_capability:
            return []
        out = []
        for name in self.trt.ComputeCapability.__members__:
            if name.startswith("SM"):
                digits = name[2:]
                out.append(f"{digits[:-1]}.{digits[-1]}")
        return out

    def target_compute_capabilities(self, compute_capability: str, hardware_compatible: bool) -> list[str]:
        """What the engine is built for. RTX: the profile's GPU (or every Ampere+ one it supports when
        hardware-compatible). Full TensorRT: the GPU of the build machine, which must be the profile's."""
        if not self.spec.aot_compute_capability:
            return [compute_capability]
        supported = self.supported_compute_capabilities()
        if compute_capability not in supported:
            raise BadInput(
                f"{self.spec.display} {self.version} cannot build for compute capability {compute_capability} "
                f"({sm_name(compute_capability)}); it supports {', '.join(supported)} — use --runtime tensorrt"
            )
        if hardware_compatible:
            return [cc for cc in supported if float(cc) >= 8.0]
        return [compute_capability]

    def check_build_gpu(self, compute_capability: str) -> str | None:
        """Full TensorRT builds for the GPU it runs on: refuse a build machine whose GPU is not the deployment
        profile's. Returns a warning when the local GPU cannot be queried (no CUDA-enabled torch)."""
        if self.spec.aot_compute_capability:
            return None
        try:
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device visible to torch: could not check that the build GPU is the profile's"
            local = "{}.{}".format(*torch.cuda.get_device_capability())
        except (ImportError, RuntimeError, AssertionError):
            return "could not query the build GPU: check it matches the deployment profile's"
        if local != compute_capability:
            raise BadInput(
                f"{self.spec.display} builds for the GPU it runs on (compute capability {local}) but the deployment "
                f"profile targets {compute_capability}: build on that GPU, or pass --hardware-compatible"
            )
        return None

    def configure_targets(self, config, compute_capabilities: list[str], hardware_compatible: bool) -> str:
        """Set the build targets on a builder config; returns the hardware-compatibility label recorded."""
        trt = self.trt
        if self.spec.aot_compute_capability:
            config.num_compute_capabilities = len(compute_capabilities)
            for i, cc in enumerate(compute_capabilities):
                config.set_compute_capability(getattr(trt.ComputeCapability, sm_name(cc)), i)
            return AMPERE_PLUS if hardware_compatible else "none"
        if hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
            return AMPERE_PLUS
        return "none"

    # -- timing cache -------------------------------------------------------------------------------------
    def timing_cache_supported(self, config) -> bool:
        """Probe instead of assuming: TensorRT-RTX ≥ 1.2 accepts the calls but warns they are no-ops."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cache = config.create_timing_cache(b"")
                config.get_timing_cache()  # TensorRT-RTX 1.7 warns here, not in create_timing_cache
            except (AttributeError, TypeError, RuntimeError):
                return False
        if any("no-op" in str(w.message) for w in caught):
            return False
        return cache is not None

    def load_timing_cache(self, config, path: Path) -> int:
        """Attach the cache at `path` (empty if absent) to `config`; returns the bytes loaded."""
        data = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not match this %s build; starting a new one", path, self.spec.display)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
            return 0
        return len(data)

    def save_timing_cache(self, config, path: Path) -> int:
        data = bytes(memoryview(config.get_timing_cache().serialize()))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return len(data)


def parser_error_line(parser, onnx_path: Path, display: str) -> str:
    """The parser's first error as one line: node name, op type, reason (+ how many more)."""
    n = parser.num_errors
    if n == 0:
        return f"{display} ONNX parser rejected {onnx_path} without an error message"
    err = parser.get_error(0)
    desc = " ".join(str(err.desc()).split())
    node_name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where = f"node {node_name!r} (op {op})" if node_name or op else f"node #{err.node()}" if err.node() >= 0 else "graph"
    more = f" (+{n - 1} more error{'s' if n > 2 else ''})" if n > 1 else ""
    return f"{display} cannot parse {onnx_path.name}: {where}: {err.code().name}: {desc}{more}"


def _absent(exc: BaseException, module: str) -> bool:
    """True when `module` itself (or its package) is not installed — not when it is there but fails to load
    (a missing CUDA library, a dependency of its own that is missing)."""
    return isinstance(exc, ModuleNotFoundError) and exc.name is not None and module.split(".")[0] == exc.name.split(".")[0]


def load_runtime(runtime: Runtime) -> TensorRTRuntime:
    """Import the runtime's module. Not installed: MissingDependency naming the extra to install (a skip).
    Installed but broken: BrokenDependency (a failure) quoting the import error."""
    spec = SPECS[Runtime(runtime)]
    broken: tuple[str, BaseException] | None = None
    for name in spec.modules:
        try:
            return TensorRTRuntime(spec, importlib.import_module(name))
        except Exception as exc:  # an extension module can fail to load with any exception type
            if not _absent(exc, name) and broken is None:
                broken = (name, exc)
    if broken is not None:
        name, exc = broken
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BrokenDependency(
            f"{spec.display} is installed but cannot be loaded (import {name}: {type(exc).__name__}: {detail}); "
            f"fix or reinstall it: pip install --force-reinstall 'r1deploy[{spec.extra}]'"
        )
    raise MissingDependency(
        f"{spec.display} is not installed (no module {spec.modules[0]}); install it with: pip install 'r1deploy[{spec.extra}]'"
    )
