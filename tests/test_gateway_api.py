"""The gateway's request-field audit (issue 20 item 1) and its input hygiene (issue 22 item 3): every field of the
registries (exporter/gateway/fields.py) walked with the official `openai` client against a real CPU Triton behind
`r1deploy gateway` (its own process, its log kept): refused → an OpenAI-shaped 400 naming the field, accepted →
200, a wrong JSON type → 400 naming it; unknown fields, unknown roles, lone surrogates, oversized request lines and
headers, 429's Retry-After, special tokens under ignore_eos. No part is mocked: Triton serves r1-distill-tiny's
real `generate` and the scripted contract-speaking test model of tests/test_gateway.py."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
from conftest import R1DEPLOY, REPO
from test_gateway import _wait_http, _write_scripted

from exporter.gateway import fields
from exporter.gateway.fields import CHAT, COMPLETIONS, NOT_APPLICABLE, REFUSED, SUPPORTED

KEY = "sk-api-test-0123456789"
EOS = "<｜end▁of▁sentence｜>"


# ---- the registry on its own ------------------------------------------------------------------------------------
def _sdk_fields(module, *classes) -> set[str]:
    names: set[str] = set()
    for cls in classes:
        names |= set(getattr(module, cls).__annotations__)
    return names


def test_registries_cover_every_field_the_official_client_sends():
    """The installed `openai` client's request types are OpenAI's API reference as code: a field it knows and the
    registry does not would be refused as unknown — this fails first, so the table is extended knowingly."""
    from openai.types import completion_create_params as comp
    from openai.types import embedding_create_params as emb
    from openai.types.chat import completion_create_params as chat

    sdk_chat = _sdk_fields(chat, "CompletionCreateParamsNonStreaming", "CompletionCreateParamsStreaming")
    sdk_comp = _sdk_fields(comp, "CompletionCreateParamsNonStreaming", "CompletionCreateParamsStreaming")
    assert {"messages", "tools", "response_format", "modalities", "prediction", "store", "metadata", "stream"} <= sdk_chat
    assert sdk_chat - set(CHAT) == set()
    assert sdk_comp - set(COMPLETIONS) == set()
    assert set(emb.EmbeddingCreateParams.__annotations__) - set(fields.EMBEDDINGS) == set()
    for registry in fields.REGISTRIES.values():
        for f in registry.values():
            assert f.status in (SUPPORTED, NOT_APPLICABLE, REFUSED) and f.what, f
            assert f.status != REFUSED or f.refusal, f
            assert f.accepts is None or f.refused_example is not None, f"{f.name}: a refused value to test"


def test_docs_table_is_generated_from_the_registry():
    doc = (REPO / "docs" / "serving.md").read_text()
    assert fields.render_into(doc) == doc, "run `python -m exporter.gateway.fields --write`"
    assert "| `reasoning_effort` | string | refused |" in doc


def test_field_checks_directly():
    from exporter.gateway.errors import ApiError

    for body, param in [({"logprobs": "x"}, "logprobs"), ({"n": 1.5}, "n"), ({"stop": 3}, "stop"),
                        ({"temperature": True}, "temperature"), ({"store": True}, "store"),
                        ({"audio": {"voice": "alloy"}}, "audio"), ({"no_such_field": 1}, "no_such_field"),
                        ({"service_tier": "flex"}, "service_tier")]:
        with pytest.raises(ApiError) as err:
            fields.check_fields(body, CHAT)
        assert err.value.status == 400 and err.value.param == param and param in err.value.message, body
    fields.check_fields({"store": False, "user": "u", "audio": None, "service_tier": "auto", "logprobs": True}, CHAT)


# ---- through a real Triton and the `r1deploy gateway` process ---------------------------------------------------
@pytest.fixture(scope="module")
def repos(exported, session_workdir, tmp_path_factory):
    from exporter.repository import RepositoryConfig, write_repository

    root = tmp_path_factory.mktemp("gateway_api")
    exported("r1-distill-tiny")
    real = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=session_workdir, out=root / "real", onnx_variant="fp32"))
    scripted = _write_scripted(root / "scripted_repo", real.out / "generate" / "1" / "tokenizer", root / "markers")
    return {"real": real.out, "scripted": scripted, "root": root}


@pytest.fixture(scope="module")
def triton(repos):
    from exporter.serve import ServerConfig, TritonServer

    srv = TritonServer(ServerConfig(model_repository=repos["real"], extra_repositories=[repos["scripted"]]))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gateway(repos, triton):
    """`r1deploy gateway` with its stderr (the log) in a file the tests read."""
    from exporter.serve import free_port

    keys = repos["root"] / "api-keys"
    keys.write_text(KEY + "\n")
    log_path = repos["root"] / "gateway.log"
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(R1DEPLOY), "gateway", "--triton", triton.endpoints.grpc, "--repository", str(repos["real"]),
             "--repository", str(repos["scripted"]), "--port", str(port), "--api-key-file", str(keys)],
            stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc)
        yield {"url": url, "log": log_path}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0, log_path.read_text()[-3000:]


@pytest.fixture
def client(gateway):
    import openai

    return openai.OpenAI(base_url=gateway["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


CHAT_BASE = {"model": "generate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETIONS_BASE = {"model": "generate", "prompt": "Hello", "max_tokens": 2}


def _sdk_names(chat: bool) -> set[str]:
    from openai.types import completion_create_params as comp
    from openai.types.chat import completion_create_params as chat_params

    return _sdk_fields(chat_params if chat else comp, "CompletionCreateParamsNonStreaming")


def _send(client, chat: bool, name: str, value):
    """One request with `name: value` on top of a minimal valid one: an SDK argument where the client has it,
    extra_body where not (the vLLM / SGLang extensions, the refused extensions)."""
    base = dict(CHAT_BASE if chat else COMPLETIONS_BASE)
    extra = {}
    if name in _sdk_names(chat) or name in base:
        base[name] = value
    else:
        extra[name] = value
    create = client.chat.completions.create if chat else client.completions.create
    return create(**base, extra_body=extra or None)


def _refused(fn, param: str, status: int = 400):
    import openai

    with pytest.raises(openai.APIStatusError) as err:
        fn()
    e = err.value
    assert e.status_code == status, (param, e.status_code, e.message)
    assert set(e.body) == {"message", "type", "param", "code"}, e.body  # OpenAI's shape (the client unwraps "error")
    assert e.body["param"] == param and param in e.body["message"], (param, e.body)
    assert e.body["type"] == "invalid_request_error"
    return e


def _wrong_type(f) -> object:
    if "string" not in f.types:
        return "x"
    return True if "boolean" not in f.types else 3


@pytest.mark.triton
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_every_field_of_the_table_against_the_gateway(client, chat):
    registry = CHAT if chat else COMPLETIONS
    for f in registry.values():
        if f.status == REFUSED:
            e = _refused(lambda f=f: _send(client, chat, f.name, f.example), f.name)
            assert f.refusal in e.body["message"]
            continue
        if f.name != "stream":  # a stream is walked by the other tests; here every answer is one body
            r = _send(client, chat, f.name, f.example)
            assert r.choices and r.usage.completion_tokens >= 1, f.name
        if f.refused_example is not None:
            _refused(lambda f=f: _send(client, chat, f.name, f.refused_example), f.name)
        _refused(lambda f=f: _send(client, chat, f.name, _wrong_type(f)), f.name)
    _refused(lambda: _send(client, chat, "frobnicate", 1), "frobnicate")


@pytest.mark.triton
def test_unknown_and_deprecated_roles_and_message_fields(client):
    chat = client.chat.completions.create
    for messages, param in [
        ([{"role": "narrator", "content": "x"}], "messages[0].role"),
        ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
        ([{"role": "user", "content": "x", "colour": "red"}], "messages[0].colour"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
         "messages[0].content[0].type"),
        ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id"),
    ]:
        _refused(lambda m=messages: chat(model="generate", messages=m, max_tokens=2), param)
    r = chat(model="generate", max_tokens=2, messages=[{"role": "developer", "content": "Be brief."},
                                                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert r.usage.completion_tokens >= 1


@pytest.mark.triton
def test_types_and_max_tokens_are_checked_whatever_else_is_given(client):
    chat = client.chat.completions.create
    _refused(lambda: chat(model="generate", messages=CHAT_BASE["messages"], logprobs="x"), "logprobs")
    _refused(lambda: chat(model="generate", messages=CHAT_BASE["messages"], max_tokens=-1, max_completion_tokens=5),
             "max_tokens")
    _refused(lambda: chat(model="generate", messages=CHAT_BASE["messages"], max_tokens=5, max_completion_tokens=0),
             "max_completion_tokens")
    r = chat(model="generate", messages=CHAT_BASE["messages"], max_tokens=9, max_completion_tokens=2)
    assert r.usage.completion_tokens <= 2  # max_completion_tokens wins


def _raw(gateway, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(gateway["url"] + path, data=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _no_traceback(gateway) -> None:
    log = gateway["log"].read_text()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


@pytest.mark.triton
@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", b'{"model": "generate", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "generate", "messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\udfff"]}',
     "stop[1]"),
    ("/v1/chat/completions", b'{"model": "generate", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", b'{"model": "generate", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "generate", "prompt": "x", "user": "\\udc00"}', "user"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
])
def test_lone_surrogates_are_a_400_naming_the_field(gateway, path, body, param):
    status, _, doc = _raw(gateway, path, body)
    assert status == 400 and doc["error"]["param"] == param and "surrogate" in doc["error"]["message"], doc
    _no_traceback(gateway)
    # a valid pair written as escapes (an emoji) is text like any other
    status, _, doc = _raw(gateway, "/v1/completions", b'{"model": "generate", "prompt": "hi \\ud83d\\ude00", "max_tokens": 2}')
    assert status == 200, doc


@pytest.mark.triton
def test_oversized_request_line_and_headers_get_openai_shaped_errors(gateway):
    host, port = gateway["url"].removeprefix("http://").split(":")
    for path, headers, status in [("/v1/models?" + "q" * 9000, {}, 414), ("/v1/models", {"X-Big": "v" * 9000}, 431),
                                  ("/v1/models", {"Authorization": "Bearer " + "k" * 9000}, 431)]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == status and r.headers["Content-Type"].startswith("application/json"), (r.status, body[:200])
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and "8190 bytes" in err["message"]
        assert b"kkkk" not in body and b"vvvv" not in body  # the offending line is never echoed
    log = gateway["log"].read_text()
    assert "kkkk" not in log  # nor logged (it may be a key)
    _no_traceback(gateway)
    with urllib.request.urlopen(gateway["url"] + "/health", timeout=10) as r:
        assert r.status == 200  # and the gateway serves on


@pytest.mark.triton
def test_busy_is_429_with_retry_after(gateway, client):
    import openai

    status, headers, doc = _raw(gateway, "/v1/chat/completions", json.dumps(
        {"model": "scripted", "messages": [{"role": "user", "content": "[busy] hi"}]}).encode())
    assert status == 429 and headers["Retry-After"] == "1" and "server busy" in doc["error"]["message"]
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "[busy] hi"}], stream=True)
    assert err.value.response.headers["retry-after"] == "1"


@pytest.mark.triton
def test_special_tokens_never_reach_the_content_under_ignore_eos(client):
    """The trained tiny model ends an off-corpus chat at once with <｜end▁of▁sentence｜>; under ignore_eos it goes on
    past it, and with skip_special_tokens=false (what the reasoning split asks of generate) the token's text is in
    generate's output: the gateway takes it out, whole and streamed, unless the client asks to keep it."""
    messages = [{"role": "user", "content": "zq xv wk"}]
    common = dict(model="generate", messages=messages, max_tokens=24, temperature=0)
    kept = client.chat.completions.create(**common, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    k = kept.choices[0].message
    raw = (k.model_extra.get("reasoning_content") or "") + (k.content or "")
    assert EOS in raw, "the case does not arise: the model generated no end of sentence"
    whole = client.chat.completions.create(**common, extra_body={"ignore_eos": True})
    w = whole.choices[0].message
    said = (w.model_extra.get("reasoning_content") or "") + (w.content or "")
    assert EOS not in said and said == raw.replace(EOS, "")
    chunks = list(client.chat.completions.create(**common, stream=True, extra_body={"ignore_eos": True}))
    streamed = "".join((c.choices[0].delta.model_extra.get("reasoning_content") or "") + (c.choices[0].delta.content or "")
                       for c in chunks if c.choices)
    assert streamed == said
    raw_text = client.chat.completions.create(**common, extra_body={"ignore_eos": True, "separate_reasoning": False})
    assert EOS not in raw_text.choices[0].message.content
