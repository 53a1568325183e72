"""Function tools: the request's `tools` / `tool_choice` validated, the prompt rendered with them, and the model's
tool calls parsed out of its answer (whole, or as the text streams in) into OpenAI's `tool_calls`.

R1's tool-call format (DeepSeek-R1's chat template, and what vLLM's deepseek_v3 / llama.cpp's R1 parsers read):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"argument": "value"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>OTHER ... <｜tool▁call▁end｜><｜tool▁calls▁end｜>

Calls are parsed from the answer (after `</think>`), never from the reasoning. Text before the calls stays the
answer's `content`; from a call that does not parse (arguments that are not JSON, an unknown function, cut by
max_tokens) on, the rest is left in `content` as the model wrote it — never dropped. Whole answers and streams are
parsed by the same code (`ToolStreamParser`), so both give the same calls and content.

`tool_choice`: `auto` (the default with tools: the model may call, parsed as above), `none` (the tools are not
shown to the model and nothing is parsed), `required` and a named function: the answer after `</think>` is
constrained by the generate model's guided decoding (`guided_decoding_guide_type=json_schema`) to a JSON schema
built from the functions' parameters, as vLLM builds it — for a named function its arguments, for `required` an
array of `{"name", "parameters"}` objects (one item at most with `parallel_tool_calls: false`) — and that JSON is
returned as `tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

from .errors import ApiError

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>[^\n<]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*?)\n```(?:json)?\n"
                   r"(?P<args>.*?)\n?```\s*" + re.escape(CALL_END), re.S)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolSpec:
    tools: list[dict]  # as the request gave them (validated): what the template renders
    names: set[str]
    choice: str = "auto"  # auto | required | named
    forced: Optional[str] = None  # named: the function every answer calls
    parallel: bool = True

    def guide(self) -> Optional[str]:
        """The JSON schema the answer is constrained to when a call is forced (vLLM's shapes): the named function's
        arguments, or for `required` an array of {name, parameters} objects, one of the tools each."""
        params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}
        if self.forced is not None:
            return json.dumps(params[self.forced], ensure_ascii=False)
        if self.choice != "required":
            return None
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for name, schema in params.items()]}
        array: dict = {"type": "array", "minItems": 1, "items": items}
        if not self.parallel:
            array["maxItems"] = 1
        return json.dumps(array, ensure_ascii=False)

    def forced_calls(self, content: str) -> Optional[list[dict]]:
        """The calls of an answer constrained by `guide()`, or None when it is not complete JSON (cut by max_tokens)."""
        try:
            value = json.loads(content)
        except ValueError:
            return None
        if self.forced is not None:
            pairs = [(self.forced, value)]
        elif isinstance(value, list) and all(isinstance(v, dict) and v.get("name") in self.names for v in value):
            pairs = [(v["name"], v.get("parameters", {})) for v in value]
        else:
            return None
        return [{"id": _call_id(), "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in pairs]


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def parse_tools(body: dict) -> Optional[ToolSpec]:
    """The request's tools, or None when there are none or tool_choice is `none`."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not tools:
        tools = None
    if tools is None:
        if choice not in (None, "none"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return None
    names: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{at} must be an object", at, "invalid_type")
        unknown = set(tool) - {"type", "function"}
        if unknown:
            raise _bad(f"unknown field {at}.{sorted(unknown)[0]}", f"{at}.{sorted(unknown)[0]}", "unknown_parameter")
        if tool.get("type") != "function":
            raise _bad(f"{at}.type {tool.get('type')!r} is not supported: function tools only", f"{at}.type",
                       "unsupported_value")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{at}.function must be an object", f"{at}.function", "invalid_type")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise _bad(f"unknown field {at}.function.{sorted(unknown)[0]}", f"{at}.function.{sorted(unknown)[0]}",
                       "unknown_parameter")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"{at}.function.name must be 1-64 letters, digits, _ or -", f"{at}.function.name")
        if name in names:
            raise _bad(f"{at}.function.name {name!r} is given twice", f"{at}.function.name")
        names.add(name)
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise _bad(f"{at}.function.{key} has the wrong type", f"{at}.function.{key}", "invalid_type")
    parallel = body.get("parallel_tool_calls")
    parallel = True if parallel is None else parallel  # the JSON type is checked by the registry
    if choice is None or choice == "auto":
        if not parallel:
            raise _bad("parallel_tool_calls=false with tool_choice auto: nothing limits the model to one call (use "
                       "tool_choice required or a named function, which constrain the answer)", "parallel_tool_calls",
                       "unsupported_value")
        strict = next((i for i, t in enumerate(tools) if t["function"].get("strict")), None)
        if strict is not None:
            raise _bad(f"tools[{strict}].function.strict with tool_choice auto: the arguments are constrained only "
                       "when the call is forced (tool_choice required or a named function)",
                       f"tools[{strict}].function.strict", "unsupported_value")
        return ToolSpec(tools, names)
    if choice == "none":
        return None
    if choice == "required":
        return ToolSpec(tools, names, "required", parallel=parallel)
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or fn.get("name") not in names:
            raise _bad("tool_choice must name one of the tools: {\"type\": \"function\", \"function\": "
                       "{\"name\": …}}", "tool_choice")
        return ToolSpec(tools, names, "named", forced=fn["name"])
    raise _bad("tool_choice must be none, auto, required or a named function", "tool_choice")


def forced_guide(spec: Optional[ToolSpec], model, guide_type: str, guide: str) -> tuple[str, str]:
    """The generate model's guide for a forced call (required / named), else the request's own (response_format)."""
    schema = spec.guide() if spec is not None else None
    if schema is None:
        return guide_type, guide
    if guide_type:
        raise _bad("response_format cannot be combined with tool_choice required or a named function (both constrain "
                   "the answer)", "response_format", "unsupported_value")
    if "guided_decoding_guide_type" not in model.inputs:
        raise _bad(f"tool_choice {spec.choice} is not supported by model {model.name} (forcing a call needs its generate "
                   "model's guided_decoding_guide_type input)", "tool_choice", "unsupported_value")
    return "json_schema", schema


def render_prompt(template, messages: list[dict], spec: Optional[ToolSpec], add_generation_prompt: bool = True) -> str:
    prompt = template.render(messages, add_generation_prompt)
    if spec is None:
        return prompt
    with_tools = template.render(messages, add_generation_prompt, tools=spec.tools)
    if with_tools == prompt:
        raise _bad("tools: this model's chat template does not render tools (the model would never see them)",
                   "tools", "unsupported_value")
    return with_tools


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(block: str, names: set[str]) -> Optional[list[dict]]:
    """The calls in `block` (one or more `<｜tool▁call▁begin｜>…<｜tool▁call▁end｜>`, within or without the
    calls tags), or None when any part of it does not parse."""
    body = block[len(CALLS_BEGIN):] if block.startswith(CALLS_BEGIN) else block
    body = body.strip()
    if body.endswith(CALLS_END):
        body = body[: -len(CALLS_END)].rstrip()
    calls, at = [], 0
    for m in _CALL.finditer(body):
        if body[at:m.start()].strip():
            return None
        at = m.end()
        name, args = m.group("name").strip(), m.group("args").strip()
        if m.group("type").strip() != "function" or name not in names:
            return None
        try:
            json.loads(args)
        except ValueError:
            return None
        calls.append({"id": _call_id(), "type": "function", "function": {"name": name, "arguments": args}})
    if not calls or body[at:].strip():
        return None
    return calls


def split_whole(content: str, names: set[str]) -> tuple[str, list[dict]]:
    """(content, calls) of a whole answer: what the stream parser gives for it in one piece."""
    parser = ToolStreamParser(names)
    out, calls = parser.feed(content)
    rest, more = parser.finish()
    return out + rest, calls + more


def _held_prefix(text: str, tag: str) -> int:
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


@dataclass
class ToolStreamParser:
    """`feed(content piece)` → (content to send, complete calls to send as deltas); `finish()` the same for the end.
    Content passes through until the calls begin (a tail that may begin `<｜tool▁calls▁begin｜>` is held back);
    from there each call leaves as soon as its `<｜tool▁call▁end｜>` has arrived and it parses."""

    names: set[str]
    buf: str = ""
    in_calls: bool = False
    failed: bool = False
    calls: list[dict] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        if self.failed:
            out, self.buf = self.buf, ""
            return out, []
        out = ""
        if not self.in_calls:
            at = self.buf.find(CALLS_BEGIN)
            if at < 0:
                keep = _held_prefix(self.buf, CALLS_BEGIN)
                out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out, []
            out, self.buf, self.in_calls = self.buf[:at], self.buf[at + len(CALLS_BEGIN):], True
        done = []
        while True:
            end = self.buf.find(CALL_END)
            if end < 0:
                break
            piece, rest = self.buf[: end + len(CALL_END)], self.buf[end + len(CALL_END):]
            calls = parse_calls(piece.lstrip(), self.names)
            if calls is None:
                return out + self._fail(), done
            self.calls.extend(calls)
            done.extend(calls)
            self.buf = rest
        return out, done

    def _fail(self) -> str:
        """A call that does not parse: what is left of the block goes out as content, as the model wrote it
        (calls already sent stay sent)."""
        self.failed = True
        out, self.buf = (CALLS_BEGIN if not self.calls else "") + self.buf, ""
        return out

    def finish(self) -> tuple[str, list[dict]]:
        rest = self.buf.strip()
        if self.failed or not self.in_calls:
            out, self.buf = self.buf, ""
            return out, []
        if rest in ("", CALLS_END) and self.calls:
            self.buf = ""
            return "", []
        return self._fail(), []


def tool_call_delta(call: dict, index: int, choice: int = 0) -> dict:
    """One whole call as a stream choice: id, name and all its arguments in one delta (OpenAI's clients accumulate
    `arguments` pieces by index; one piece is the case of a call that arrives complete)."""
    return {"index": choice, "delta": {"tool_calls": [{"index": index, **call}]}, "logprobs": None,
            "finish_reason": None}


class ForcedCallParser:
    """The stream parser's interface for a forced call: the constrained answer is JSON, not text for the client, so
    it is held until the end and returned as the calls (as the model wrote it, as content, when it is not complete
    JSON: cut by max_tokens)."""

    def __init__(self, spec: ToolSpec):
        self.spec, self.buf, self.calls = spec, "", []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        return "", []

    def finish(self) -> tuple[str, list[dict]]:
        buf, self.buf = self.buf, ""
        calls = self.spec.forced_calls(buf.strip()) if buf.strip() else None
        if calls is None:
            return buf, []
        self.calls = calls
        return "", calls


def answer_parser(spec: ToolSpec):
    return ForcedCallParser(spec) if spec.choice in ("required", "named") else ToolStreamParser(spec.names)


def split_answer(content: str, spec: ToolSpec) -> tuple[str, list[dict]]:
    """(content, calls) of a whole answer, by the parser a stream of it would use."""
    parser = answer_parser(spec)
    out, calls = parser.feed(content)
    rest, more = parser.finish()
    return out + rest, calls + more
