"""Typed configuration and result of the quantize stage."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from exporter.core.errors import BadInput
from exporter.core.profiles import BLOCK_SIZES, AccuracyGate, DeploymentProfile, Precision


class Method(str, enum.Enum):
    RTN = "rtn"  # round to nearest
    AWQ = "awq"  # activation-aware scale + clip search (quantize.core)


class Format(str, enum.Enum):
    QDQ = "qdq"  # standard DequantizeLinear INT4 (TensorRT, any ONNX runtime)
    ORT = "ort"  # com.microsoft.MatMulNBits (ONNX Runtime)


@dataclass
class QuantizeConfig:
    """What to produce. Unset (None) settings come from the deployment profile, then from the built-in
    defaults of `exporter.core.profiles.QuantSpec`."""

    model: str = "r1-distill-tiny"
    workdir: Path = Path("build")
    profile: Union[DeploymentProfile, str, None] = None
    precision: Optional[Precision] = None
    method: Optional[Method] = None
    block_size: Optional[int] = None
    format: Optional[Format] = None
    symmetric: Optional[bool] = None
    quantize_embeddings: bool = False  # Gather-ed tables (word/position embeddings)
    quantize_lm_head: bool = False  # the output projection: the most error-sensitive MatMul of an LLM
    keep_io_fp32: bool = True  # FP16: graph inputs/outputs stay FP32 so callers feed the same arrays
    graph: str = "generic"  # which export to start from: generic (onnx/fp32) or fused (onnx/fp32-fused)
    # Gate overrides; given explicitly they also turn on the mixed-precision search (INT4).
    min_cosine: Optional[float] = None
    min_top1: Optional[float] = None
    mixed_precision: Optional[bool] = None  # None: on when min_cosine or min_top1 is given
    force: bool = False
    memory_check: bool = True  # refuse before loading when the estimated peak exceeds available memory
    # Texts measured besides the held-out sentences (decoders), by name: an embedded preset with learned weights
    # brings its own (`exporter.tiny_models.quality_texts`). Reported, never gated, not part of the fingerprint.
    extra_texts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        try:
            self.precision = Precision(self.precision) if self.precision is not None else None
            self.method = Method(self.method) if self.method is not None else None
            self.format = Format(self.format) if self.format is not None else None
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if self.graph not in ("generic", "fused"):
            raise BadInput(f"graph must be generic or fused, got {self.graph!r}")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise BadInput(f"block size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        for name in ("min_cosine", "min_top1"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise BadInput(f"{name.replace('_', '-')} must lie in 0..1, got {value}")


@dataclass(frozen=True)
class Settings:
    """A QuantizeConfig resolved against its profile: exactly what the stage does (and fingerprints)."""

    precision: Precision
    method: Method
    block_size: int
    format: Format
    symmetric: bool
    quantize_embeddings: bool
    quantize_lm_head: bool
    keep_io_fp32: bool
    gate: Optional[AccuracyGate]  # None: no profile and no flags, accuracy is reported but not enforced
    gate_source: str  # "profile <name>" | "flags" | "none"
    mixed_precision: bool
    graph: str = "generic"

    def fingerprint(self) -> dict:
        """Only what changes the written model; the gate is re-checked even when the model is up to date."""
        out: dict = {"precision": self.precision.value, "keep_io_fp32": self.keep_io_fp32}
        if self.graph != "generic":  # generic fingerprints stay what they were
            out["graph"] = self.graph
        if self.precision is Precision.INT4:
            out.update(
                method=self.method.value, block_size=self.block_size, format=self.format.value,
                symmetric=self.symmetric, embeddings=self.quantize_embeddings, lm_head=self.quantize_lm_head,
            )
            if self.mixed_precision and self.gate is not None:
                out["mixed_precision_gate"] = [self.gate.min_cosine, self.gate.min_top1]
        return out


@dataclass
class Sizes:
    model_bytes_fp32: int  # model.onnx (+ external data) of the FP32 export
    model_bytes: int  # the same for this variant
    weight_bytes_fp32: int  # the quantized weights alone, as FP32
    weight_bytes: int  # their codes + scales + zero points
    quantized_weights: int  # number of weight values stored in 4 bits
    bits_per_weight: float  # achieved: 8 · weight_bytes / quantized_weights
    bits_per_weight_theoretical: float  # 4 + 32/block (+ 4/block asymmetric)
    kept_bytes: int = 0  # mixed precision: FP32 bytes of the layers kept unquantized
    activation_scale_bytes: int = 0  # AWQ's 1/s vectors (in model_bytes, not in weight_bytes)


@dataclass
class QuantizeResult:
    model: str
    variant: str
    precision: Precision
    onnx_path: Path
    report_path: Path
    skipped: bool
    sizes: Sizes
    accuracy: dict[str, float]  # on the held-out sentences (what the gate reads)
    gate: Optional[dict]
    kept_layers: list[str] = field(default_factory=list)  # mixed precision: left FP32 to meet the gate
    not_quantized: list[str] = field(default_factory=list)  # reduction axis not a multiple of the block size
    quantized_layers: int = 0
    seconds: float = 0.0
    # the same figures per text: held_out (= accuracy) and, for the embedded trained preset, corpus, held_out_domain
    accuracy_by_text: dict[str, dict[str, float]] = field(default_factory=dict)
