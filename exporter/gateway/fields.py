"""Every request field the gateway knows, one registry per endpoint, as data: what r1deploy does with it.

Each field of OpenAI's API reference for chat completions, completions and embeddings (the official `openai`
client's request types list the same names: tests/test_gateway_api.py checks that the installed client knows no
field this registry lacks), plus the vLLM / SGLang extensions r1deploy keeps and the best-known ones it does not:

* **supported** — applied; its JSON type is checked here, its value by the endpoint's parser;
* **not applicable** — accepted because its effect is one this server has anyway (a single service tier, an
  end-user id that only OpenAI's abuse monitoring reads); a value that would ask for more is refused;
* **refused** — any value other than null is a 400 naming the field (`param` set): the caller asked for
  something this server does not do, and a 200 would be a wrong answer it cannot see.

A field that is in no registry is refused the same way (`unknown field`): no field is ever accepted and ignored.
JSON null is the field's default, as in OpenAI's API, for every status.

docs/serving.md's field table is generated from this module (`python -m exporter.gateway.fields --write`);
a test fails when they differ.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import ApiError

SUPPORTED, NOT_APPLICABLE, REFUSED = "supported", "not applicable", "refused"

_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "object": "an object", "array": "an array"}


def json_type_ok(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    raise ValueError(kind)


def json_type_name(value: Any) -> str:
    for kind in ("boolean", "integer", "number", "string", "object", "array"):
        if json_type_ok(value, kind):
            return kind
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple[str, ...]  # JSON types a value may have (null is always the default)
    status: str  # SUPPORTED | NOT_APPLICABLE | REFUSED
    what: str  # the documentation: what r1deploy does with it (or why not)
    origin: str = "OpenAI"  # OpenAI | vLLM | SGLang
    accepts: Optional[Callable[[Any], bool]] = None  # NOT_APPLICABLE / SUPPORTED: values taken (others refused)
    refusal: str = ""  # why a value is refused (REFUSED, or a value `accepts` turns down)
    example: Any = None  # a value the audit test sends: accepted (200) for supported / not applicable, 400 refused
    refused_example: Any = None  # a value of a not-applicable / supported field that is refused, if any

    def check(self, value: Any, where: str) -> None:
        """400 naming the field when the value is refused or of the wrong JSON type."""
        if value is None:
            return
        if self.status == REFUSED:
            raise ApiError(400, f"{where} is not supported by this server: {self.refusal}", where, "unsupported_parameter")
        if not any(json_type_ok(value, t) for t in self.types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in self.types)
            raise ApiError(400, f"{where} must be {wanted}, got {json_type_name(value)}", where, "invalid_type")
        if self.accepts is not None and not self.accepts(value):
            raise ApiError(400, f"{where}={value!r} is not supported by this server: {self.refusal}", where,
                           "unsupported_value")


def _f(name, types, status, what, **kw) -> Field:
    return Field(name, tuple(types.split("|")), status, what, **kw)


def _refused(name, types, why, origin="OpenAI", example: Any = True) -> Field:
    return Field(name, tuple(types.split("|")), REFUSED, why, origin=origin, refusal=why, example=example)


# fields of both generating endpoints (same meaning in each)
_SAMPLING = [
    _f("model", "string", SUPPORTED, "the served model id (`GET /v1/models`); unknown: 404 `model_not_found`",
       example="generate"),
    _f("max_tokens", "integer", SUPPORTED, "1..max_output_len; default the repository's `default_max_tokens`",
       example=4),
    _f("temperature", "number", SUPPORTED, "[0, 2]; unset: the profile's, else generation_config.json's, else greedy",
       example=0.0),
    _f("top_p", "number", SUPPORTED, "(0, 1]; unset as temperature", example=1.0),
    _f("seed", "integer", SUPPORTED, "a per-request generator: the same seed gives the same tokens in any batch",
       example=7),
    _f("stop", "string|array", SUPPORTED, "a string or up to 16: the text ends before the first one matched",
       example=["\n\n\n"]),
    _f("stream", "boolean", SUPPORTED, "server-sent events, `data: [DONE]` last", example=False),
    _f("stream_options", "object", SUPPORTED, "`include_usage` (a last chunk with the usage); "
       "`include_obfuscation: false` (no obfuscation padding is ever sent: `true` is refused)",
       example={"include_usage": True}, refused_example={"include_obfuscation": True}),
    _f("n", "integer", SUPPORTED, "1..16 choices (the prompt prefilled once, rows forked in the scheduler)",
       example=1),
    _f("presence_penalty", "number", SUPPORTED, "[-2, 2], applied to the logits in the scheduler", example=0.0),
    _f("frequency_penalty", "number", SUPPORTED, "[-2, 2], applied to the logits in the scheduler", example=0.0),
    _f("logit_bias", "object", SUPPORTED, "token id → bias in [-100, 100], added to the logits", example={}),
    _f("user", "string", NOT_APPLICABLE, "an end-user id for OpenAI's abuse monitoring: nothing here reads it "
       "(type-checked, never logged)", example="user-1234"),
    # extensions (vLLM's names) r1deploy keeps
    _f("ignore_eos", "boolean", SUPPORTED, "generate exactly `max_tokens` (benchmarks); special tokens it "
       "generates are not put in the text", origin="vLLM", example=False),
    _f("min_tokens", "integer", SUPPORTED, "no end of sequence before this many tokens", origin="vLLM", example=0),
    _f("top_k", "integer", SUPPORTED, "sample among the k most likely tokens (top_p then applies within them); "
       "0 or -1: no cut", origin="vLLM", example=5),
    _f("repetition_penalty", "number", SUPPORTED, "(0, 2], as vLLM / transformers apply it", origin="vLLM",
       example=1.0),
    _f("skip_special_tokens", "boolean", SUPPORTED, "default true: special tokens (end of sentence under "
       "`ignore_eos`) are left out of the text; false keeps them (the reasoning tags are split out either way)",
       origin="vLLM", example=True),
]

# well-known extensions r1deploy does not implement: refused by name with a pointer, not as unknown
_EXTENSIONS_REFUSED = [
    _refused("min_p", "number", "min-p sampling is not implemented (use top_p)", "vLLM", example=0.1),
    _refused("use_beam_search", "boolean", "no beam search", "vLLM"),
    _refused("length_penalty", "number", "no beam search", "vLLM", example=1.0),
    _refused("stop_token_ids", "array", "stop on token ids is not implemented (use stop)", "vLLM", example=[1]),
    _refused("include_stop_str_in_output", "boolean", "the matched stop string is always left out", "vLLM"),
    _refused("bad_words", "array", "not implemented (logit_bias -100 bans a token)", "vLLM", example=["x"]),
    _refused("allowed_token_ids", "array", "not implemented", "vLLM", example=[1]),
    _refused("prompt_logprobs", "integer", "prompt logprobs are not computed", "vLLM", example=1),
    _refused("truncate_prompt_tokens", "integer", "prompts are never truncated: a prompt too long is a 400", "vLLM",
             example=8),
    _refused("guided_json", "object|string", "use response_format json_schema", "vLLM", example={}),
    _refused("guided_regex", "string", "regular-expression output is not implemented", "vLLM", example="a+"),
    _refused("guided_choice", "array", "use response_format json_schema with an enum", "vLLM", example=["a"]),
    _refused("guided_grammar", "string", "grammar output is not implemented", "vLLM", example="root ::= \"a\""),
    _refused("spaces_between_special_tokens", "boolean", "not implemented", "vLLM"),
    _refused("return_tokens_as_token_ids", "boolean", "not implemented", "vLLM"),
    _refused("priority", "integer", "requests are served first come, first served", "vLLM", example=1),
    _refused("request_id", "string", "the server names each request itself", "vLLM", example="r1"),
    _refused("logits_processors", "array", "no custom logits processors", "vLLM", example=["x"]),
]


def _stream_options_ok(value: dict) -> bool:
    return set(value) <= {"include_usage", "include_obfuscation"} and value.get("include_obfuscation") in (None, False)


def _with(fields: list[Field], name: str, **changes) -> list[Field]:
    from dataclasses import replace

    return [replace(f, **changes) if f.name == name else f for f in fields]


_SAMPLING = _with(_SAMPLING, "stream_options", accepts=_stream_options_ok,
                  refusal="stream_options takes include_usage and include_obfuscation=false")

CHAT: dict[str, Field] = {f.name: f for f in [
    _f("messages", "array", SUPPORTED, "roles system, developer (as system), user, assistant (with `tool_calls`), "
       "tool; text content (a string or text parts); rendered with the model's chat template",
       example=[{"role": "user", "content": "hi"}]),
    *_SAMPLING,
    _f("max_completion_tokens", "integer", SUPPORTED, "as max_tokens (which it overrides); both are checked",
       example=4),
    _f("logprobs", "boolean", SUPPORTED, "log-probabilities of the sampled tokens, after the sampler's processing",
       example=False),
    _f("top_logprobs", "integer", SUPPORTED, "0..20 alternatives per token (with logprobs)", example=0),
    _refused("best_of", "integer", "a completions parameter: use /v1/completions (chat has n)", "vLLM", example=2),
    _f("response_format", "object", SUPPORTED, "`text`, `json_object`, `json_schema` (strict): the answer after "
       "`</think>` is constrained token by token (xgrammar)", example={"type": "text"}),
    _f("tools", "array", SUPPORTED, "function tools, rendered in the chat template's tool format (R1's "
       "`<｜tool▁calls▁begin｜>` tags); the model's calls come back as `tool_calls` (streamed: one delta per call) with "
       "`finish_reason: tool_calls`; a function's `strict: true` only with a forced call (constrained arguments); "
       "a template that does not render tools: 400",
       example=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    _f("tool_choice", "string|object", SUPPORTED, "`auto` (the default with tools), `none` (the tools are not "
       "shown to the model), `required` and a named function (the answer constrained by guided decoding to a JSON "
       "schema of the functions' parameters; not with response_format)", example="none"),
    _f("parallel_tool_calls", "boolean", SUPPORTED, "true (the default): every call is returned; false limits a "
       "forced call (`required`) to one and is refused with `auto` (nothing limits the model there)", example=True),
    _f("separate_reasoning", "boolean", SUPPORTED, "default true: R1's thought in `reasoning_content` / `reasoning`; "
       "false: the raw text", origin="SGLang", example=True),
    _f("store", "boolean", NOT_APPLICABLE, "false (the default) only: this server stores no completions",
       accepts=lambda v: v is False, refusal="this server stores no completions", example=False,
       refused_example=True),
    _f("metadata", "object", NOT_APPLICABLE, "tags of a stored completion; none is stored (`store: true` is "
       "refused), so tags have nothing to attach to — up to 16 string values accepted, as OpenAI accepts them "
       "without `store`", accepts=lambda v: len(v) <= 16 and all(isinstance(x, str) for x in v.values()),
       refusal="at most 16 string values", example={"k": "v"}, refused_example={"k": 1}),
    _f("service_tier", "string", NOT_APPLICABLE, "`auto` or `default`: this server has one tier; `flex`, `scale`, "
       "`priority` are refused", accepts=lambda v: v in ("auto", "default"),
       refusal="one service tier (auto / default)", example="auto", refused_example="priority"),
    _f("safety_identifier", "string", NOT_APPLICABLE, "as user: an id for OpenAI's abuse monitoring",
       example="sid-1"),
    _f("prompt_cache_key", "string", NOT_APPLICABLE, "a routing hint for OpenAI's prompt cache; the prefix cache "
       "here matches prompts by their tokens, whatever the key", example="k"),
    _refused("prompt_cache_retention", "string", "prompt cache lifetimes are not configurable per request",
             example="24h"),
    _refused("prompt_cache_options", "object", "prompt cache breakpoints are not configurable", example={}),
    _f("modalities", "array", NOT_APPLICABLE, "`[\"text\"]` only: text is what the model generates",
       accepts=lambda v: v == ["text"], refusal="text output only", example=["text"], refused_example=["audio"]),
    _refused("audio", "object", "no audio output"),
    _refused("prediction", "object", "no predicted outputs (speculative decoding from a given text)"),
    _refused("reasoning_effort", "string", "R1 has no reasoning-effort control", example="low"),
    _refused("verbosity", "string", "no verbosity control", example="low"),
    _refused("web_search_options", "object", "no web search", example={}),
    _refused("moderation", "object", "no moderation", example={}),
    _refused("functions", "array", "deprecated: use tools", example=[{"name": "f"}]),
    _refused("function_call", "string|object", "deprecated: use tool_choice", example="auto"),
    _refused("echo", "boolean", "chat echo (vLLM) is not implemented; completions take echo", "vLLM"),
    _refused("add_generation_prompt", "boolean", "the generation prompt is always added", "vLLM"),
    _refused("continue_final_message", "boolean", "not implemented", "vLLM"),
    _refused("chat_template", "string", "the model's own chat template is used", "vLLM", example="{{ 1 }}"),
    _refused("chat_template_kwargs", "object", "no template options", "vLLM", example={}),
    _refused("documents", "array", "no RAG documents in the template", "vLLM", example=[{}]),
    *_EXTENSIONS_REFUSED,
]}

COMPLETIONS: dict[str, Field] = {f.name: f for f in [
    _f("prompt", "string|array", SUPPORTED, "a string, or a list of one string (one prompt per request; token-id "
       "prompts are refused)", example="Hello"),
    *_SAMPLING,
    _f("logprobs", "integer", SUPPORTED, "0..20 alternatives per token, after the sampler's processing (not with "
       "echo)", example=0),
    _f("echo", "boolean", SUPPORTED, "the prompt before the completion", example=False),
    _refused("suffix", "string", "the models served have no fill-in-the-middle tokens", example="x"),
    _f("best_of", "integer", SUPPORTED, "n..16 candidates generated, the n with the highest cumulative logprob "
       "returned (not streamed)", example=1),
    _f("response_format", "object", SUPPORTED, "as in chat (vLLM allows it on completions)", origin="vLLM",
       example={"type": "text"}),
    *_EXTENSIONS_REFUSED,
]}

EMBEDDINGS: dict[str, Field] = {f.name: f for f in [
    _f("model", "string", SUPPORTED, "a served embedding model id (`GET /v1/models`)", example="embed"),
    _f("input", "string|array", SUPPORTED, "a string, a list of strings, token ids or lists of token ids",
       example="hello"),
    _f("encoding_format", "string", SUPPORTED, "`float` (default) or `base64` (little-endian float32)",
       example="float"),
    _f("dimensions", "integer", SUPPORTED, "only the model's own size (no truncation of embeddings)",
       example=None),
    _f("user", "string", NOT_APPLICABLE, "as in chat: nothing here reads it", example="user-1234"),
]}

# vLLM's /tokenize and /detokenize (not OpenAI's API): what the model's tokenizer makes of a prompt or a chat
TOKENIZE: dict[str, Field] = {f.name: f for f in [
    _f("model", "string", SUPPORTED, "a served model id (an LLM, or an embedding model with `prompt`)",
       origin="vLLM", example="generate"),
    _f("prompt", "string", SUPPORTED, "a text, tokenized as the model tokenizes its prompt (give prompt or messages)",
       origin="vLLM", example="Hello"),
    _f("messages", "array", SUPPORTED, "a chat, rendered with the model's chat template as /v1/chat/completions "
       "renders it, then tokenized", origin="vLLM", example=None),
    _f("tools", "array", SUPPORTED, "with messages: rendered as /v1/chat/completions renders them", origin="vLLM",
       example=None),
    _f("add_generation_prompt", "boolean", SUPPORTED, "with messages: default true, as the chat endpoint adds it",
       origin="vLLM", example=True),
    _f("add_special_tokens", "boolean", SUPPORTED, "default true: the tokenizer's own special tokens, as the model "
       "tokenizes its prompt (vLLM's default for messages is false)", origin="vLLM", example=True),
    _f("return_token_strs", "boolean", SUPPORTED, "`token_strs`: each token's vocabulary string", origin="vLLM",
       example=True),
    _refused("continue_final_message", "boolean", "not implemented", "vLLM"),
    _refused("chat_template", "string", "the model's own chat template is used", "vLLM", example="{{ 1 }}"),
    _refused("chat_template_kwargs", "object", "no template options", "vLLM", example={}),
    _refused("mm_processor_kwargs", "object", "text models only", "vLLM", example={}),
]}

DETOKENIZE: dict[str, Field] = {f.name: f for f in [
    _f("model", "string", SUPPORTED, "a served model id", origin="vLLM", example="generate"),
    _f("tokens", "array", SUPPORTED, "token ids, decoded with special tokens kept", origin="vLLM", example=[1]),
]}

REGISTRIES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS,
              "/tokenize": TOKENIZE, "/detokenize": DETOKENIZE}


def check_fields(body: dict, registry: dict[str, Field]) -> None:
    """Every top-level field of `body` is known and of its JSON type, and none is refused."""
    for key, value in body.items():
        field = registry.get(key)
        if field is None:
            raise ApiError(400, f"unknown field {key!r}: this server refuses fields it does not know rather than "
                           f"ignore them (docs/serving.md lists the fields)", key, "unknown_parameter")
        field.check(value, key)


# ---- docs/serving.md's table -----------------------------------------------------------------------------------
BEGIN, END = "<!-- fields table: generated by `python -m exporter.gateway.fields --write` -->", "<!-- end of fields table -->"


def markdown_table() -> str:
    lines = []
    for route, registry in REGISTRIES.items():
        lines += [f"`POST {route}`", "", "| field | type | | from | what r1deploy does |", "|---|---|---|---|---|"]
        order = {SUPPORTED: 0, NOT_APPLICABLE: 1, REFUSED: 2}
        for f in sorted(registry.values(), key=lambda f: (order[f.status], f.origin != "OpenAI", f.name)):
            what, types = f.what.replace("|", "\\|"), " \\| ".join(f.types)
            lines.append(f"| `{f.name}` | {types} | {f.status} | {f.origin} | {what} |")
        lines.append("")
    from .messages import markdown_table as message_table  # messages.py builds on this module: imported here

    return "\n".join(lines) + "\n" + message_table()


def render_into(doc: str) -> str:
    """`doc` with the text between the markers replaced by the generated table."""
    head, sep, rest = doc.partition(BEGIN)
    if not sep or END not in rest:
        raise ValueError("docs/serving.md has no fields-table markers")
    return head + BEGIN + "\n\n" + markdown_table() + "\n" + END + rest.split(END, 1)[1]


def main(argv: list[str]) -> int:
    doc_path = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
    if argv == ["--write"]:
        doc_path.write_text(render_into(doc_path.read_text()))
        return 0
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
