"""TensorRT *shape profiles* (min/opt/max dimensions per input), derived from a *deployment profile*.

The two words are easy to confuse: a deployment profile (production, research, edge) says where and how a model
is served; a shape profile is TensorRT's optimization profile — the range of input shapes one execution context
accepts. One engine holds several shape profiles; the server picks one per request.

The export stage names every dynamic axis (`batch`, `sequence`, `past_sequence`, `total_sequence`), so the
ranges are given per named axis and applied to every input that carries that axis; static axes stay as they are.

Decoders (KV cache) get two shape profiles:

* ``context`` (prefill): sequence 1..max_input_len, past_sequence 0, total_sequence = sequence.
* ``generation`` (decode): sequence 1, past_sequence 1..max_sequence_len-1, total_sequence = past + 1, so the
  cache never holds more than ``max_sequence_len`` (= max_input_len + max_output_len) positions.

Encoders get one, ``encode``: sequence 1..min(max_input_len, max_position_embeddings).

Batch is 1..max_batch_size everywhere; opt is the largest preferred batch size (what the dynamic batcher forms),
and opt of a length axis is half its max.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import BadInput
from ..core.profiles import DeploymentProfile

# ONNX input name → dims; an int is static, a str names a dynamic axis (the export stage's dim_param).
InputDims = dict[str, tuple]

KNOWN_AXES = ("batch", "sequence", "past_sequence", "total_sequence")


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 0 ≤ min ≤ opt ≤ max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shape of one input tensor in one shape profile."""

    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass(frozen=True)
class ShapeProfile:
    name: str  # context | generation | encode
    inputs: dict[str, ShapeRange]

    @property
    def max_batch_size(self) -> int:
        return max(r.max[0] for r in self.inputs.values())


def _length(lo: int, hi: int) -> AxisRange:
    return AxisRange(lo, max(lo, hi // 2), hi)


def axis_ranges(kind: str, profile: DeploymentProfile, max_position_embeddings: int | None = None) -> dict[str, dict[str, AxisRange]]:
    """Shape-profile name → named axis → range, for a model of `kind` ("decoder" | "encoder")."""
    opt_batch = max(profile.preferred_batch_sizes or [profile.max_batch_size])
    batch = AxisRange(1, opt_batch, profile.max_batch_size)
    if kind == "decoder":
        seq = _length(1, profile.max_input_len)
        past = _length(1, profile.max_sequence_len - 1)
        return {
            "context": {"batch": batch, "sequence": seq, "past_sequence": AxisRange(0, 0, 0), "total_sequence": seq},
            "generation": {
                "batch": batch,
                "sequence": AxisRange(1, 1, 1),
                "past_sequence": past,
                "total_sequence": AxisRange(past.min + 1, past.opt + 1, past.max + 1),
            },
        }
    if kind == "encoder":
        cap = profile.max_input_len
        if max_position_embeddings:
            cap = min(cap, max_position_embeddings)
        return {"encode": {"batch": batch, "sequence": _length(1, cap)}}
    raise BadInput(f"unknown model kind {kind!r} (expected decoder or encoder)")


def shape_profiles(
    kind: str, inputs: InputDims, profile: DeploymentProfile, max_position_embeddings: int | None = None
) -> list[ShapeProfile]:
    """One `ShapeProfile` per entry of `axis_ranges`, over the graph inputs `inputs`."""
    out = []
    for name, axes in axis_ranges(kind, profile, max_position_embeddings).items():
        ranges = {}
        for tensor, dims in inputs.items():
            lo, opt, hi = [], [], []
            for i, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    lo.append(d)
                    opt.append(d)
                    hi.append(d)
                    continue
                if d not in axes:
                    raise BadInput(
                        f"input {tensor!r} axis {i} is dynamic ({d or 'unnamed'}) but not one of "
                        f"{', '.join(axes)}: the engine stage cannot size it (re-export the model with r1deploy export)"
                    )
                r = axes[d]
                lo.append(r.min)
                opt.append(r.opt)
                hi.append(r.max)
            ranges[tensor] = ShapeRange(lo, opt, hi)
        out.append(ShapeProfile(name, ranges))
    return out


def onnx_input_dims(onnx_path) -> tuple[InputDims, dict[str, str]]:
    """Graph inputs of an ONNX file (weights not loaded): name → dims, and name → ONNX element type name."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    dims: InputDims = {}
    dtypes: dict[str, str] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        dims[value.name] = tuple(d.dim_value if d.dim_value > 0 else d.dim_param for d in t.shape.dim)
        dtypes[value.name] = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    return dims, dtypes
