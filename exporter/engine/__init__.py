"""Engine stage: ONNX (the variant the quantize stage wrote) → TensorRT or TensorRT-RTX engine.

* `builder`  — `EngineConfig` (every build option), `plan_build`, `build_engine(cfg) -> EngineResult`
* `serving_graph` — the decoder graph TensorRT is given: logits at the last position, KV cache IO in the compute dtype
* `shapes`   — TensorRT *shape profiles* (min/opt/max) derived from a *deployment profile*
* `runtimes` — the lazy adapter over `tensorrt` / `tensorrt_rtx_bindings`
* `metadata` — `engine.json` (`EngineMetadata.load`) and the portability guard `ensure_compatible`
* `trtexec`  — the equivalent trtexec / tensorrt_rtx command line

Nothing here imports TensorRT at import time.
"""

from .builder import BuildPlan, EngineConfig, EngineResult, build_engine, plan_build, trtexec_command
from .metadata import ENGINE_FILE, METADATA_FILE, EngineMetadata, ensure_compatible
from .shapes import ShapeProfile, ShapeRange

__all__ = [
    "ENGINE_FILE",
    "METADATA_FILE",
    "BuildPlan",
    "EngineConfig",
    "EngineMetadata",
    "EngineResult",
    "ShapeProfile",
    "ShapeRange",
    "build_engine",
    "ensure_compatible",
    "plan_build",
    "trtexec_command",
]
