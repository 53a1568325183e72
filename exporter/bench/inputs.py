"""The requests a benchmark sends: the model's inputs as read from the server (metadata + config), filled with
synthetic data, with data from `--input-data`, or — for LLMs — with prompts from a JSONL file or synthetic
prompts of a chosen length."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from ..core.errors import BadInput

# A fixed vocabulary: synthetic prompts are reproducible and tokenize to roughly one token per word.
_WORDS = (
    "the model serves tokens from a cluster of machines while engineers measure latency and throughput under "
    "load with requests that arrive at a steady rate across many concurrent streams of text"
).split()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton's: FP32, INT64, BYTES, BOOL, …
    shape: tuple[int, ...]  # as the server reports it: -1 = variable (the batch dimension included)
    optional: bool = False


@dataclass
class ModelSpec:
    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0
    decoupled: bool = False

    def input(self, name: str) -> Optional[TensorSpec]:
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def looks_like_llm(self) -> bool:
        names = {t.name for t in self.inputs}
        return self.decoupled or ("text_input" in names and any(t.name == "text_output" for t in self.outputs))


@dataclass
class Tensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass
class Payload:
    """One request's inputs (and, for LLMs, the max_tokens asked for)."""

    tensors: list[Tensor] = field(default_factory=list)
    max_tokens: int = 0


def model_spec(metadata, config) -> ModelSpec:
    """From a `ModelMetadataResponse` and a `ModelConfig` (protobuf messages, whichever protocol)."""
    optional = {i.name for i in config.input if i.optional}
    return ModelSpec(
        name=metadata.name,
        version=metadata.versions[-1] if metadata.versions else "",
        inputs=[TensorSpec(t.name, t.datatype, tuple(t.shape), t.name in optional) for t in metadata.inputs],
        outputs=[TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs],
        max_batch_size=config.max_batch_size,
        decoupled=config.model_transaction_policy.decoupled,
    )


def _concrete_shape(spec: TensorSpec, batched: bool, batch_size: int) -> list[int]:
    dims = list(spec.shape)
    if batched:
        dims[0] = batch_size
    return [1 if d < 0 else d for d in dims]


def _words(n: int, rng: np.random.Generator) -> str:
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n))


def _random(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([_words(8, rng).encode() for _ in range(int(np.prod(shape)))], dtype=np.object_).reshape(shape)
    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise BadInput(f"cannot synthesise inputs of type {datatype}; give --input-data")
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, shape).astype(dtype)  # small: valid as token ids of any vocabulary
    return rng.random(shape).astype(dtype)


SYNTHETIC_PAYLOADS = 32


def synthetic_payloads(spec: ModelSpec, batch_size: int, seed: int, count: int = SYNTHETIC_PAYLOADS) -> list[Payload]:
    """`count` distinct random requests, sent in turn: one request repeated would measure Triton's response
    cache (on for `embed` in r1deploy's repositories) instead of the model."""
    rng = np.random.default_rng(seed)
    return [_synthetic_payload(spec, batch_size, rng) for _ in range(count)]


def _synthetic_payload(spec: ModelSpec, batch_size: int, rng: np.random.Generator) -> Payload:
    batched = spec.max_batch_size > 0
    if batch_size > 1 and not batched:
        raise BadInput(f"model {spec.name} does not batch (max_batch_size 0): use --batch-size 1")
    if batched and batch_size > spec.max_batch_size:
        raise BadInput(f"--batch-size {batch_size} > the model's max_batch_size {spec.max_batch_size}")
    return Payload([
        Tensor(t.name, t.datatype, _random(t.datatype, _concrete_shape(t, batched, batch_size), rng))
        for t in spec.inputs if not t.optional
    ])


def _array_from(entry, t: TensorSpec, batched: bool, batch_size: int, where: str) -> np.ndarray:
    if isinstance(entry, dict):
        if "content" not in entry:
            raise BadInput(f"{where}: expected a list or {{'content': [...], 'shape': [...]}}")
        content, shape = entry["content"], entry.get("shape")
    else:
        content, shape = entry, None
    flat = np.array(content, dtype=np.object_).reshape(-1)
    if t.datatype == "BYTES":
        arr = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in flat], dtype=np.object_)
    else:
        try:
            arr = flat.astype(triton_to_np_dtype(t.datatype))
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{where}: not {t.datatype} data ({exc})") from None
    if shape is None:
        dims = list(t.shape[1:] if batched else t.shape)
        known = int(np.prod([d for d in dims if d > 0])) if dims else 1
        if dims.count(-1) == 1:
            dims[dims.index(-1)] = arr.size // max(known, 1)
        shape = dims
    try:
        arr = arr.reshape(shape)
    except ValueError:
        raise BadInput(f"{where}: {arr.size} values do not fit shape {shape}") from None
    if batched:
        arr = np.repeat(arr[None], batch_size, axis=0)
    return arr


def payloads_from_file(spec: ModelSpec, path: Path, batch_size: int) -> list[Payload]:
    """perf_analyzer's input-data JSON (`{"data": [{name: [...] | {"content", "shape"}}, …]}`) or one mapping."""
    try:
        data = json.loads(_read_text(path, "--input-data"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"--input-data {path}: invalid JSON at line {exc.lineno}, column {exc.colno}") from None
    entries = data.get("data") if isinstance(data, dict) and "data" in data else [data]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise BadInput(f"--input-data {path}: expected {{\"data\": [{{input: values}}, …]}}")
    batched = spec.max_batch_size > 0
    payloads = []
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - {t.name for t in spec.inputs})
        if unknown:
            raise BadInput(f"--input-data {path}: entry {i}: {', '.join(unknown)} not an input of {spec.name}")
        tensors = []
        for t in spec.inputs:
            if t.name in entry:
                arr = _array_from(entry[t.name], t, batched, batch_size, f"--input-data entry {i} {t.name}")
                tensors.append(Tensor(t.name, t.datatype, arr))
            elif not t.optional:
                raise BadInput(f"--input-data {path}: entry {i} lacks required input {t.name!r}")
        payloads.append(Payload(tensors))
    return payloads


def _read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_prompts(path: Path, default_max_tokens: int) -> list[tuple[str, int]]:
    """(text, max_tokens) per line of a JSONL prompts file; BadInput names the line of anything unusable."""
    prompts = []
    for n, line in enumerate(_read_text(path, "--prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadInput(f"--prompts {path}: line {n} is not JSON") from None
        text = row.get("text", row.get("prompt", row.get("text_input"))) if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise BadInput(f"--prompts {path}: line {n} needs a \"text\" string")
        max_tokens = row.get("max_tokens", default_max_tokens) if isinstance(row, dict) else default_max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadInput(f"--prompts {path}: line {n}: max_tokens must be a positive integer, got {max_tokens!r}")
        prompts.append((text, max_tokens))
    if not prompts:
        raise BadInput(f"--prompts {path}: no prompts")
    return prompts


def llm_payloads(spec: ModelSpec, prompts: Optional[Path], input_tokens: int, output_tokens: int,
                 stream: bool, seed: int, count: int = 64) -> list[Payload]:
    """Requests for a `generate`-style model: text_input, and max_tokens / stream where the model takes them."""
    if spec.input("text_input") is None:
        raise BadInput(f"model {spec.name} has no text_input: not a generate-style LLM (drop --llm)")
    if prompts is not None:
        rows = read_prompts(prompts, output_tokens)
    else:
        rng = np.random.default_rng(seed)
        rows = [(_words(input_tokens, rng), output_tokens) for _ in range(count)]
    batched = spec.max_batch_size > 0

    def scalar(name: str, datatype: str, value) -> Tensor:
        shape = [1, 1] if batched else [1]
        if datatype == "BYTES":
            return Tensor(name, datatype, np.array([value.encode()], dtype=np.object_).reshape(shape))
        return Tensor(name, datatype, np.array([value], dtype=triton_to_np_dtype(datatype)).reshape(shape))

    payloads = []
    for text, max_tokens in rows:
        tensors = [scalar("text_input", "BYTES", text)]
        # ignore_eos (where the model takes it): every request generates exactly max_tokens, so runs compare
        for name, value in (("max_tokens", max_tokens), ("stream", stream), ("ignore_eos", True)):
            t = spec.input(name)
            if t is not None:
                tensors.append(scalar(name, t.datatype, value))
        payloads.append(Payload(tensors, max_tokens))
    return payloads
