"""`POST /v1/embeddings` for the encoder models a repository serves: the `embed` ensemble (text → tokenizer →
encoder → pooled embeddings) for text inputs, the encoder model itself for token-id inputs.

What the gateway reads from the repository (never from Triton): the ensemble's config (input `text` BYTES, output
`embeddings` FP32 [dim], max_batch_size), its tokenizer step's model (its tokenizer files and `max_length`) and
its encoder step's model (token inputs). An input longer than `max_length` tokens is refused (the tokenizer model
would truncate it: an embedding of part of the text, which the caller could not see), counted with the same
tokenizer files. Inputs are sent in requests of at most max_batch_size rows, all at once (Triton's dynamic batcher
groups them). `encoding_format: base64` is the little-endian float32 bytes, as OpenAI sends them (the official
client asks for base64 by default and decodes it).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import serialize_byte_tensor

from ..core.errors import BadInput
from .errors import ApiError
from .fields import EMBEDDINGS, check_fields

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


@dataclass
class EmbeddingModel:
    name: str  # the ensemble (the model id)
    ids: list[str]
    dim: int
    max_batch_size: int
    max_length: int
    tokenizer_dir: Path
    encoder: str  # the encoder step's model: token-id inputs go there
    encoder_inputs: list[str]
    created: int
    _tokenizer: object = field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.tokenizer_dir / "tokenizer.json"
            if not path.is_file():
                raise BadInput(f"{self.name}: no tokenizer at {path}")
            tok = Tokenizer.from_file(str(path))
            tok.no_truncation()  # counted whole: a text over max_length is refused, not cut
            tok.no_padding()
            self._tokenizer = tok
        return self._tokenizer


def _config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise BadInput(f"{path}: {exc}") from None


def _param(config: mc.ModelConfig, key: str) -> Optional[str]:
    p = config.parameters.get(key)
    return p.string_value if p is not None else None


def read_embedding_model(model_dir: Path) -> Optional[EmbeddingModel]:
    """The embedding ensemble in `model_dir`, or None if it is none."""
    path = model_dir / "config.pbtxt"
    config = _config(path)
    inputs = {i.name: i for i in config.input}
    outputs = {o.name: o for o in config.output}
    if config.platform != "ensemble" or "text" not in inputs or "embeddings" not in outputs:
        return None
    steps = list(config.ensemble_scheduling.step)
    tok_step = next((s for s in steps if "text" in s.input_map), None)
    enc_step = next((s for s in steps if "embeddings" in s.output_map), None)
    if tok_step is None or enc_step is None:
        raise BadInput(f"{path}: an embedding ensemble needs a tokenizer step (text in) and an encoder step (embeddings out)")
    tok_dir = model_dir.parent / tok_step.model_name
    tok_config = _config(tok_dir / "config.pbtxt")
    versions = sorted((p for p in tok_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise BadInput(f"{tok_dir}: no version directory")
    enc_config = _config(model_dir.parent / enc_step.model_name / "config.pbtxt")
    dims = [d for d in outputs["embeddings"].dims if d > 0]
    name = config.name or model_dir.name
    return EmbeddingModel(
        name=name, ids=[name], dim=dims[-1] if dims else 0, max_batch_size=max(config.max_batch_size, 1),
        max_length=int(_param(tok_config, "max_length") or 512),
        tokenizer_dir=versions[-1] / (_param(tok_config, "tokenizer") or "tokenizer"),
        encoder=enc_step.model_name, encoder_inputs=[i.name for i in enc_config.input],
        created=int(path.stat().st_mtime),
    )


def read_embedding_models(repositories: list[Path]) -> dict[str, EmbeddingModel]:
    found: dict[str, EmbeddingModel] = {}
    for repo in repositories:
        repo = Path(repo)
        if not repo.is_dir():
            continue  # read_repositories says so
        for model_dir in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
            model = read_embedding_model(model_dir)
            if model is not None:
                if model.name in found:
                    raise BadInput(f"embedding model {model.name!r} is served twice")
                found[model.name] = model
    return found


@dataclass
class EmbeddingRequest:
    model_id: str
    model: EmbeddingModel
    texts: Optional[list[str]]  # text inputs, or
    token_ids: Optional[list[list[int]]]  # token-id inputs
    counts: list[int]  # tokens per input (the usage)
    base64: bool


def _inputs(value) -> tuple[Optional[list[str]], Optional[list[list[int]]]]:
    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids (not empty)", "input")
    if all(isinstance(x, str) for x in value):
        return list(value), None
    if is_ids(value):
        return None, [list(value)]
    if all(is_ids(x) for x in value):
        return None, [list(x) for x in value]
    raise ApiError(400, "input must be a string, a list of strings, a list of token ids or a list of lists of token "
                   "ids (not mixed, none empty)", "input")


def parse_embedding_request(body: dict, models: dict[str, EmbeddingModel], llms: dict) -> EmbeddingRequest:
    check_fields(body, EMBEDDINGS)
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(400, "model is required (GET /v1/models lists them)", "model")
    if model_id not in models:
        if model_id in llms:
            raise ApiError(400, f"`{model_id}` is not an embedding model (served: {', '.join(sorted(models)) or 'none'})",
                           "model", "model_not_embedding")
        raise ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
    model = models[model_id]
    if "input" not in body:
        raise ApiError(400, "input is required", "input")
    texts, token_ids = _inputs(body["input"])
    n = len(texts if texts is not None else token_ids)
    if n > MAX_INPUTS:
        raise ApiError(400, f"at most {MAX_INPUTS} inputs per request, got {n}", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != model.dim:
        raise ApiError(400, f"dimensions: {model_id} makes {model.dim}-dimensional embeddings and does not shorten "
                       f"them, got {dims}", "dimensions", "unsupported_value")
    # one input (a string, or one list of token ids) is named `input`, one of several `input[i]`
    one = isinstance(body["input"], str) or (token_ids is not None and not isinstance(body["input"][0], list))

    def where(i: int) -> str:
        return "input" if one else f"input[{i}]"

    if texts is not None:
        counts = []
        for i, text in enumerate(texts):
            if not text:
                raise ApiError(400, f"{where(i)} is empty", where(i))
            counts.append(len(model.tokenizer.encode(text).ids))
    else:
        vocab = model.tokenizer.get_vocab_size(with_added_tokens=True)
        counts = [len(ids) for ids in token_ids]
        for i, ids in enumerate(token_ids):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"{where(i)} holds token id {bad}, outside the vocabulary (0..{vocab - 1})", where(i))
    for i, count in enumerate(counts):
        if count > model.max_length:
            raise ApiError(400, f"{where(i)} has {count} tokens; {model_id} embeds at most {model.max_length} (an "
                           "input is never truncated)", where(i), "context_length_exceeded")
    return EmbeddingRequest(model_id, model, texts, token_ids, counts, fmt == "base64")


def _tensor(req: pb.ModelInferRequest, name: str, datatype: str, array: np.ndarray) -> None:
    req.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if datatype == "BYTES":
        req.raw_input_contents.append(serialize_byte_tensor(array).item())
    else:
        req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())


def triton_requests(r: EmbeddingRequest) -> list[pb.ModelInferRequest]:
    """One request per max_batch_size rows: text to the ensemble, token ids (right-padded with 0 under a 0 mask, as
    the tokenizer model pads) to the encoder."""
    m, out = r.model, []
    rows = r.texts if r.texts is not None else r.token_ids
    for at in range(0, len(rows), m.max_batch_size):
        part = rows[at: at + m.max_batch_size]
        if r.texts is not None:
            req = pb.ModelInferRequest(model_name=m.name)
            _tensor(req, "text", "BYTES", np.array([[t.encode("utf-8")] for t in part], dtype=np.object_))
        else:
            req = pb.ModelInferRequest(model_name=m.encoder)
            length = max(len(ids) for ids in part)
            ids = np.zeros((len(part), length), np.int64)
            mask = np.zeros((len(part), length), np.int64)
            for row, seq in enumerate(part):
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            for name in m.encoder_inputs:
                _tensor(req, name, "INT64", feeds[name])
            req.outputs.add(name="embeddings")
        out.append(req)
    return out


def embeddings_of(resp: pb.ModelInferResponse) -> np.ndarray:
    for i, o in enumerate(resp.outputs):
        if o.name == "embeddings":
            return np.frombuffer(resp.raw_output_contents[i], dtype=np.float32).reshape(list(o.shape))
    raise ApiError(502, "the embedding model returned no embeddings")


async def embed(client, r: EmbeddingRequest, timeout_s: float) -> dict:
    responses = await asyncio.gather(*(client.infer(req, timeout_s) for req in triton_requests(r)))
    vectors = np.concatenate([embeddings_of(resp) for resp in responses]).astype("<f4", copy=False)
    data = []
    for i, v in enumerate(vectors):
        value = base64.b64encode(v.tobytes()).decode("ascii") if r.base64 else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    total = sum(r.counts)
    return {"object": "list", "data": data, "model": r.model_id, "usage": {"prompt_tokens": total, "total_tokens": total}}
