"""Chat messages, validated field by field per role, into the dicts a chat template reads (as transformers passes
them): `role`, `content` (text), and where given `tool_calls` (assistant) and `tool_call_id` (tool).

Roles: system, developer (OpenAI's newer name for system: rendered as system), user, assistant, tool. Content is a
string or a list of text parts; other part types (images, audio, files) are refused naming the part. A field a
role does not take is refused like an unknown request field (fields.py)."""

from __future__ import annotations

import json
from typing import Any

from .errors import ApiError
from .fields import NOT_APPLICABLE, REFUSED, SUPPORTED, Field


def _m(name, types, status, what, **kw) -> Field:
    return Field(name, tuple(types.split("|")), status, what, refusal=what if status == REFUSED else "", **kw)


_CONTENT = _m("content", "string|array", SUPPORTED, "a string or a list of `text` parts")
_NAME = _m("name", "string", REFUSED, "participant names: the chat template has no place for them")
_COMMON = {"role": _m("role", "string", SUPPORTED, "the role"), "content": _CONTENT, "name": _NAME}

MESSAGE_FIELDS: dict[str, dict[str, Field]] = {
    "system": dict(_COMMON),
    "developer": dict(_COMMON),
    "user": dict(_COMMON),
    "assistant": {
        **_COMMON,
        "content": _m("content", "string|array", SUPPORTED, "a string, text parts, or null with tool_calls"),
        "tool_calls": _m("tool_calls", "array", SUPPORTED, "the calls it made: rendered in the template's format"),
        "reasoning_content": _m("reasoning_content", "string", NOT_APPLICABLE,
                                "an earlier thought: R1's template drops thoughts from the history, as here"),
        "reasoning": _m("reasoning", "string", NOT_APPLICABLE, "as reasoning_content (vLLM's name)"),
        "refusal": _m("refusal", "string", REFUSED, "a refusal in the history: the template has no place for it"),
        "audio": _m("audio", "object", REFUSED, "no audio"),
        "function_call": _m("function_call", "object", REFUSED, "deprecated: use tool_calls"),
    },
    "tool": {
        "role": _COMMON["role"], "content": _CONTENT,
        "tool_call_id": _m("tool_call_id", "string", SUPPORTED, "the call this answers (required)"),
        "name": _m("name", "string", NOT_APPLICABLE, "the function's name: the template places outputs by order"),
    },
}
REFUSED_ROLES = {"function": "the function role is deprecated: use tool"}


def _text(content: Any, where: str, allow_none: bool) -> str | None:
    if content is None:
        return None if allow_none else ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of text parts", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise ApiError(400, f"{at} must be an object", at, "invalid_type")
        kind = part.get("type")
        if kind != "text":
            raise ApiError(400, f"{at}.type {kind!r} is not supported: text parts only (this model reads no images, "
                           "audio or files)", f"{at}.type", "unsupported_value")
        extra = set(part) - {"type", "text"}
        if extra:
            raise ApiError(400, f"unknown field {at}.{sorted(extra)[0]}", f"{at}.{sorted(extra)[0]}", "unknown_parameter")
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{at}.text must be a string", f"{at}.text", "invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(calls: list, where: str) -> list[dict]:
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise ApiError(400, f"{at} must be an object", at, "invalid_type")
        extra = set(call) - {"id", "type", "function"}
        if extra:
            raise ApiError(400, f"unknown field {at}.{sorted(extra)[0]}", f"{at}.{sorted(extra)[0]}", "unknown_parameter")
        if call.get("type", "function") != "function":
            raise ApiError(400, f"{at}.type must be 'function'", f"{at}.type", "unsupported_value")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"{at}.function.name is required", f"{at}.function.name", "invalid_type")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise ApiError(400, f"{at}.function.arguments must be a JSON string", f"{at}.function.arguments",
                           "invalid_type")
        try:
            json.loads(arguments)
        except ValueError:
            raise ApiError(400, f"{at}.function.arguments is not valid JSON", f"{at}.function.arguments") from None
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ApiError(400, f"{at}.id must be a string", f"{at}.id", "invalid_type")
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a role", f"{where}.role")
        role = m["role"]
        if role in REFUSED_ROLES:
            raise ApiError(400, f"{where}.role {role!r}: {REFUSED_ROLES[role]}", f"{where}.role", "unsupported_value")
        fields = MESSAGE_FIELDS.get(role)
        if fields is None:
            raise ApiError(400, f"{where}.role {role!r} is not a role (system, developer, user, assistant, tool)",
                           f"{where}.role", "invalid_value")
        for key, value in m.items():
            field = fields.get(key)
            if field is None:
                raise ApiError(400, f"unknown field {where}.{key} (a {role} message takes {', '.join(fields)})",
                               f"{where}.{key}", "unknown_parameter")
            if key != "content":  # content: checked part by part below
                field.check(value, f"{where}.{key}")
        calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else None
        entry: dict = {"role": "system" if role == "developer" else role,
                       "content": _text(m.get("content"), f"{where}.content", allow_none=calls is not None)}
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ApiError(400, f"{where}.tool_call_id is required", f"{where}.tool_call_id")
            entry["tool_call_id"] = m["tool_call_id"]
        out.append(entry)
    return out


def markdown_table() -> str:
    """The per-role message fields, for docs/serving.md (after the request fields)."""
    lines = ["`messages[]`, by role", "", "| role | field | type | | what r1deploy does |", "|---|---|---|---|---|"]
    for role, fields in MESSAGE_FIELDS.items():
        for f in fields.values():
            what, types = f.what.replace("|", "\\|"), " \\| ".join(f.types)
            lines.append(f"| {role} | `{f.name}` | {types} | {f.status} | {what} |")
    for role, why in REFUSED_ROLES.items():
        lines.append(f"| {role} | | | refused | {why} |")
    lines.append("| any other | | | refused | not a role |")
    return "\n".join(lines) + "\n"
