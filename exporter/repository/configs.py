"""Triton `config.pbtxt` files as `ModelConfig` protobuf messages (never text templates), written with
`text_format` so that the same inputs always give the same bytes, and parsed back the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..core.errors import BadInput
from .tensors import ModelIO, TensorSpec

STRING = "TYPE_STRING"  # Triton's BYTES


@dataclass(frozen=True)
class Batching:
    """What the dynamic batcher of a model may form: never more than the engine's shape profiles hold."""

    max_batch_size: int
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int


@dataclass(frozen=True)
class Placement:
    """Where instances run: one instance per GPU of the pod, or `cpu_instances` on the CPU."""

    kind: str  # gpu | cpu
    gpus: int = 1
    cpu_instances: int = 1


def render(config: mc.ModelConfig, comments: list[str]) -> str:
    header = "".join(f"# {line}\n" for line in comments)
    return header + text_format.MessageToString(config)


def parse(text: str, where: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise BadInput(f"{where}: {exc}") from None


def _dtype(name: str) -> int:
    return mc.DataType.Value(name)


def _tensor(cls, name: str, data_type: str, dims: list[int], optional: bool = False):
    t = cls(name=name, data_type=_dtype(data_type), dims=dims)
    if optional:
        t.optional = True
    return t


def _params(config: mc.ModelConfig, params: dict[str, object]) -> None:
    for key in sorted(params):
        value = params[key]
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        config.parameters[key].string_value = text


def _base(name: str, max_batch_size: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    config.version_policy.latest.num_versions = 1
    return config


def _dynamic_batching(config: mc.ModelConfig, batching: Batching) -> None:
    if batching.max_batch_size > 1:
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us


def _instances(config: mc.ModelConfig, placement: Placement, trt_profiles: tuple[str, ...] = ()) -> None:
    if placement.kind == "gpu":
        for gpu in range(placement.gpus):
            group = config.instance_group.add(name=f"gpu{gpu}", count=1, kind=mc.ModelInstanceGroup.KIND_GPU, gpus=[gpu])
            # Triton's TensorRT backend uses only the listed shape profiles (profile 0 when none is listed)
            group.profile.extend(trt_profiles)
    else:
        config.instance_group.add(name="cpu", count=placement.cpu_instances, kind=mc.ModelInstanceGroup.KIND_CPU)


def warmup_dims(spec: TensorSpec, kind: str) -> list[int]:
    """A valid shape (batch axis dropped) for one warm-up request: a decode step for decoders (one new token,
    one cached position — inside the engine's `generation` shape profile), 8 tokens for encoders."""
    dims = list(spec.shape[1:])
    if kind == "encoder":
        return [8 if d < 0 else d for d in dims]
    if spec.name == "attention_mask":
        return [2 if d < 0 else d for d in dims]
    return [1 if d < 0 else d for d in dims]


def engine_model(
    name: str,
    variant: str,
    io: ModelIO,
    kind: str,
    batching: Batching,
    placement: Placement,
    precision: str,
    workspace_bytes: int,
    trt_profiles: tuple[str, ...] = (),
    int4_activations: str = "fp32",
) -> mc.ModelConfig:
    """The model that runs the network: `tensorrt_plan`, `onnxruntime_onnx` or `python_ort` (python + ORT).
    `trt_profiles`: the engine's shape profiles by index, listed in every GPU instance group, so that a request
    (and the decode warm-up, which lies in the `generation` profile) may use any of them."""
    config = _base(name, batching.max_batch_size)
    batched = batching.max_batch_size > 0
    if variant == "tensorrt_plan":
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
    elif variant == "onnxruntime_onnx":
        config.backend = "onnxruntime"
        config.default_model_filename = "model.onnx"
        if placement.kind == "gpu":
            trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP32" if precision == "fp32" else "FP16"
            trt.parameters["max_workspace_size_bytes"] = str(workspace_bytes)
            trt.parameters["trt_engine_cache_enable"] = "true"
    elif variant == "python_ort":
        config.backend = "python"
        _params(config, {"onnx_file": "model.onnx", "intra_op_num_threads": "1", "ort_int4_activations": int4_activations})
    else:
        raise BadInput(f"unknown serving variant {variant!r}")
    for t in io.inputs:
        config.input.append(_tensor(mc.ModelInput, t.name, t.data_type, t.dims(batched)))
    for t in io.outputs:
        config.output.append(_tensor(mc.ModelOutput, t.name, t.data_type, t.dims(batched)))
    _dynamic_batching(config, batching)
    _instances(config, placement, trt_profiles if variant == "tensorrt_plan" else ())
    warm = config.model_warmup.add(name="decode_step" if kind == "decoder" else "encode_8_tokens", batch_size=1)
    for t in io.inputs:
        warm.inputs[t.name].data_type = _dtype(t.data_type)
        warm.inputs[t.name].dims.extend(warmup_dims(t, kind))
        warm.inputs[t.name].zero_data = True
    return config


GENERATE_INPUTS = [
    # name, type, dims (after the batch dimension of 1), optional. The names and types are those Triton's
    # OpenAI-compatible frontend and genai-perf send to a TensorRT-LLM-style model; `stop` is r1deploy's older
    # name for stop_words, `ignore_eos` vLLM's, `skip_special_tokens` keeps e.g. `</think>` in text_output.
    ("text_input", STRING, [1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("seed", "TYPE_UINT64", [1], True),
    ("stop_words", STRING, [-1], True),
    ("stop", STRING, [-1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("health_check", "TYPE_BOOL", [1], True),  # r1deploy's probe: answered at once, nothing generated (exporter/health.py)
    ("ignore_eos", "TYPE_BOOL", [1], True),
    ("exclude_input_in_output", "TYPE_BOOL", [1], True),
    ("skip_special_tokens", "TYPE_BOOL", [1], True),
    ("return_num_input_tokens", "TYPE_BOOL", [1], True),
    ("return_num_output_tokens", "TYPE_BOOL", [1], True),
    # sampling (TensorRT-LLM's and vLLM's names): penalties, logit_bias (JSON token id → bias), n, logprobs,
    # structured output
    ("presence_penalty", "TYPE_FP32", [1], True),
    ("frequency_penalty", "TYPE_FP32", [1], True),
    ("repetition_penalty", "TYPE_FP32", [1], True),
    ("min_tokens", "TYPE_INT32", [1], True),
    ("logit_bias", STRING, [1], True),
    ("num_return_sequences", "TYPE_INT32", [1], True),
    ("return_log_probs", "TYPE_BOOL", [1], True),
    ("top_logprobs", "TYPE_INT32", [1], True),
    ("guided_decoding_guide_type", STRING, [1], True),
    ("guided_decoding_guide", STRING, [1], True),
]
GENERATE_OUTPUTS = [
    ("text_output", STRING, [1]), ("token_ids", "TYPE_INT64", [-1]), ("finish_reason", STRING, [1]),
    ("num_input_tokens", "TYPE_UINT32", [1]), ("num_output_tokens", "TYPE_UINT32", [1]),
    ("sequence_index", "TYPE_INT32", [1]), ("output_log_probs", "TYPE_FP32", [-1]),
    ("top_logprob_ids", "TYPE_INT64", [-1, -1]), ("top_logprobs", "TYPE_FP32", [-1, -1]),
]


def generate_model(name: str, parameters: dict[str, object], placement: Placement = Placement("cpu")) -> mc.ModelConfig:
    """The LLM entry point: python backend, decoupled (token streaming), one in-flight batching scheduler.

    max_batch_size 1: each request is one prompt (shapes [1, …], as Triton's LLM clients send them); batching
    across requests happens inside the model, whose scheduler decodes every running request in one engine call
    per step — Triton's dynamic batcher cannot, since the requests' cache lengths differ.
    `placement` gpu: one instance per GPU of the pod (it runs a TensorRT plan in-process; Triton hands each
    instance its `model_instance_device_id`), each with its own scheduler loop; cpu with `cpu_instances` N: N
    loops side by side (one per GPU of a pod whose engine model, reached through BLS, has one instance per GPU).
    """
    config = _base(name, 1)
    config.backend = "python"
    for n, dt, dims, optional in GENERATE_INPUTS:
        config.input.append(_tensor(mc.ModelInput, n, dt, dims, optional))
    for n, dt, dims in GENERATE_OUTPUTS:
        config.output.append(_tensor(mc.ModelOutput, n, dt, dims))
    config.model_transaction_policy.decoupled = True
    _instances(config, placement)
    _params(config, parameters)
    return config


def tokenizer_model(name: str, outputs: list[TensorSpec], batching: Batching, parameters: dict[str, object]) -> mc.ModelConfig:
    config = _base(name, batching.max_batch_size)
    config.backend = "python"
    config.input.append(_tensor(mc.ModelInput, "text", STRING, [1]))
    for t in outputs:
        config.output.append(_tensor(mc.ModelOutput, t.name, t.data_type, [-1]))
    _dynamic_batching(config, batching)
    _instances(config, Placement("cpu"))
    _params(config, parameters)
    return config


def embed_ensemble(name: str, tokenizer: str, encoder: str, token_inputs: list[str], dim: int, batching: Batching) -> mc.ModelConfig:
    """`text` → tokenizer → encoder → `embeddings`. Stateless and deterministic, so its responses are cached
    (when the server runs with a response cache, `r1deploy serve` enables one)."""
    config = _base(name, batching.max_batch_size)
    config.platform = "ensemble"
    config.input.append(_tensor(mc.ModelInput, "text", STRING, [1]))
    config.output.append(_tensor(mc.ModelOutput, "embeddings", "TYPE_FP32", [dim]))
    steps = config.ensemble_scheduling.step
    tok = steps.add(model_name=tokenizer, model_version=-1)
    tok.input_map["text"] = "text"
    enc = steps.add(model_name=encoder, model_version=-1)
    for n in token_inputs:
        tok.output_map[n] = f"_{n}"
        enc.input_map[n] = f"_{n}"
    enc.output_map["embeddings"] = "embeddings"
    config.response_cache.enable = True
    return config
