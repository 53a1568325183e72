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
from .tools import ToolSpec, parse_tools, render_prompt
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
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1 (this server returns one choice per request), got {n}", "n")
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
    generation = Generation(
        prompt=prompt, max_tokens=max_tokens,
        temperature=temperature if temperature is not None else defaults.get("temperature"),
        top_p=top_p if top_p is not None else defaults.get("top_p"),
        seed=seed, stop=stop, stream=stream, ignore_eos=ignore_eos,
        # keep `</think>` in the text where the model can (the reasoning split, and the raw text, need it)
        skip_special_tokens=client_skip and not keep_specials,
    )
    strip = keep_specials and client_skip and "skip_special_tokens" in model.inputs
    return Parsed(model_id, model, generation, prompt_tokens, stream, include_usage, separate, strip_special=strip,
                  tools=tools)


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
