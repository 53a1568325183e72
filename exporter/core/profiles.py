"""Deployment profiles — production, research, edge — declared once as data (`data/profiles.yaml`) and read by
every stage. A *deployment profile* says where and how a model is served; it is not a TensorRT *shape profile*
(min/opt/max dimensions), which `exporter.engine` derives from it."""

from __future__ import annotations

import copy
import enum
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .artifacts import check_name
from .errors import BadInput
from .typed import from_data, read_yaml_mapping


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT4 = "int4"

    @property
    def engine_kv_dtype(self) -> str:
        """The KV-cache IO element type of r1deploy's TensorRT engines (exporter/engine/serving_graph.py): the compute
        dtype's storage — FP16 for fp16, and for int4 (FP32 compute of weight-only INT4, the cache stored as FP16);
        FP32 for fp32."""
        return "fp32" if self is Precision.FP32 else "fp16"


class Runtime(str, enum.Enum):
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"


class ServingVariant(str, enum.Enum):
    """Which engine model the Triton repository serves (the generate/ensemble models call it by name)."""

    TENSORRT_PLAN = "tensorrt_plan"  # Triton's TensorRT backend (GPU)
    ONNXRUNTIME = "onnxruntime_onnx"  # Triton's ONNX Runtime backend (GPU with the TensorRT EP, or CPU)
    PYTHON_ORT = "python_ort"  # python backend running ONNX Runtime (servers without the ORT backend)


def sm_name(compute_capability: str) -> str:
    """"8.9" → "SM89", the name TensorRT-RTX's ComputeCapability enum uses."""
    major, minor = compute_capability.split(".")
    return f"SM{major}{minor}"


def normalize_cc(value: str) -> str:
    """"8.0", "80", "SM80", "sm_80" → "8.0" (how nvidia-smi, TensorRT and people write a compute capability)."""
    digits = "".join(ch for ch in str(value) if ch.isdigit() or ch == ".")
    if "." in digits:
        return digits
    return f"{digits[:-1]}.{digits[-1]}" if len(digits) >= 2 else digits


@dataclass(frozen=True)
class GpuSpec:
    product: str  # the `nvidia.com/gpu.product` label that NVIDIA GPU feature discovery sets
    compute_capability: str  # "8.0", "8.9"
    memory_gib: int
    interconnect: str = "pcie"  # "nvlink" | "pcie"
    memory_bandwidth_gb_s: Optional[float] = None  # peak memory bandwidth (data sheet): `r1deploy plan`'s decode bound

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{1,2}\.\d", self.compute_capability):
            raise ValueError(f"compute_capability must look like \"8.9\" (major.minor), got {self.compute_capability!r}")
        if self.memory_gib < 1:
            raise ValueError(f"memory_gib must be ≥ 1, got {self.memory_gib}")
        if self.interconnect not in ("nvlink", "pcie"):
            raise ValueError(f"interconnect must be nvlink or pcie, got {self.interconnect!r}")

    @property
    def sm(self) -> str:
        return sm_name(self.compute_capability)


BLOCK_SIZES = (32, 64, 128)  # INT4 block sizes along the reduction axis that every consumer here accepts


@dataclass(frozen=True)
class QuantSpec:
    method: str = "awq"  # rtn | awq
    block_size: int = 128
    format: str = "qdq"  # qdq (standard ONNX, TensorRT) | ort (com.microsoft.MatMulNBits)
    symmetric: bool = True
    # When plain INT4 misses the accuracy gate, keep the most sensitive layers unquantized until it holds
    # (instead of failing the stage); the report names the layers kept and what they cost.
    mixed_precision: bool = False


@dataclass(frozen=True)
class SloTargets:
    """What `r1deploy bench --profile` checks. A reasoning model streams ~1 000 tokens per answer, so its
    whole-request latency is tens of seconds on any hardware: the targets users feel are the time to the first
    token and the gap between tokens (docs/deploy.md "SLO" maps the seeds' "P99 < 1.5 s at 2000 QPS" onto them)."""

    ttft_p99_ms: Optional[float] = None  # p99 over requests of request sent → first token
    itl_p99_ms: Optional[float] = None  # p99 over requests of (last − first token) / (tokens − 1)
    tokens_per_s: Optional[float] = None  # aggregate output tokens/s of the endpoint benched, at its best level
    qps: Optional[float] = None  # completed requests/s at the best level
    # Deprecated: whole-request p99, which no reasoning model emitting ~1 000 tokens can hold at 1.5 s. Still
    # checked when a user profile sets it (never silently ignored); the built-in profiles no longer do.
    p99_latency_s: Optional[float] = None

    FIELDS = ("ttft_p99_ms", "itl_p99_ms", "tokens_per_s", "qps", "p99_latency_s")

    def items(self) -> list[tuple[str, float]]:
        """The targets that are set, in the order above."""
        return [(k, getattr(self, k)) for k in self.FIELDS if getattr(self, k) is not None]


@dataclass(frozen=True)
class AccuracyGate:
    """Minimum accuracy of a quantized model against FP32 (logits / embedding cosine, top-1 agreement)."""

    min_cosine: float = 0.99
    min_top1: float = 0.0

    def __post_init__(self) -> None:
        for key in ("min_cosine", "min_top1"):
            value = getattr(self, key)
            if not (math.isfinite(value) and -1.0 <= value <= 1.0):
                raise ValueError(f"{key} must lie in [-1, 1], got {value}")


@dataclass(frozen=True)
class BuilderSpec:
    optimization_level: int = 3
    workspace_gib: float = 8
    hardware_compatible: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:  # TensorRT's builder optimization levels
            raise ValueError(f"optimization_level must lie in 0..5, got {self.optimization_level}")
        if not (math.isfinite(self.workspace_gib) and self.workspace_gib > 0):
            raise ValueError(f"workspace_gib must be a number > 0, got {self.workspace_gib}")


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling the OpenAI gateway applies to a request that sets none (None: the model's own default).
    DeepSeek-R1's authors recommend temperature 0.5–0.7 (0.6) and top_p 0.95 against endless repetition."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p)) if v is not None}


@dataclass(frozen=True)
class DeploymentProfile:
    name: str
    description: str
    gpu: GpuSpec
    gpus_per_pod: int
    runtime: Runtime
    serving_variant: ServingVariant
    precision: Precision
    max_batch_size: int
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    max_input_len: int
    max_output_len: int
    replicas: int
    max_replicas: int
    slo: SloTargets
    accuracy: AccuracyGate
    quantization: QuantSpec = field(default_factory=QuantSpec)
    builder: BuilderSpec = field(default_factory=BuilderSpec)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if self.max_queue_delay_us < 0:
            raise ValueError(f"{where}: max_queue_delay_us must be ≥ 0")
        for key in SloTargets.FIELDS:
            value = getattr(self.slo, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: slo.{key} must be a number > 0")
        if self.gpus_per_pod < 1:
            raise ValueError(f"{where}: gpus_per_pod must be ≥ 1")
        if self.max_batch_size < 1:
            raise ValueError(f"{where}: max_batch_size must be ≥ 1")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError(
                f"{where}: preferred_batch_sizes {self.preferred_batch_sizes} must lie in 1..{self.max_batch_size}"
            )
        if self.max_input_len < 1 or self.max_output_len < 1:
            raise ValueError(f"{where}: max_input_len and max_output_len must be ≥ 1")
        if not 1 <= self.replicas <= self.max_replicas:
            raise ValueError(f"{where}: need 1 ≤ replicas ≤ max_replicas")
        t, p = self.sampling.temperature, self.sampling.top_p
        if (t is not None and not 0 <= t <= 2) or (p is not None and not 0 < p <= 1):
            raise ValueError(f"{where}: sampling.temperature must lie in [0, 2] and sampling.top_p in (0, 1]")
        if self.quantization.block_size not in BLOCK_SIZES:
            raise ValueError(f"{where}: quantization.block_size must be 32, 64 or 128")

    @property
    def max_sequence_len(self) -> int:
        """Longest past + current length the KV cache must hold."""
        return self.max_input_len + self.max_output_len


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def builtin_profile_data() -> dict:
    text = resources.files("exporter").joinpath("data/profiles.yaml").read_text()
    return yaml.safe_load(text)


def load_profiles(extra: Optional[Path] = None, overrides: Optional[dict] = None) -> dict[str, DeploymentProfile]:
    """The built-in profiles, merged with a user YAML file and/or a mapping (from pipeline.yaml `profiles:`)."""
    raw = builtin_profile_data()
    for layer in ([read_yaml_mapping(extra, "profiles file", "a mapping of profile name → settings")] if extra else []) + ([overrides] if overrides else []):
        for name, settings in layer.items():
            if not isinstance(settings, dict):
                raise BadInput(f"profile {name!r}: expected a mapping of settings")
            raw[name] = _deep_merge(raw.get(name, {}), settings)
    for name in raw:
        check_profile_name(name)
    return {name: from_data(DeploymentProfile, {"name": name, **data}, f"profile {name!r}") for name, data in raw.items()}


def check_profile_name(name: object) -> str:
    """A profile name becomes a directory (engines/<name>, model_repository/<name>) and the Kubernetes namespace
    r1deploy-<name>: a lowercase DNS label, checked before it is used as either."""
    check_name(name, "deployment profile")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", name):
        raise BadInput(
            f"deployment profile {name!r} is not a valid name: lowercase letters, digits and '-' (it becomes the "
            f"Kubernetes namespace r1deploy-{name}), at most 40 characters"
        )
    return name


def get_profile(name: str, profiles: Optional[dict[str, DeploymentProfile]] = None) -> DeploymentProfile:
    profiles = profiles if profiles is not None else load_profiles()
    if name not in profiles:
        raise BadInput(f"unknown deployment profile {name!r} (known: {', '.join(sorted(profiles))})")
    return profiles[name]
