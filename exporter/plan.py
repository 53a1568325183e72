"""Capacity plan: from a checkpoint's `config.json` alone (no weights), what one model needs on a deployment
profile's GPU, and whether it fits.

    shape = load_shape("r1-distill-qwen-32b")                      # a config-only preset, a dir or a config.json
    p = plan_capacity(PlanConfig(shape=shape, profile=get_profile("production")))
    p.fits, p.max_concurrent_sequences, p.decode_tokens_per_s_planned
    scheduler_limits(p)  # {"max_rows": …, "kv_budget_tokens": …} for the generate model's scheduler

The accounting follows what r1deploy writes, not an idealised deployment:

* weights: every parameter transformers builds for the architecture (Qwen2's q/k/v biases, DeepseekV3's MLA
  projections, routed and shared experts, router); FP32 = 4 B, FP16 = 2 B per parameter. INT4 as the quantize stage
  writes it: linear weights whose reduction dimension is a multiple of the block size become 4-bit codes (two per
  byte) + one FP32 scale per block (+ one 4-bit zero point per block when asymmetric, + AWQ's FP32 1/s vector per
  linear input); embeddings, the LM head (unless quantized), norms, biases and linears the block does not divide
  stay FP32 — the INT4 variant is derived from the FP32 export.
* KV cache per token: 2 · layers · kv_heads · head_dim elements for GQA/MHA; for DeepseekV3's MLA the compressed
  latent that transformers caches, layers · (kv_lora_rank + qk_rope_head_dim). The element type is the cache
  IO of the served graph (`kv_dtype`, `default_kv_dtype`): for r1deploy's TensorRT engines (the `serving` graph,
  exporter/engine/serving_graph.py) the compute dtype's storage — FP16 for fp16 and int4, FP32 for fp32; FP32 for
  the generic ONNX graph as exported and quantized (unless `quantize --fp16-io`); FP16 for the fused graph's fp16
  variant (the repository stage reads it from the graph it serves).
* serving memory per GPU: weights + KV for max_batch_size × max_sequence_len + the activations of one max-length
  prefill (`prefill_activation_bytes`) + its logits (FP32; the last position for the TensorRT engines' serving graph
  and for the fused graph, which takes `logits_index`; every prompt position for the generic graph) + a fixed
  allowance for the CUDA context and Triton.
  The builder workspace is counted where it is used: the engine build (weights + workspace + the allowance), which
  may run on the node's GPU before serving but not at the same time; a GPU must hold both, not their sum. One GPU
  holds one whole replica: plain TensorRT engines (what the engine stage builds) have no tensor or pipeline
  parallelism.
* decode tokens/s upper bound per GPU: a decode step reads every weight it uses once and each running sequence's
  KV cache (at the mean decode context, max_input_len + max_output_len / 2) from memory at the data-sheet bandwidth;
  compute, kernel launch and scheduling cost nothing in this bound. The embedding table is not read (B rows are);
  for MoE only the experts the batch's tokens are routed to are (the expected number of distinct experts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .core.errors import BadInput
from .core.profiles import DeploymentProfile, Precision, QuantSpec

GIB = 1 << 30
# CUDA context, cuBLAS/cuDNN handles and Triton's own per-GPU allocations: the usual ~0.5-1 GiB, taken at the top.
RUNTIME_ALLOWANCE_BYTES = 1 * GIB
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
# Which graph is served decides the logits' positions and the default KV-cache type: serving (what r1deploy's engine
# stage hands TensorRT, exporter/engine/serving_graph.py), generic (the ONNX variant as exported and quantized, as
# ONNX Runtime runs it), fused (exporter/fused_graph.py, ONNX Runtime).
GRAPHS = ("serving", "generic", "fused")
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral", "deepseek_v3")


# --- the model, from config.json ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """A group of identical weight matrices: `count` of them, each [k (reduction), n]."""

    role: str  # attention | mlp | shared_expert | routed_expert | router | lm_head
    k: int
    n: int
    count: int

    @property
    def params(self) -> int:
        return self.k * self.n * self.count


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields that decide sizes; `from_config` reads them."""

    name: str
    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2 always)
    max_position_embeddings: int = 0
    # DeepseekV3 (MLA + MoE); zero for dense GQA models
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    source: str = ""  # where the fields came from

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return max(0, self.num_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @classmethod
    def from_config(cls, config: dict, name: str, source: str = "") -> ModelShape:
        where = f"{source or name}: config.json"
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BadInput(f"{where}: model_type {model_type!r} cannot be planned (decoders: {', '.join(SUPPORTED_MODEL_TYPES)})")

        def need(key: str) -> int:
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInput(f"{where}: {key} must be a positive integer, got {value!r}")
            return value

        def optional(key: str, default: int, lowest: int = 1) -> int:
            value = config.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise BadInput(f"{where}: {key} must be an integer ≥ {lowest}, got {value!r}")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv_heads = optional("num_key_value_heads", heads)
        if heads % kv_heads:
            raise BadInput(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        if config.get("head_dim") is None and model_type != "deepseek_v3" and hidden % heads:
            raise BadInput(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                           "when head_dim is not given")
        common = dict(
            name=name, model_type=model_type, architecture=(config.get("architectures") or [model_type])[0],
            vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads,
            head_dim=optional("head_dim", hidden // heads), intermediate_size=need("intermediate_size"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            max_position_embeddings=optional("max_position_embeddings", 0), source=source,
        )
        if model_type != "deepseek_v3":
            return cls(**common)
        return cls(
            **common,
            q_lora_rank=optional("q_lora_rank", 0, 0), kv_lora_rank=need("kv_lora_rank"),
            qk_rope_head_dim=need("qk_rope_head_dim"), qk_nope_head_dim=need("qk_nope_head_dim"),
            v_head_dim=need("v_head_dim"), n_routed_experts=optional("n_routed_experts", 0, 0),
            n_shared_experts=optional("n_shared_experts", 0, 0),
            num_experts_per_tok=optional("num_experts_per_tok", 0, 0),
            moe_intermediate_size=optional("moe_intermediate_size", 0, 0),
            first_k_dense_replace=optional("first_k_dense_replace", 0, 0),
        )

    # -- what transformers builds ---------------------------------------------------------------------------
    def linears(self) -> list[Linear]:
        h, L = self.hidden_size, self.num_layers
        out: list[Linear] = []
        if self.is_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                out += [Linear("attention", h, self.q_lora_rank, L),
                        Linear("attention", self.q_lora_rank, self.num_heads * qk_head, L)]
            else:
                out.append(Linear("attention", h, self.num_heads * qk_head, L))
            out += [
                Linear("attention", h, self.kv_lora_rank + self.qk_rope_head_dim, L),
                Linear("attention", self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), L),
                Linear("attention", self.num_heads * self.v_head_dim, h, L),
            ]
        else:
            q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            out += [Linear("attention", h, q, L), Linear("attention", h, kv, 2 * L), Linear("attention", q, h, L)]
        if self.dense_layers:
            out += [Linear("mlp", h, self.intermediate_size, 2 * self.dense_layers),
                    Linear("mlp", self.intermediate_size, h, self.dense_layers)]
        if self.moe_layers:
            m, e = self.moe_intermediate_size, self.n_routed_experts
            out += [Linear("router", h, e, self.moe_layers),
                    Linear("routed_expert", h, m, 2 * e * self.moe_layers),
                    Linear("routed_expert", m, h, e * self.moe_layers)]
            if self.n_shared_experts:
                s = m * self.n_shared_experts
                out += [Linear("shared_expert", h, s, 2 * self.moe_layers), Linear("shared_expert", s, h, self.moe_layers)]
        if not self.tie_word_embeddings:
            out.append(Linear("lm_head", h, self.vocab_size, 1))
        return out

    def other_params(self) -> dict[str, int]:
        """Parameters outside the linears: embedding table, norms, biases, the router's correction bias."""
        h, L = self.hidden_size, self.num_layers
        norms = 2 * h * L + h
        if self.is_mla:
            norms += L * (self.kv_lora_rank + self.q_lora_rank)
        biases = L * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return {
            "embedding": self.vocab_size * h,
            "norms": norms,
            "biases": biases,
            "router_bias": self.n_routed_experts * self.moe_layers,  # DeepseekV3's e_score_correction_bias
        }

    @property
    def parameters(self) -> int:
        return sum(lin.params for lin in self.linears()) + sum(self.other_params().values())

    def kv_elements_per_token(self) -> int:
        if self.is_mla:  # transformers 5 caches MLA's compressed latent ("key" kv_lora_rank, "value" rope dims)
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def builtin_shapes() -> dict[str, dict]:
    return yaml.safe_load(resources.files("exporter").joinpath("data/model_configs.yaml").read_text())


REAL_FAMILY = tuple(builtin_shapes())


def load_shape(spec: str | Path, workdir: Optional[Path] = None) -> ModelShape:
    """A config-only preset, a tiny preset (its checkpoint under `workdir` when given and built, else its declared
    config with the tokenizer's vocabulary bound — what the manifests stage uses, so its output does not depend on
    a local build), a checkpoint directory or a config.json file."""
    spec_s = str(spec)
    presets = builtin_shapes()
    if spec_s in presets:
        return ModelShape.from_config(presets[spec_s]["config"], spec_s, presets[spec_s]["source"])
    from .tiny_models import TINY_CONFIGS, VOCAB_SIZE

    if spec_s in TINY_CONFIGS:
        built = Path(workdir) / "models" / spec_s / "config.json" if workdir is not None else None
        if built is not None and built.is_file():
            return ModelShape.from_config(json.loads(built.read_text()), spec_s, str(built))
        # not built yet: the declared shape, with the tokenizer's size bound as the vocabulary (an upper bound)
        return ModelShape.from_config({**TINY_CONFIGS[spec_s], "vocab_size": VOCAB_SIZE}, spec_s, "tiny_models.TINY_CONFIGS")
    path = Path(spec_s).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        known = ", ".join([*presets, *TINY_CONFIGS])
        raise BadInput(f"no config.json for {spec_s!r} (presets: {known}; or a checkpoint directory)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise BadInput(f"invalid config.json {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise BadInput(f"{config_file}: expected a JSON object")
    name = (config_file.parent if config_file.name == "config.json" else config_file).name
    return ModelShape.from_config(config, name, str(config_file))


# --- bytes ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    precision: str
    total: int
    quantized_params: int = 0  # INT4: parameters stored as 4-bit codes
    codes: int = 0
    scales: int = 0
    zero_points: int = 0
    awq_scales: int = 0
    unquantized: int = 0  # bytes of everything else, in the base type
    block_size: int = 0
    symmetric: bool = True
    by_role: dict[str, int] = field(default_factory=dict)  # bytes per linear role + embedding + other


def _int4_linear_bytes(lin: Linear, q: QuantSpec) -> tuple[int, int, int]:
    blocks = lin.k // q.block_size * lin.n * lin.count
    codes = lin.params // 2
    scales = 4 * blocks
    zero_points = 0 if q.symmetric else (blocks + 1) // 2
    return codes, scales, zero_points


def _awq_vectors(shape: ModelShape, lin_roles_quantized: set[str]) -> int:
    """AWQ's FP32 1/s vector, one per distinct input of the quantized dense linears: the attention input (q/k/v
    share it) and o_proj's, the MLP input (gate/up share it) and down_proj's. MLA's latent inputs are left out
    (< 0.001 % of the bytes)."""
    h, L = shape.hidden_size, shape.num_layers
    n = 0
    if "attention" in lin_roles_quantized:
        n += L * (h + shape.num_heads * (shape.v_head_dim or shape.head_dim))
    if "mlp" in lin_roles_quantized:
        n += shape.dense_layers * (h + shape.intermediate_size)
    return 4 * n


def weight_bytes(shape: ModelShape, precision: Precision | str, quant: QuantSpec = QuantSpec(),
                 quantize_lm_head: bool = False) -> WeightBytes:
    precision = Precision(precision)
    linears = shape.linears()
    other = shape.other_params()
    if precision is not Precision.INT4:
        b = DTYPE_BYTES[precision.value]
        by_role: dict[str, int] = {}
        for lin in linears:
            by_role[lin.role] = by_role.get(lin.role, 0) + b * lin.params
        by_role["embedding"] = b * other["embedding"]
        by_role["other"] = b * (other["norms"] + other["biases"] + other["router_bias"])
        return WeightBytes(precision.value, b * shape.parameters, unquantized=b * shape.parameters, by_role=by_role)
    base = DTYPE_BYTES["fp32"]
    codes = scales = zps = unq = qparams = 0
    by_role = {}
    roles_quantized: set[str] = set()
    for lin in linears:
        if lin.k % quant.block_size == 0 and (lin.role != "lm_head" or quantize_lm_head):
            c, s, z = _int4_linear_bytes(lin, quant)
            codes, scales, zps, qparams = codes + c, scales + s, zps + z, qparams + lin.params
            by_role[lin.role] = by_role.get(lin.role, 0) + c + s + z
            roles_quantized.add(lin.role)
        else:
            unq += base * lin.params
            by_role[lin.role] = by_role.get(lin.role, 0) + base * lin.params
    awq = _awq_vectors(shape, roles_quantized) if quant.method == "awq" else 0
    rest = base * (other["norms"] + other["biases"] + other["router_bias"])
    by_role["embedding"] = base * other["embedding"]
    by_role["other"] = rest + awq
    unq += by_role["embedding"] + rest
    return WeightBytes("int4", codes + scales + zps + awq + unq, qparams, codes, scales, zps, awq, unq,
                       quant.block_size, quant.symmetric, by_role)


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanConfig:
    shape: ModelShape
    profile: DeploymentProfile
    precision: Optional[Precision] = None  # default: the profile's
    kv_dtype: Optional[str] = None  # the served graph's cache IO; default: the graph's (`default_kv_dtype`)
    graph: str = "serving"  # serving (r1deploy's TensorRT engines) | generic | fused: see GRAPHS

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision(self.precision or self.profile.precision))
        if self.kv_dtype is not None and self.kv_dtype not in DTYPE_BYTES:
            raise BadInput(f"kv dtype {self.kv_dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.graph not in GRAPHS:
            raise BadInput(f"graph {self.graph!r} is not one of {', '.join(GRAPHS)}")
        if not self.profile.gpu.memory_bandwidth_gb_s:
            raise BadInput(f"profile {self.profile.name!r}: gpu.memory_bandwidth_gb_s is not set (needed for the decode bound)")

    @property
    def kv(self) -> str:
        """The KV-cache element type planned: the one given, else the graph's default."""
        return self.kv_dtype or default_kv_dtype(self.graph, self.precision)


def default_kv_dtype(graph: str, precision: Precision | str) -> str:
    """The cache IO type each graph has when nothing overrides it: the serving graph's is the compute dtype's
    storage (`Precision.engine_kv_dtype`: FP16 for fp16 and int4); the generic graph keeps FP32 IO (the quantize
    stage's keep_io_types); the fused graph's fp16 variant has an FP16 cache, its fp32 and int4 variants FP32."""
    precision = Precision(precision)
    if graph == "serving":
        return precision.engine_kv_dtype
    return "fp16" if graph == "fused" and precision is Precision.FP16 else "fp32"


@dataclass(frozen=True)
class MemoryPerGpu:
    weights: int
    kv_cache: int
    logits: int  # one max-length prefill's FP32 logits (every position: generic graph; the last: serving, fused)
    activations: int  # one max-length prefill's working set (prefill_activation_bytes)
    workspace: int  # the builder workspace the profile allows the engine: counted in `build`, not in `total`
    runtime: int  # CUDA context + Triton
    total: int  # serving: weights + kv_cache + logits + activations + runtime
    build: int = 0  # the engine build on this GPU: weights + workspace + runtime (before serving, not with it)


@dataclass(frozen=True)
class CapacityPlan:
    model: str
    profile: str
    gpu: str
    gpu_memory_bytes: int
    gpus_per_pod: int
    precision: str
    parameters: int
    weights: WeightBytes
    kv_dtype: str
    kv_bytes_per_token: int
    graph: str  # which graph is served: serving | generic | fused
    max_batch_size: int  # the profile's
    max_sequence_len: int
    memory_at_limits: MemoryPerGpu  # at the profile's max_batch_size × max_sequence_len
    fits: bool  # the profile's limits fit one GPU
    max_concurrent_sequences: int  # of max_sequence_len each, in the memory left after the weights (0: none)
    planned_batch: int  # min(profile max_batch_size, max_concurrent_sequences)
    kv_budget_tokens: int  # KV positions the memory left holds, capped at planned_batch × max_sequence_len
    gpus_per_replica: int  # if the model could be split evenly; > 1 is not deployable with plain TensorRT
    decode_tokens_per_s_batch1: float
    decode_tokens_per_s_planned: float
    slo_tokens_per_s: Optional[float]
    meets_slo: Optional[bool]  # the planned-batch bound against the SLO (None: no SLO or nothing fits)
    alternatives: list[str] = field(default_factory=list)  # profile/precision combinations that fit, when this does not
    notes: list[str] = field(default_factory=list)

    def refusal(self) -> str:
        """One line with the numbers: why a deployment of this plan cannot be written."""
        m = self.memory_at_limits
        alt = f"; fits: {', '.join(self.alternatives)}" if self.alternatives else "; no built-in profile/precision fits"
        build = (f"; the engine build needs weights + workspace {m.workspace / GIB:.1f} GiB + runtime = "
                 f"{m.build / GIB:.1f} GiB" if m.build > self.gpu_memory_bytes else "")
        return (
            f"{self.model} ({self.precision}) does not fit profile {self.profile!r} ({self.gpu}, "
            f"{self.gpu_memory_bytes / GIB:.0f} GiB per GPU): weights {m.weights / GIB:.1f} GiB + prefill "
            f"activations {m.activations / GIB:.1f} GiB + logits {m.logits / GIB:.1f} GiB + runtime "
            f"{m.runtime / GIB:.1f} GiB + KV {self.kv_bytes_per_token * self.max_sequence_len / GIB:.2f} GiB per "
            f"{self.max_sequence_len}-token sequence leaves room for {self.max_concurrent_sequences} sequences{build}; "
            f"it needs {self.gpus_per_replica} GPUs and plain TensorRT engines cannot split a model across GPUs "
            f"(TensorRT-LLM can, unverified: `--runtime tensorrt-llm` on a profile of {self.gpus_per_replica} or more "
            f"GPUs per pod){alt}"
        )


def _decode_step_bytes(shape: ModelShape, w: WeightBytes, batch: int) -> float:
    """Weight bytes one decode step reads at `batch` running sequences (embedding rows only; routed experts the
    batch touches: E · (1 - (1 - k/E)^B))."""
    read = sum(v for k, v in w.by_role.items() if k not in ("embedding", "routed_expert"))
    read += batch * w.by_role.get("embedding", 0) / max(1, shape.vocab_size)
    if "routed_expert" in w.by_role and shape.n_routed_experts:
        e, k = shape.n_routed_experts, shape.num_experts_per_tok
        touched = e * (1 - (1 - k / e) ** batch)
        read += w.by_role["routed_expert"] * touched / e
    return read


def _tokens_per_s(shape: ModelShape, w: WeightBytes, kv_tok: int, ctx: int, batch: int, bandwidth: float) -> float:
    if batch < 1:
        return 0.0
    step = _decode_step_bytes(shape, w, batch) + batch * kv_tok * ctx
    return batch * bandwidth / step


def compute_dtype_bytes(precision: Precision | str) -> int:
    """The activations' element size: FP16 for the fp16 variant; FP32 for fp32 and for int4, whose graph is the
    FP32 export with its weights replaced (weight-only quantization: the MatMuls compute in FP32)."""
    return 2 if Precision(precision) is Precision.FP16 else 4


def prefill_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """The working set of one prefill of `tokens` positions: the tensors alive at once inside one layer (runtimes
    reuse one layer's buffers for the next) — residual + normed input + q|k|v + attention output + o_proj, then
    gate, up and their product (SwiGLU) — in the compute type. No tokens × tokens attention matrix: TensorRT's
    fused attention (flash-style) never writes one, and ONNX Runtime's CPU GroupQueryAttention was measured not
    to hold one either (benchmarks/plan_vs_session.py: a 2048-token prefill of a 12-head model added 0.11 GiB,
    where the FP32 probabilities alone would be 0.19 GiB). MoE layers are counted with the dense intermediate
    size (DeepseekV3's first dense layers are the widest)."""
    h = shape.hidden_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_token = 3 * h + q + 2 * kv + q + 3 * shape.intermediate_size
    return dtype_bytes * tokens * per_token


def logits_bytes(shape: ModelShape, tokens: int, graph: str = "serving") -> int:
    """FP32 logits of one prefill: every position for the generic graph, the last for the serving and fused graphs
    (the serving graph gathers the last position before the LM head, so the [tokens, vocab] product never exists)."""
    return 4 * (tokens if graph == "generic" else 1) * shape.vocab_size


# ONNX Runtime on CPU — how `generate` serves the CPU profiles and the tests — measured by
# benchmarks/plan_vs_session.py (docs/benchmarks.md): a session's own allocations before any tensor of the model
# (kernels, the optimized graph, the arena's first region), and its BFC arena's growth over what a prefill's
# tensors request (blocks rounded up to bins, the region extended by doubling). The two constants were fitted on
# the tiny model (the overhead) and on 122 M / 1.5B (the growth, 1.25-1.35 measured); the benchmark checks them.
ORT_CPU_SESSION_BYTES = 9 << 20
ORT_ARENA_GROWTH = 1.3


@dataclass(frozen=True)
class SessionMemory:
    """What one ONNX Runtime CPU session serving the fused graph holds (see `cpu_session_memory`)."""

    weights: int  # resident weights: the embedding table is mapped, not read (a tied LM head is its own copy)
    kv_cache: int
    prefill: int  # one prefill's activations and its last-position logits, as the arena reserves them
    runtime: int  # the session's fixed overhead
    total: int


def cpu_session_memory(shape: ModelShape, precision: Precision | str, rows: int, capacity: int, prefill_tokens: int,
                       quant: QuantSpec = QuantSpec(), kv_dtype_bytes: Optional[int] = None) -> SessionMemory:
    """Memory of the CPU engine `generate` runs (kv_shared.SharedKVEngine over the fused graph): weights + KV of
    `rows` × `capacity` positions + one prefill of `prefill_tokens` + the session's overhead. On CPU the external
    weights are memory-mapped: the embedding table's pages are touched only for the prompt's rows, so it is not
    resident (on a GPU the engine copies it; the GPU plan keeps it); nor are the rotary cos / sin tables the fused
    graph gathers by position (not counted by `weight_bytes` either). A tied LM head is resident all the same: the
    fused graph stores it as its own transposed copy, the bytes `weight_bytes` counts once for both."""
    precision = Precision(precision)
    w = weight_bytes(shape, precision, quant)
    resident = w.total - (0 if shape.tie_word_embeddings else w.by_role.get("embedding", 0))
    kv_b = kv_dtype_bytes if kv_dtype_bytes is not None else compute_dtype_bytes(precision)
    kv = shape.kv_elements_per_token() * kv_b * rows * capacity
    prefill = int(ORT_ARENA_GROWTH * (prefill_activation_bytes(shape, prefill_tokens, compute_dtype_bytes(precision))
                                      + logits_bytes(shape, prefill_tokens, "fused")))
    return SessionMemory(resident, kv, prefill, ORT_CPU_SESSION_BYTES, resident + kv + prefill + ORT_CPU_SESSION_BYTES)


def _fixed(shape: ModelShape, profile: DeploymentProfile, w: WeightBytes, precision: Precision,
           graph: str) -> MemoryPerGpu:
    logits = logits_bytes(shape, profile.max_input_len, graph)
    acts = prefill_activation_bytes(shape, profile.max_input_len, compute_dtype_bytes(precision))
    workspace = int(profile.builder.workspace_gib * GIB)
    return MemoryPerGpu(w.total, 0, logits, acts, workspace, RUNTIME_ALLOWANCE_BYTES,
                        w.total + logits + acts + RUNTIME_ALLOWANCE_BYTES,
                        w.total + workspace + RUNTIME_ALLOWANCE_BYTES)


def _evaluate(cfg: PlanConfig, alternatives: list[str]) -> CapacityPlan:
    shape, profile = cfg.shape, cfg.profile
    w = weight_bytes(shape, cfg.precision, profile.quantization)
    kv_tok = shape.kv_elements_per_token() * DTYPE_BYTES[cfg.kv]
    seq = profile.max_sequence_len
    gpu_bytes = profile.gpu.memory_gib * GIB
    fixed = _fixed(shape, profile, w, cfg.precision, cfg.graph)
    kv_limits = kv_tok * seq * profile.max_batch_size
    at_limits = replace(fixed, kv_cache=kv_limits, total=fixed.total + kv_limits)
    free = gpu_bytes - fixed.total
    buildable = fixed.build <= gpu_bytes  # the engine is built on this GPU first (workspace + weights)
    max_seqs = max(0, free // (kv_tok * seq)) if free > 0 and buildable else 0
    planned = min(profile.max_batch_size, max_seqs)
    kv_budget = min(max(0, free) // kv_tok, planned * seq) if planned else 0
    # evenly split weights and workspace, each GPU still needs its runtime and one sequence's KV
    gpus = max(1, math.ceil((fixed.total + kv_tok * seq) / gpu_bytes), math.ceil(fixed.build / gpu_bytes))
    bandwidth = profile.gpu.memory_bandwidth_gb_s * 1e9
    ctx = profile.max_input_len + profile.max_output_len // 2
    tps1 = _tokens_per_s(shape, w, kv_tok, ctx, 1, bandwidth) if planned else 0.0
    tpsb = _tokens_per_s(shape, w, kv_tok, ctx, planned, bandwidth)
    slo = profile.slo.tokens_per_s
    notes = []
    if not buildable:
        notes.append(f"the engine build needs {fixed.build / GIB:.1f} GiB (weights + workspace + runtime): more than the GPU")
    if planned and planned < profile.max_batch_size:
        notes.append(f"only {planned} of the profile's {profile.max_batch_size} sequences of {seq} tokens fit")
    if shape.max_position_embeddings and seq > shape.max_position_embeddings:
        notes.append(f"the profile allows {seq} positions but the model was trained for {shape.max_position_embeddings}")
    if cfg.precision is Precision.INT4:
        notes.append("INT4 as the quantize stage writes it: embeddings, LM head, norms and biases stay FP32")
    return CapacityPlan(
        model=shape.name, profile=profile.name, gpu=profile.gpu.product, gpu_memory_bytes=gpu_bytes,
        gpus_per_pod=profile.gpus_per_pod, precision=cfg.precision.value, parameters=shape.parameters, weights=w,
        kv_dtype=cfg.kv, kv_bytes_per_token=kv_tok, graph=cfg.graph, max_batch_size=profile.max_batch_size,
        max_sequence_len=seq, memory_at_limits=at_limits, fits=at_limits.total <= gpu_bytes and buildable,
        max_concurrent_sequences=int(max_seqs), planned_batch=int(planned), kv_budget_tokens=int(kv_budget),
        gpus_per_replica=gpus, decode_tokens_per_s_batch1=round(tps1, 1), decode_tokens_per_s_planned=round(tpsb, 1),
        slo_tokens_per_s=slo, meets_slo=(tpsb >= slo) if (slo and planned) else None,
        alternatives=alternatives, notes=notes,
    )


def plan_capacity(cfg: PlanConfig, profiles: Optional[dict[str, DeploymentProfile]] = None) -> CapacityPlan:
    """The plan of `cfg.shape` on `cfg.profile`; when it does not fit, `alternatives` names each
    profile/precision (of `profiles`, default the built-in ones) that would run at least one sequence."""
    first = _evaluate(cfg, [])
    if first.planned_batch >= 1:
        return first
    if profiles is None:
        from .core.profiles import load_profiles

        profiles = load_profiles()
    alts = []
    for name, prof in profiles.items():
        for prec in (Precision.FP16, Precision.INT4):
            if name == cfg.profile.name and prec is cfg.precision:
                continue
            other = _evaluate(PlanConfig(cfg.shape, prof, prec, cfg.kv_dtype, cfg.graph), [])
            if other.planned_batch >= 1:
                alts.append(f"{name}/{prec.value} (batch {other.planned_batch})")
    return replace(first, alternatives=alts)


def scheduler_limits(plan: CapacityPlan) -> dict[str, int]:
    """What the generate model's scheduler may hold on one GPU: rows (concurrent sequences) and KV positions.
    Written by the repository stage into the `scheduler` parameter of generate's config.pbtxt."""
    return {"max_rows": plan.planned_batch, "kv_budget_tokens": plan.kv_budget_tokens}


def ensure_deployable(plan: CapacityPlan) -> None:
    """BadInput (exit 2) with the numbers when not even one sequence fits one GPU of the profile."""
    if plan.planned_batch < 1:
        raise BadInput(plan.refusal())


def _variant_precision(onnx_variant: str) -> Precision:
    return Precision(onnx_variant.split("-")[0])


def plan_for_variant(config_json: Path, profile: DeploymentProfile, onnx_variant: str, kv_dtype: str,
                     graph: Optional[str] = None) -> CapacityPlan:
    """The repository stage's plan: the exported checkpoint's config.json, the ONNX variant actually served, its
    KV-cache element type and the graph that runs it (default: fused for a fused variant, else generic). BadInput
    (exit 2, with the numbers) when not one sequence fits."""
    graph = graph or ("fused" if onnx_variant.endswith("-fused") else "generic")
    plan = plan_capacity(PlanConfig(load_shape(config_json), profile, _variant_precision(onnx_variant), kv_dtype, graph))
    ensure_deployable(plan)
    return plan


def memory_requests(plan: CapacityPlan, profile: DeploymentProfile) -> dict[str, tuple[str, str]]:
    """Host-memory (request, limit) of the pod's containers, from the weight bytes: Triton holds one engine in host
    memory while it deserialises it (all `gpus_per_pod` instances at once in the worst case, the limit), on top of
    the python backend's per-GPU share; the engine-build init container holds the ONNX weights and the builder's copy
    next to the workspace."""
    gpus = profile.gpus_per_pod
    w = math.ceil(plan.weights.total / GIB)
    ws = int(profile.builder.workspace_gib)
    return {
        "triton": (f"{8 * gpus + w}Gi", f"{16 * gpus + w * gpus}Gi"),
        "engine-build": (f"{ws + 8 + 2 * w}Gi", f"{2 * ws + 16 + 2 * w}Gi"),
    }
