"""`engine.json`: what an engine is and where it may run, written beside `model.plan` by the engine stage.

The API other stages use (the Triton repository places engines with it)::

    from exporter.engine import EngineMetadata, ensure_compatible

    meta = EngineMetadata.load(engine_dir / "engine.json")   # BadInput (one line) if missing or malformed
    ensure_compatible(meta, profile)                          # BadInput (one line) if it cannot run there
    ensure_compatible(meta, profile, runtime_version="10.13.0")  # also pin the server's runtime version

An engine runs only where it was built for:

* the same runtime (a TensorRT-RTX plan does not load in full TensorRT, nor the reverse);
* the same runtime version, compared on major.minor.patch, when the caller knows the server's version;
* a GPU whose compute capability is in `compute_capabilities` — or, for a full-TensorRT engine built with
  ``hardware_compatibility == "ampere_plus"``, any compute capability ≥ 8.0. (A hardware-compatible
  TensorRT-RTX engine simply lists every Ampere-or-later compute capability it was built for.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BadInput
from ..core.profiles import DeploymentProfile, Runtime
from ..core.typed import from_data, to_data
from .shapes import ShapeProfile

ENGINE_FILE = "model.plan"
METADATA_FILE = "engine.json"
SCHEMA_VERSION = 1
# The graphs an engine can be built from: `serving` (exporter/engine/serving_graph.py's rewrite, the default for
# decoders) or `generic` (the ONNX variant as the quantize stage wrote it: logits at every position, its cache IO).
ENGINE_GRAPHS = ("serving", "generic")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # float32, float16, int64, ...
    shape: list[int]  # -1 for a dynamic axis


@dataclass(frozen=True)
class EngineGraph:
    """The graph an engine was built from (exporter/engine/serving_graph.py). The defaults describe an engine.json
    written before this was recorded: the generic graph."""

    form: str = "generic"  # serving (rewritten for serving; decoders) | generic (the ONNX variant as it is)
    logits: str = "all"  # the positions `logits` holds: last | all ("" for an encoder)
    kv_dtype: str = ""  # the KV-cache IO element type: fp16 | fp32 ("" for an encoder)
    logits_gather: str = ""  # where the serving graph takes the last position: "lm_head input <tensor>" | "output"
    version: int = 0  # the serving rewrite's version (serving_graph.SERVING_GRAPH_VERSION); 0 for generic


@dataclass(frozen=True)
class TimingCacheInfo:
    supported: bool
    path: str = ""  # the cache file used (empty when the runtime has none)
    loaded_bytes: int = 0  # 0: cold (no cache yet)
    saved_bytes: int = 0
    note: str = ""


@dataclass(frozen=True)
class EngineMetadata:
    model: str
    model_kind: str  # decoder | encoder
    deployment_profile: str
    runtime: Runtime
    runtime_version: str
    gpu_product: str
    compute_capabilities: list[str]  # "8.9", ...: what the engine was built for
    hardware_compatible: bool
    hardware_compatibility: str  # none | ampere_plus
    precision: str  # fp32 | fp16 | int4 (from the ONNX variant; the network is strongly typed)
    onnx_variant: str
    onnx_sha256: str
    engine_file: str
    engine_sha256: str
    engine_bytes: int
    strongly_typed: bool
    max_batch_size: int
    shape_profiles: list[ShapeProfile]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    optimization_level: int
    workspace_bytes: int
    timing_cache: TimingCacheInfo
    build_seconds: float
    reproduce: list[str]  # the equivalent trtexec / tensorrt_rtx command line
    graph: EngineGraph = field(default_factory=EngineGraph)
    # the step before `reproduce` for a serving graph: write it beside the ONNX (`--onnx` of `reproduce` names it)
    reproduce_graph: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def shape_profile(self, name: str) -> ShapeProfile:
        for p in self.shape_profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(to_data(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> EngineMetadata:
        path = Path(path)
        if path.is_dir():
            path = path / METADATA_FILE
        if not path.is_file():
            raise BadInput(f"engine metadata not found: {path} (build the engine with `r1deploy build-engine`)")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise BadInput(f"invalid engine metadata {path}: {exc}") from None
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise BadInput(f"{path}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}; rebuild the engine")
        return from_data(cls, data, str(path))


def _version3(v: str) -> tuple[str, ...]:
    return tuple(v.split(".")[:3])


def ensure_compatible(meta: EngineMetadata, profile: DeploymentProfile, runtime_version: str | None = None) -> None:
    """Raise BadInput (one line) unless the engine `meta` describes can run on `profile`'s GPU and runtime."""
    what = f"engine for {meta.model!r} (built for profile {meta.deployment_profile!r})"
    runtime = Runtime(profile.runtime)
    if meta.runtime is not runtime:
        raise BadInput(
            f"{what} is a {meta.runtime.value} engine but deployment profile {profile.name!r} serves with "
            f"{runtime.value}; rebuild with `r1deploy build-engine --profile {profile.name}`"
        )
    if runtime_version and _version3(runtime_version) != _version3(meta.runtime_version):
        raise BadInput(
            f"{what} was built with {meta.runtime.value} {meta.runtime_version} but the server runs "
            f"{runtime_version}; rebuild the engine with that version"
        )
    cc = profile.gpu.compute_capability
    if cc in meta.compute_capabilities:
        return
    if meta.hardware_compatibility == "ampere_plus" and meta.runtime is Runtime.TENSORRT and float(cc) >= 8.0:
        return
    built = ", ".join(meta.compute_capabilities) or "?"
    raise BadInput(
        f"{what} targets compute capability {built} ({meta.gpu_product}) but deployment profile {profile.name!r} "
        f"runs on {profile.gpu.product} (compute capability {cc}) and the engine is not hardware-compatible with it; "
        f"rebuild with `r1deploy build-engine --profile {profile.name}`"
    )
