"""OpenAI's wire format: request bodies validated into a `Generation` (nothing reaches Triton unvalidated), errors
in OpenAI's shape, and the response / chunk objects."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .chat import TemplateRejected
from .errors import ApiError
from .messages import parse_messages
from .models import ServedModel
from .tools import ToolSpec, forced_guide, parse_tools, render_prompt
from .triton import Generation

MAX_STOP_STRINGS = 16


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests deeper than `limit` (iterative: a deep value cannot exhaust the stack here)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_body(raw: bytes, max_depth: int) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if json_depth_exceeds(body, max_depth):
        raise ApiError(400, f"JSON nested deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(raw):
        unencodable_string(body)
    return body


# a lone surrogate can only come from a \uD800-\uDFFF escape (raw bytes that are not UTF-8 fail to parse): only a
# body with such an escape is walked (a valid pair, an escaped emoji, is joined by the parser and passes the walk)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def unencodable_string(body: dict) -> None:
    """400 naming a field (`messages[0].content`, `stop[1]`, a key's object) holding a string that is not
    encodable as UTF-8 (a lone surrogate such as "a\\ud800b"), before anything encodes it."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                where = f"{path}.{key}" if path else str(key)
                if not _encodable(key):
                    raise ApiError(400, f"a field name in {path or 'the body'} is not valid Unicode (a lone "
                                   "surrogate)", path or None, "invalid_string")
                stack.append((value, where))
        elif isinstance(item, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(item))
        elif isinstance(item, str) and not _encodable(item):
            raise ApiError(400, f"{path} is not valid Unicode: it holds a lone surrogate (a \\uD800-\\uDFFF escape "
                           "without its pair)", path, "invalid_string")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> Optional[float]:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number", key)
    if value > hi or value < lo or (lo_open and value == lo):
        raise ApiError(400, f"{key} must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}", key)
    return float(value)


def _integer(body: dict, key: str) -> Optional[int]:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", key)
    return value


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return value


@dataclass
class Parsed:
    model_id: str
    model: ServedModel
    generation: Generation
    prompt_tokens: Optional[int]  # None: not counted yet (short enough to need no check)
    stream: bool
    include_usage: bool
    separate_reasoning: bool
    # generate keeps special tokens for the gateway's reasoning split: the others are taken out of the text here
    strip_special: bool = False
    tools: Optional[ToolSpec] = None  # chat with tools (tool_choice not none): the answer's calls are parsed
    n: int = 1  # choices returned (generation.n may be more: best_of)
    logprobs: bool = False  # the client asked for logprobs (generation.logprobs may be set for best_of alone)
    top_logprobs: int = 0
    echo: bool = False  # completions: the prompt before each choice's text


MAX_N = 16  # choices (and best_of) of one request: the generate model's limit
MAX_TOP_LOGPROBS = 20


@dataclass
class Sampling:
    """The sampling fields of one request, validated (see `_sampling_fields`)."""

    n: int = 1
    best_of: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    top_k: Optional[int] = None
    logit_bias: dict = None  # type: ignore[assignment]


# request field → the generate input it needs (a model without that input gets a 400 naming the field)
_NEEDS_INPUT = {
    "n": "num_return_sequences", "best_of": "num_return_sequences", "logprobs": "return_log_probs",
    "top_logprobs": "top_logprobs", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens", "logit_bias": "logit_bias", "top_k": "top_k",
}


def _needs(model: ServedModel, key: str) -> None:
    name = _NEEDS_INPUT[key]
    if name not in model.inputs:
        raise ApiError(400, f"{key} is not supported by model {model.name} (its generate model has no input "
                       f"{name})", key)


def _response_format(body: dict, model: ServedModel) -> tuple[str, str]:
    """`response_format` → (guided_decoding_guide_type, guided_decoding_guide): json_object, or json_schema with
    its schema (strict or not, it is enforced token by token); text is the default."""
    value = body.get("response_format")
    if value is None:
        return "", ""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return "", ""
    if kind not in ("json_object", "json_schema"):
        raise ApiError(400, "response_format.type must be text, json_object or json_schema", "response_format")
    if "guided_decoding_guide_type" not in model.inputs:
        raise ApiError(400, f"response_format {kind} is not supported by model {model.name} (its generate model has "
                       "no input guided_decoding_guide_type)", "response_format")
    if kind == "json_object":
        return kind, ""
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object", "response_format")
    return kind, json.dumps(spec["schema"], ensure_ascii=False)


def _sampling_fields(body: dict, chat: bool, model: ServedModel, stream: bool, max_tokens: int) -> Sampling:
    """n, best_of, logprobs / top_logprobs, echo, suffix, the penalties, min_tokens, logit_bias: applied (each
    needs its generate input) or refused with a 400 naming the field."""
    out = Sampling(logit_bias={})
    n = _integer(body, "n")
    if n is not None:
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"n must lie in 1..{MAX_N}, got {n}", "n")
        if n > 1:
            _needs(model, "n")
        out.n = out.best_of = n
    if not chat:
        best_of = _integer(body, "best_of")
        if best_of is not None:
            if not out.n <= best_of <= MAX_N:
                raise ApiError(400, f"best_of must lie in n ({out.n})..{MAX_N}, got {best_of}", "best_of")
            if best_of > out.n:
                if stream:
                    raise ApiError(400, "best_of > n cannot be streamed (the best are known at the end)", "best_of")
                _needs(model, "best_of")
                _needs(model, "logprobs")
            out.best_of = best_of
        suffix = body.get("suffix")
        if suffix is not None and suffix != "":
            raise ApiError(400, f"suffix is not supported: model {model.name} has no fill-in-the-middle tokens",
                           "suffix")
        out.echo = _flag(body, "echo", False)
        logprobs = body.get("logprobs")
        if logprobs is not None and logprobs is not False:
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS} (the most likely tokens "
                               "returned per position)", "logprobs")
            _needs(model, "logprobs")
            if logprobs:
                _needs(model, "top_logprobs")
            out.logprobs, out.top_logprobs = True, logprobs
        if out.echo and out.logprobs:
            raise ApiError(400, "echo with logprobs needs the prompt's logprobs, which this server does not compute",
                           "echo")
    else:
        if body.get("best_of") is not None:
            raise ApiError(400, "best_of is a field of /v1/completions; chat completions return n choices", "best_of")
        out.logprobs = _flag(body, "logprobs", False)
        top = _integer(body, "top_logprobs")
        if top is not None:
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
            if top and not out.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            if top:
                _needs(model, "top_logprobs")
            out.top_logprobs = top
        if out.logprobs:
            _needs(model, "logprobs")
    for key, lo, hi, lo_open in (("presence_penalty", -2.0, 2.0, False), ("frequency_penalty", -2.0, 2.0, False),
                                 ("repetition_penalty", 0.0, 2.0, True)):
        value = _number(body, key, lo, hi, lo_open)
        if value is not None and value != (1.0 if key == "repetition_penalty" else 0.0):
            _needs(model, key)
            setattr(out, key, value)
    min_tokens = _integer(body, "min_tokens")  # vLLM's extension
    if min_tokens:
        if not 0 <= min_tokens <= max_tokens:
            raise ApiError(400, f"min_tokens must lie in 0..max_tokens ({max_tokens}), got {min_tokens}", "min_tokens")
        _needs(model, "min_tokens")
        out.min_tokens = min_tokens
    top_k = _integer(body, "top_k")  # vLLM's extension: 0 and -1 both mean no cut
    if top_k is not None:
        if top_k < -1:
            raise ApiError(400, f"top_k must be -1, 0 (no cut) or a positive number of tokens, got {top_k}", "top_k")
        if top_k > 0:
            _needs(model, "top_k")
            out.top_k = top_k
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise ApiError(400, "logit_bias must be an object of token id → bias", "logit_bias")
        vocab = model.tokenizer.get_vocab_size(with_added_tokens=True)
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id", "logit_bias") from None
            if not 0 <= token < vocab:
                raise ApiError(400, f"logit_bias: token id {token} is outside the vocabulary (0..{vocab - 1})",
                               "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: the bias of token {key} must be a number in [-100, 100]",
                               "logit_bias")
            out.logit_bias[token] = float(value)
        if out.logit_bias:
            _needs(model, "logit_bias")
    return out


def lookup_model(body: dict, models: dict[str, ServedModel]) -> tuple[str, ServedModel]:
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(400, "model is required (GET /v1/models lists them)", "model")
    if model_id not in models:
        raise ApiError(404, f"The model `{model_id}` does not exist (served: {', '.join(sorted(models))})", "model",
                       "model_not_found")
    return model_id, models[model_id]


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "prompt must be a string (or a list of one string): one completion per request", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", "prompt")
    return prompt


def _max_tokens(body: dict, limits) -> int:
    """max_completion_tokens wins over max_tokens, and each one given is checked (a bad one is never hidden)."""
    chosen = None
    for key in ("max_tokens", "max_completion_tokens"):
        value = _integer(body, key)
        if value is not None:
            if not 1 <= value <= limits.max_output_len:
                raise ApiError(400, f"{key} must lie in 1..{limits.max_output_len}, got {value}", key)
            chosen = value
    return limits.default_max_tokens if chosen is None else chosen


def parse_request(body: dict, models: dict[str, ServedModel], chat: bool, profile_sampling: dict) -> Parsed:
    model_id, model = lookup_model(body, models)
    tools = None
    if chat:
        try:
            tools = parse_tools(body)
            prompt = render_prompt(model.template, parse_messages(body), tools)
        except TemplateRejected as exc:
            raise ApiError(400, str(exc), "messages") from None
    else:
        prompt = _prompt(body)
    if not prompt.strip():
        raise ApiError(400, "the prompt is empty", "messages" if chat else "prompt")
    limits = model.limits
    prompt_tokens = None if model.surely_fits(prompt) else model.count_tokens(prompt)
    if prompt_tokens is not None and prompt_tokens > limits.max_input_len:
        raise ApiError(400, f"prompt has {prompt_tokens} tokens; this deployment accepts at most {limits.max_input_len}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    max_tokens = _max_tokens(body, limits)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    defaults = {**model.default_sampling, **profile_sampling}
    seed = _integer(body, "seed")
    seed_spec = model.inputs.get("seed")
    if seed is not None:
        lowest = 0 if seed_spec is not None and seed_spec.datatype.startswith("UINT") else -(2**63)
        if not lowest <= seed < 2**63:
            raise ApiError(400, f"seed must lie in {lowest}..{2**63 - 1}, got {seed}", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    stop = [s for s in stop if s]
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    stream = _flag(body, "stream", False)
    ignore_eos = _flag(body, "ignore_eos", False)  # vLLM's extension, for benchmarks with fixed output lengths
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = bool(options and _flag(options, "include_usage", False))
    separate = _flag(body, "separate_reasoning", True) and chat and model.think_end_id is not None
    # the reasoning split needs `</think>` in the text, the tool parser the tool-call tags (special in R1's vocabulary)
    keep_specials = chat and (model.think_end_id is not None or tools is not None)
    client_skip = _flag(body, "skip_special_tokens", True)
    sampling = _sampling_fields(body, chat, model, stream, max_tokens)
    guide_type, guide = forced_guide(tools, model, *_response_format(body, model))
    generation = Generation(
        prompt=prompt, max_tokens=max_tokens,
        temperature=temperature if temperature is not None else defaults.get("temperature"),
        top_p=top_p if top_p is not None else defaults.get("top_p"),
        seed=seed, stop=stop, stream=stream, ignore_eos=ignore_eos,
        # keep `</think>` in the text where the model can (the reasoning split, and the raw text, need it)
        skip_special_tokens=client_skip and not keep_specials,
        presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty, min_tokens=sampling.min_tokens, top_k=sampling.top_k,
        logit_bias=sampling.logit_bias, n=sampling.best_of,
        # best_of > n ranks the choices by their cumulative logprob
        logprobs=sampling.logprobs or sampling.best_of > sampling.n, top_logprobs=sampling.top_logprobs,
        guide_type=guide_type, guide=guide,
    )
    strip = keep_specials and client_skip and "skip_special_tokens" in model.inputs
    return Parsed(model_id, model, generation, prompt_tokens, stream, include_usage, separate, n=sampling.n,
                  logprobs=sampling.logprobs, top_logprobs=sampling.top_logprobs, echo=sampling.echo,
                  strip_special=strip, tools=tools)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(triton_reason: str) -> str:
    return "length" if triton_reason == "length" else "stop"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def reasoning_fields(text: Optional[str]) -> dict:
    # both names: DeepSeek's API and SGLang say reasoning_content, vLLM says reasoning
    return {"reasoning_content": text, "reasoning": text}


def _token_text(decode, token: int) -> str:
    return decode([token])


def chat_logprobs(decode, tokens: list[int], logprobs: list[float], top_ids: list[list[int]],
                  top_values: list[list[float]], top: int) -> list[dict]:
    """OpenAI's chat `logprobs.content` entries of a run of tokens. `bytes` are the UTF-8 bytes of each token's
    text (a token that holds part of a character decodes to U+FFFD)."""
    out = []
    for i, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        text = _token_text(decode, token)
        alternatives = []
        for tid, value in zip(top_ids[i][:top] if top else [], top_values[i][:top] if top else [], strict=True):
            t = _token_text(decode, tid)
            alternatives.append({"token": t, "logprob": value, "bytes": list(t.encode("utf-8"))})
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": alternatives})
    return out


def completion_logprobs(decode, tokens: list[int], logprobs: list[float], top_ids: list[list[int]],
                        top_values: list[list[float]], top: int, offset: int) -> dict:
    """OpenAI's completions `logprobs` object of a run of tokens; `offset` is the text offset of the first."""
    texts = [_token_text(decode, t) for t in tokens]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    # vLLM's shape: the `top` most likely tokens, and the chosen one (always, so logprobs=0 still names it)
    tops = []
    for i, (text, lp) in enumerate(zip(texts, logprobs, strict=True)):
        entry = {_token_text(decode, tid): v for tid, v in zip(top_ids[i][:top], top_values[i][:top], strict=True)}
        entry.setdefault(text, lp)
        tops.append(entry)
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}
