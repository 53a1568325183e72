"""The fused decoder graph for ONNX Runtime, written directly from a Qwen2 / Llama checkpoint's weights.

Why built, not traced: torch emits attention op by op (206 nodes for r1-distill-tiny) and a cache that every step
concatenates into new `present` tensors; recovering ONNX Runtime's fused forms from that graph means pattern
matching on whatever the exporter's decompositions happen to be this release. These two architectures are a
fixed recipe, so the graph is written from the weights with `onnx.helper` (the approach onnxruntime-genai's model
builder takes; nothing here is taken from its code), one layer at a time:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm, the residual add fused in)
    MatMul q|k|v packed (+ bias Add for Qwen2) -> com.microsoft::GroupQueryAttention (rotary fused, KV cache
    written in place) -> MatMul o_proj -> SkipSimplifiedLayerNormalization -> SwiGLU MLP (3 MatMuls)
    ... final SkipSimplifiedLayerNormalization -> GatherND (the positions asked for) -> MatMul lm_head

Inputs and outputs (B rows, S new positions per row, C = cache capacity):

    input_ids              int64 [B, S]   right-padded: row b's tokens are [0, query_seqlens[b])
    seqlens_k              int32 [B]      tokens cached for row b AFTER this step, minus one
    query_seqlens          int32 [B]      new tokens of row b this step (0: an idle row, its cache untouched)
    total_sequence_length  int32 []       an upper bound of seqlens_k + 1 (the capacity C does)
    logits_index           int64 [B, K]   which of the S positions get logits (K = 1: the last; S: all)
    past_key_values.<i>.key / .value  [B, kv_heads, C, head_dim]
    -> logits [B, K, vocab], present.<i>.key / .value [B, kv_heads, C, head_dim]

Row b had `P = seqlens_k[b] + 1 - query_seqlens[b]` tokens cached; its new keys/values go to positions
[P, P + Q) and its positions (rotary) are P.., so rows of different lengths share one call and one buffer. Bound
to the same memory as `past_*` (ONNX Runtime IOBinding), `present_*` is the past buffer updated in place
(`past_present_share_buffer`): no copy of the cache per step. `logits_index` lets a prefill project only the
last position onto the vocabulary (at vocab 32k and a 128-token prompt that is 128x less lm_head work).

DeepseekV3 (MLA: the cache holds a compressed latent, decompressed per head inside attention) has no fused
ONNX Runtime kernel on CPU; it keeps the generic graph. TensorRT variants keep the generic standard-op graph as
well (com.microsoft ops are ONNX Runtime's own; see docs/benchmarks.md for which form TensorRT fuses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .core.errors import BadInput
from .onnx_files import attach_external_weights

SUPPORTED = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
MS = "com.microsoft"
INPUTS = ("input_ids", "seqlens_k", "query_seqlens", "total_sequence_length", "logits_index")


@dataclass(frozen=True)
class FusedSpec:
    """What the graph is built from (read from config.json)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    max_positions: int
    tied: bool

    @property
    def cache_shape(self) -> tuple[int, int]:
        return (self.kv_heads, self.head_dim)


def spec_from_config(config: dict) -> FusedSpec:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        extra = " (MLA attention keeps the generic graph)" if model_type == "deepseek_v3" else ""
        raise BadInput(
            f"the fused graph covers {', '.join(SUPPORTED.values())} decoders, not {model_type!r}{extra}; "
            "use --graph generic"
        )
    if config.get("use_sliding_window") and config.get("sliding_window"):
        raise BadInput("the fused graph does not implement sliding-window attention; use --graph generic")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if head_dim % 16:
        raise BadInput(f"the fused graph needs head_dim a multiple of 16 (ONNX Runtime's rotary), got {head_dim}")
    return FusedSpec(
        model_type=model_type,
        layers=int(config["num_hidden_layers"]),
        hidden=int(config["hidden_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def rotary_tables(checkpoint: Path, spec: FusedSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2], from transformers' own rotary module for this config, so every
    rope_scaling the model declares (llama3, yarn, dynamic's base) is computed as PyTorch computes it."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    if spec.model_type == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
    rotary = Rotary(config)
    with torch.no_grad():
        inv_freq = rotary.inv_freq.double()
        angles = torch.arange(spec.max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        cos = (torch.cos(angles) * scale).float().numpy()
        sin = (torch.sin(angles) * scale).float().numpy()
    return cos, sin


class _Weights:
    """A checkpoint's tensors (safetensors only), each read from its file when it is written and then dropped.

    Read with plain file reads, not through safetensors' memory map: every page of a mapped file that is read
    stays resident and counts towards the process's memory (a 125M model's 0.5 GB file would be held whole)."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

    def __init__(self, checkpoint: Path):
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({checkpoint / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise BadInput(f"no safetensors weights in {checkpoint}: the fused graph reads safetensors only")
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, 8 + size, info)

    def has(self, name: str) -> bool:
        return name in self._where

    def nonzero(self, name: str) -> bool:
        return bool(np.any(self.get(name)))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor as stored (bf16 as uint16) and its safetensors dtype: half the bytes of `get` for bf16."""
        path, base, info = self._where[name]
        dtype = self._DTYPES.get(info["dtype"])
        if dtype is None:
            raise BadInput(f"{path.name}: tensor {name} has dtype {info['dtype']}; the fused graph reads float weights")
        start, stop = info["data_offsets"]
        raw = np.empty(info["shape"], dtype=dtype)
        with open(path, "rb") as fh:
            fh.seek(base + start)
            if fh.readinto(memoryview(raw.reshape(-1)).cast("B")) != stop - start:
                raise BadInput(f"{path.name}: tensor {name} is truncated")
        return raw, info["dtype"]

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows `index` of a 2-D tensor as FP32 (an embedding lookup) without reading the rest."""
        path, base, info = self._where[name]
        dtype = np.dtype(self._DTYPES[info["dtype"]])
        width = int(info["shape"][1])
        out = np.empty((len(index), width), dtype=dtype)
        with open(path, "rb") as fh:
            for j, r in enumerate(np.asarray(index).tolist()):
                fh.seek(base + info["data_offsets"][0] + r * width * dtype.itemsize)
                out[j] = np.frombuffer(fh.read(width * dtype.itemsize), dtype=dtype)
        if info["dtype"] == "BF16":
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32)

    def get(self, name: str) -> np.ndarray:
        path, base, info = self._where[name]
        dtype = self._DTYPES.get(info["dtype"])
        if dtype is None:
            raise BadInput(f"{path.name}: tensor {name} has dtype {info['dtype']}; the fused graph reads float weights")
        start, stop = info["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(base + start)
            raw = np.frombuffer(fh.read(stop - start), dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


def _value(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def build(checkpoint: Path, out: Path) -> FusedSpec:
    """Write `out` (model.onnx) and `model.onnx.data` beside it for the checkpoint directory."""
    checkpoint = Path(checkpoint)
    if (Path(out).parent / "model.onnx.data").exists():  # the weights are appended to it
        raise ValueError(f"{Path(out).parent / 'model.onnx.data'} exists: build into an empty directory")
    model, lazy, spec, _ = graph_without_weights(checkpoint)
    out = Path(out)
    onnx.save(model, str(out))
    del model

    def as_array(item) -> np.ndarray:
        shape, load = item
        arr = np.asarray(load(), dtype=np.float32)
        if tuple(arr.shape) != tuple(shape):
            raise BadInput(f"checkpoint tensor has shape {list(arr.shape)}, config.json implies {list(shape)}")
        return arr

    attach_external_weights(out, lazy, as_array)
    return spec


def graph_without_weights(checkpoint: Path) -> tuple[onnx.ModelProto, dict[str, tuple[tuple[int, ...], object]],
                                                     FusedSpec, _Weights]:
    """The fused graph with every checkpoint weight as a graph input (FP32), and, for each such input, its shape
    and a loader that reads it from the checkpoint when called (`build` writes them; `exporter.stream_build`
    converts them on the way), the spec and the checkpoint's reader. Only the small constants are initializers."""
    checkpoint = Path(checkpoint)
    spec = spec_from_config(json.loads((checkpoint / "config.json").read_text()))
    w = _Weights(checkpoint)
    cos, sin = rotary_tables(checkpoint, spec)
    # name -> (onnx elem type, shape, loader): written to model.onnx.data one tensor at a time.
    lazy: dict[str, tuple[tuple[int, ...], object]] = {}
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], load) -> str:
        lazy[name] = (shape, load)
        return name

    def linear_t(hf_name: str) -> np.ndarray:
        return np.ascontiguousarray(w.get(hf_name).T)  # [out, in] -> MatMul's B [in, out]

    def const_i64(name: str, values: list[int]) -> str:
        initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    h, kv, d = spec.hidden, spec.kv_heads, spec.head_dim
    q_dim, kv_dim = spec.heads * d, kv * d
    embed = weight("model.embed_tokens.weight", (spec.vocab, h), lambda: w.get("model.embed_tokens.weight"))
    weight("cos_cache", cos.shape, lambda: cos)
    weight("sin_cache", sin.shape, lambda: sin)
    nodes.append(helper.make_node("Gather", [embed, "input_ids"], ["embeddings"], name="model.embed_tokens"))
    residual, branch = "embeddings", None
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        ln = weight(f"{p}.input_layernorm.weight", (h,), lambda n=f"{p}.input_layernorm.weight": w.get(n))
        x = f"{p}.input_layernorm.out"
        if branch is None:
            nodes.append(helper.make_node("SimplifiedLayerNormalization", [residual, ln], [x], name=f"{p}.input_layernorm",
                                          axis=-1, epsilon=spec.eps, stash_type=1))
        else:
            summed = f"{p}.residual_in"
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [residual, branch, ln], [x, "", "", summed],
                                          name=f"{p}.input_layernorm", domain=MS, epsilon=spec.eps))
            residual = summed
        a = f"{p}.self_attn"
        qkv_w = weight(f"{a}.qkv_proj.weight", (h, q_dim + 2 * kv_dim), lambda a=a: np.concatenate(
            [linear_t(f"{a}.{n}_proj.weight") for n in "qkv"], axis=1))
        nodes.append(helper.make_node("MatMul", [x, qkv_w], [f"{a}.qkv"], name=f"{a}.qkv_proj"))
        qkv = f"{a}.qkv"
        # An all-zero bias (a checkpoint that declares q/k/v biases but never trained them) is left out: the
        # result is the same and the Add costs a pass over [B, S, q+2kv] per layer.
        if any(w.has(f"{a}.{n}_proj.bias") and w.nonzero(f"{a}.{n}_proj.bias") for n in "qkv"):
            bias = weight(f"{a}.qkv_proj.bias", (q_dim + 2 * kv_dim,), lambda a=a: np.concatenate(
                [w.get(f"{a}.{n}_proj.bias") if w.has(f"{a}.{n}_proj.bias") else np.zeros(d * (spec.heads if n == "q" else kv),
                                                                                          np.float32) for n in "qkv"]))
            nodes.append(helper.make_node("Add", [qkv, bias], [f"{a}.qkv_biased"], name=f"{a}.qkv_bias"))
            qkv = f"{a}.qkv_biased"
        gqa_inputs = [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                      "total_sequence_length", "cos_cache", "sin_cache", "", "", "", "", "", "", "", "query_seqlens"]
        nodes.append(helper.make_node(
            "GroupQueryAttention", gqa_inputs, [f"{a}.out", f"present.{i}.key", f"present.{i}.value"], name=f"{a}.gqa",
            domain=MS, num_heads=spec.heads, kv_num_heads=kv, scale=float(d**-0.5), do_rotary=1, rotary_interleaved=0,
            local_window_size=-1,
        ))
        o_w = weight(f"{a}.o_proj.weight", (q_dim, h), lambda a=a: linear_t(f"{a}.o_proj.weight"))
        nodes.append(helper.make_node("MatMul", [f"{a}.out", o_w], [f"{a}.o"], name=f"{a}.o_proj"))
        post = weight(f"{p}.post_attention_layernorm.weight", (h,), lambda n=f"{p}.post_attention_layernorm.weight": w.get(n))
        x2 = f"{p}.post_attention_layernorm.out"
        nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [residual, f"{a}.o", post],
                                      [x2, "", "", f"{p}.residual_mid"], name=f"{p}.post_attention_layernorm", domain=MS,
                                      epsilon=spec.eps))
        residual = f"{p}.residual_mid"
        m = f"{p}.mlp"
        for n in ("gate", "up"):
            wn = weight(f"{m}.{n}_proj.weight", (h, spec.intermediate), lambda m=m, n=n: linear_t(f"{m}.{n}_proj.weight"))
            nodes.append(helper.make_node("MatMul", [x2, wn], [f"{m}.{n}"], name=f"{m}.{n}_proj"))
        nodes += [
            helper.make_node("Sigmoid", [f"{m}.gate"], [f"{m}.gate_sigmoid"], name=f"{m}.act_sigmoid"),
            helper.make_node("Mul", [f"{m}.gate", f"{m}.gate_sigmoid"], [f"{m}.gate_silu"], name=f"{m}.act_fn"),
            helper.make_node("Mul", [f"{m}.gate_silu", f"{m}.up"], [f"{m}.hidden"], name=f"{m}.gate_up"),
        ]
        down = weight(f"{m}.down_proj.weight", (spec.intermediate, h), lambda m=m: linear_t(f"{m}.down_proj.weight"))
        nodes.append(helper.make_node("MatMul", [f"{m}.hidden", down], [f"{m}.out"], name=f"{m}.down_proj"))
        branch = f"{m}.out"
    norm = weight("model.norm.weight", (h,), lambda: w.get("model.norm.weight"))
    nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [residual, branch, norm], ["model.norm.out"],
                                  name="model.norm", domain=MS, epsilon=spec.eps))
    nodes.append(helper.make_node("Unsqueeze", ["logits_index", const_i64("axes_last", [-1])], ["logits_index_nd"],
                                  name="logits_index_unsqueeze"))
    nodes.append(helper.make_node("GatherND", ["model.norm.out", "logits_index_nd"], ["model.norm.selected"],
                                  name="select_positions", batch_dims=1))
    head_name = "model.embed_tokens.weight" if spec.tied and not w.has("lm_head.weight") else "lm_head.weight"
    head = weight("lm_head.weight_t", (h, spec.vocab), lambda: linear_t(head_name))
    nodes.append(helper.make_node("MatMul", ["model.norm.selected", head], ["logits"], name="lm_head"))

    cache_dims = ["batch", kv, "cache_sequence", d]
    inputs = [
        _value("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        _value("seqlens_k", TensorProto.INT32, ["batch"]),
        _value("query_seqlens", TensorProto.INT32, ["batch"]),
        _value("total_sequence_length", TensorProto.INT32, []),
        _value("logits_index", TensorProto.INT64, ["batch", "logits_positions"]),
    ]
    outputs = [_value("logits", TensorProto.FLOAT, ["batch", "logits_positions", spec.vocab])]
    for i in range(spec.layers):
        for slot in ("key", "value"):
            inputs.append(_value(f"past_key_values.{i}.{slot}", TensorProto.FLOAT, cache_dims))
            outputs.append(_value(f"present.{i}.{slot}", TensorProto.FLOAT, cache_dims))
    weight_inputs = [_value(n, TensorProto.FLOAT, list(shape)) for n, (shape, _) in lazy.items()]
    # Every intermediate tensor's type, written out: ONNX's shape inference does not know the com.microsoft ops,
    # and tools that retype the graph (the FP16 converter) read value_info to place their Casts.
    known = {v.name for v in inputs + outputs} | set(lazy) | {t.name for t in initializers}
    ints = {"logits_index_nd"}
    value_info = [helper.make_tensor_value_info(o, TensorProto.INT64 if o in ints else TensorProto.FLOAT, None)
                  for n in nodes for o in n.output if o and o not in known]
    graph = helper.make_graph(nodes, f"{spec.model_type}-fused", inputs + weight_inputs, outputs, initializers,
                              value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                              producer_name="r1deploy")
    model.ir_version = 10
    return model, lazy, spec, w
