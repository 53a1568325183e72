"""What the gateway knows of a served LLM, read from the model repository Triton serves (never from Triton's
weights): the `generate`-style models (text_input in, text_output out, decoupled), their inputs' dtypes and
shapes (config.pbtxt), their limits (config.pbtxt parameters), and their tokenizer files (generate/1/tokenizer/:
tokenizer.json for token counts, the chat template, generation_config.json for default sampling)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..core.errors import BadInput

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class InputSpec:
    datatype: str  # Triton's wire name: BYTES, INT32, UINT64, BOOL, FP32, …
    dims: tuple[int, ...]  # config dims (without the batch axis when max_batch_size > 0)


@dataclass
class Limits:
    max_input_len: int
    max_output_len: int
    max_sequence_len: int
    default_max_tokens: int


@dataclass
class ServedModel:
    """One LLM entry model as the gateway serves it. `name` is the Triton model; `ids` the OpenAI model ids
    that reach it (the Triton name, plus any --served-model-name)."""

    name: str
    ids: list[str]
    max_batch_size: int
    inputs: dict[str, InputSpec]
    outputs: set[str]
    limits: Limits
    tokenizer_dir: Path
    created: int  # config.pbtxt mtime: OpenAI's `created` of a model
    eos_token_ids: list[int] = field(default_factory=list)
    default_sampling: dict[str, float] = field(default_factory=dict)  # temperature / top_p, before the profile's
    _tokenizer: object = None
    _template: object = None
    _think_end_id: Optional[int] = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.tokenizer_dir / "tokenizer.json"
            if not path.is_file():
                raise BadInput(f"{self.name}: no tokenizer at {path}")
            self._tokenizer = Tokenizer.from_file(str(path))
            self._think_end_id = self._tokenizer.token_to_id(THINK_END)
        return self._tokenizer

    @property
    def think_end_id(self) -> Optional[int]:
        """The token id of `</think>` where the vocabulary has one (R1 family): the model reasons."""
        _ = self.tokenizer
        return self._think_end_id

    @property
    def template(self):
        if self._template is None:
            from .chat import ChatTemplate

            self._template = ChatTemplate.from_tokenizer_dir(self.tokenizer_dir, self.name)
        return self._template

    def special_texts(self, keep: tuple[str, ...] = ()) -> list[str]:
        """The text of the tokenizer's special tokens, less `keep` and any tool-call tag (the parsers read those)."""
        added = self.tokenizer.get_added_tokens_decoder().values()
        return [t.content for t in added if t.special and t.content not in keep and "tool" not in t.content]

    def count_tokens(self, prompt: str) -> int:
        # the same call the generate model makes (tokenizer.encode with its default special-token handling)
        return len(self.tokenizer.encode(prompt).ids)

    def surely_fits(self, prompt: str) -> bool:
        """True when the prompt cannot exceed max_input_len, without tokenizing it: no tokenizer r1deploy serves
        (byte-level BPE, byte fallback, WordPiece) makes more tokens than UTF-8 bytes, plus the special tokens
        its post-processor adds. Tokenizing a 300-token prompt costs ~0.6 ms here, on the way to the first
        token of every request; the count is needed only for long prompts and, for a model that does not
        return its own count, for the usage after the answer."""
        extra = self.tokenizer.num_special_tokens_to_add(False)
        return len(prompt.encode("utf-8")) + extra <= self.limits.max_input_len


def _param(config: mc.ModelConfig, key: str) -> Optional[str]:
    p = config.parameters.get(key)
    return p.string_value if p is not None else None


def _wire(dtype: int) -> str:
    name = mc.DataType.Name(dtype)[len("TYPE_"):]
    return "BYTES" if name == "STRING" else name


def is_llm_entry(config: mc.ModelConfig) -> bool:
    inputs = {i.name for i in config.input}
    outputs = {o.name for o in config.output}
    return "text_input" in inputs and "text_output" in outputs and config.model_transaction_policy.decoupled


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_model(model_dir: Path) -> Optional[ServedModel]:
    """The LLM entry model in `model_dir` (a directory of a model repository), or None if it is none."""
    path = model_dir / "config.pbtxt"
    try:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise BadInput(f"{path}: {exc}") from None
    if not is_llm_entry(config):
        return None
    name = config.name or model_dir.name
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise BadInput(f"{model_dir}: no version directory")
    tokenizer_dir = versions[-1] / (_param(config, "tokenizer") or "tokenizer")

    def limit(key: str, default: Optional[int] = None) -> int:
        text = _param(config, key)
        if text is None:
            if default is None:
                raise BadInput(f"{path}: parameter {key!r} missing (rewrite the repository with `r1deploy repository`)")
            return default
        try:
            return int(text)
        except ValueError:
            raise BadInput(f"{path}: parameter {key!r} is not an integer: {text!r}") from None

    max_output = limit("max_output_len")
    limits = Limits(limit("max_input_len"), max_output, limit("max_sequence_len"),
                    limit("default_max_tokens", min(64, max_output)))
    try:
        eos = json.loads(_param(config, "eos_token_ids") or "[]")
    except ValueError:
        eos = []
    generation = _json_file(tokenizer_dir / "generation_config.json")
    sampling = {k: float(generation[k]) for k in ("temperature", "top_p") if isinstance(generation.get(k), (int, float))}
    return ServedModel(
        name=name, ids=[name], max_batch_size=config.max_batch_size,
        inputs={i.name: InputSpec(_wire(i.data_type), tuple(i.dims)) for i in config.input},
        outputs={o.name for o in config.output}, limits=limits, tokenizer_dir=tokenizer_dir,
        created=int(path.stat().st_mtime), eos_token_ids=list(eos), default_sampling=sampling,
    )


def read_repositories(repositories: list[Path], aliases: list[str] = (), require: bool = True) -> dict[str, ServedModel]:
    """OpenAI model id → ServedModel, for every LLM entry model in the repositories. `aliases`
    (--served-model-name) name the only LLM, as `r1deploy serve` users call the model by its own name.
    `require=False`: none is fine (the repositories serve embedding models)."""
    found: list[ServedModel] = []
    for repo in repositories:
        repo = Path(repo)
        if not repo.is_dir():
            raise BadInput(f"model repository not found: {repo}")
        for model_dir in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
            model = read_model(model_dir)
            if model is not None:
                found.append(model)
    if not found and not require:
        return {}
    if not found:
        raise BadInput(f"no LLM (a decoupled model with text_input and text_output) in {', '.join(map(str, repositories))}")
    if aliases:
        if len(found) > 1:
            raise BadInput(f"--served-model-name needs exactly one LLM; the repositories hold {', '.join(m.name for m in found)}")
        found[0].ids += [a for a in aliases if a != found[0].name]
    by_id: dict[str, ServedModel] = {}
    for model in found:
        for model_id in model.ids:
            if model_id in by_id:
                raise BadInput(f"model id {model_id!r} is served twice")
            by_id[model_id] = model
    return by_id
