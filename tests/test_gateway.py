"""The OpenAI gateway: its parts directly (reasoning splitter, request shapes, JSON bounds, chat template sandbox,
API keys), then the official `openai` client (sync and async, streaming and not) against a real CPU Triton
through the gateway, run as `r1deploy gateway` in its own process.

Triton serves two LLMs: r1-distill-tiny's real `generate` (today's model: max_batch_size 0, [1] shapes, no token
counts returned) and `scripted`, a test model that speaks the generate contract (max_batch_size 1, [1, 1]
shapes, skip_special_tokens, num_*_tokens, "server busy:") and says what the prompt tells it to — R1 outputs no
tiny random model would produce (tests/data/scripted_generate/model.py). No part is mocked."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import R1DEPLOY, REPO

from exporter import tiny_models
from exporter.gateway.protocol import ApiError, json_depth_exceeds, parse_body
from exporter.gateway.reasoning import ReasoningSplitter, split_whole

DATA = Path(__file__).parent / "data"
KEY = "sk-test-0123456789abcdef"
# a corpus question through the chat template: the trained default model answers it at length (it ends
# off-corpus text at once)
PROMPT = tiny_models.chat_prompt("What is a KV cache?")


# ---- the reasoning splitter, on its own -----------------------------------------------------------------------
def _feed_all(splitter: ReasoningSplitter, pieces) -> tuple[str, str]:
    r, c = [], []
    for piece in pieces:
        a, b = splitter.feed(*piece) if isinstance(piece, tuple) else splitter.feed(piece)
        r.append(a)
        c.append(b)
    a, b = splitter.finish()
    return "".join(r) + a, "".join(c) + b


@pytest.mark.parametrize("text,reasoning,content", [
    ("Two plus two is four.</think>\n\nThe answer is 4.", "Two plus two is four.", "\n\nThe answer is 4."),
    ("<think>Let me think.</think>The answer.", "Let me think.", "The answer."),
    ("\n<think>\nhm</think>ok", "\nhm", "ok"),
    ("never closes the thought", "never closes the thought", ""),
    ("</think>only an answer", "", "only an answer"),
    ("a < b and </thin is not a tag</think>yes", "a < b and </thin is not a tag", "yes"),
])
def test_splitter_text_mode_any_chunking(text, reasoning, content):
    """Whole, and cut at every position into two chunks and into single characters: the tags may be split."""
    assert split_whole(text) == (reasoning, content)
    for cut in range(len(text) + 1):
        assert _feed_all(ReasoningSplitter(), [text[:cut], text[cut:]]) == (reasoning, content), cut
    assert _feed_all(ReasoningSplitter(), list(text)) == (reasoning, content)


@pytest.fixture(scope="module")
def tiny_tokenizer(exported, session_workdir):
    from tokenizers import Tokenizer

    from exporter.core.artifacts import ModelLayout

    exported("r1-distill-tiny")
    tok_dir = ModelLayout(session_workdir, "r1-distill-tiny").tokenizer_dir
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def test_splitter_token_mode_with_real_tokenizer(tiny_tokenizer):
    """An older generate drops `</think>` from its text (skip_special_tokens): the split is found on the token
    ids. Chunks as that model sends them: each chunk's text is its tokens decoded without special tokens."""
    tok = tiny_tokenizer
    end = tok.token_to_id("</think>")
    assert end is not None and tok.decode([end], skip_special_tokens=True) == ""
    before = tok.encode("the model thinks about it", add_special_tokens=False).ids
    after = tok.encode(" then answers", add_special_tokens=False).ids
    ids = before + [end] + after

    def decode(x):
        return tok.decode(x, skip_special_tokens=True)

    want = (decode(before), decode(after))
    # whole completion (stream=false): one chunk holding every token
    assert split_whole(decode(ids), ids, end, decode) == want
    # streamed one token per chunk, and grouped with the tag inside a chunk, first or last
    for groups in ([[t] for t in ids], [ids[:3], ids[3 : len(before) + 3], ids[len(before) + 3 :]],
                   [before, [end] + after], [before + [end], after]):
        pieces = [(decode(g), g) for g in groups]
        r, c = _feed_all(ReasoningSplitter(end, decode), pieces)
        assert (r, c) == want, groups


# ---- request shapes, bounds, sandbox, keys ---------------------------------------------------------------------
def _scripted_config(marker_dir: Path):
    from tritonclient.grpc import model_config_pb2 as mc

    c = mc.ModelConfig(name="scripted", backend="python", max_batch_size=1)
    inputs = [("text_input", "TYPE_STRING", [1]), ("max_tokens", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]),
              ("top_p", "TYPE_FP32", [1]), ("seed", "TYPE_UINT64", [1]), ("stream", "TYPE_BOOL", [1]),
              ("stop_words", "TYPE_STRING", [-1]), ("stop", "TYPE_STRING", [-1]), ("ignore_eos", "TYPE_BOOL", [1]),
              ("exclude_input_in_output", "TYPE_BOOL", [1]), ("return_num_input_tokens", "TYPE_BOOL", [1]),
              ("return_num_output_tokens", "TYPE_BOOL", [1]), ("skip_special_tokens", "TYPE_BOOL", [1])]
    for name, dtype, dims in inputs:
        c.input.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims, optional=name != "text_input")
    for name, dtype, dims in [("text_output", "TYPE_STRING", [1]), ("token_ids", "TYPE_INT64", [-1]),
                              ("finish_reason", "TYPE_STRING", [1]), ("num_input_tokens", "TYPE_UINT32", [1]),
                              ("num_output_tokens", "TYPE_UINT32", [1])]:
        c.output.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
    c.model_transaction_policy.decoupled = True
    c.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    for key, value in {"max_input_len": "64", "max_output_len": "64", "max_sequence_len": "128",
                       "default_max_tokens": "16", "tokenizer": "tokenizer", "marker_dir": str(marker_dir)}.items():
        c.parameters[key].string_value = value
    return c


def _write_scripted(root: Path, tokenizer_dir: Path, marker_dir: Path) -> Path:
    from google.protobuf import text_format

    model = root / "scripted"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(text_format.MessageToString(_scripted_config(marker_dir)))
    shutil.copy(DATA / "scripted_generate" / "model.py", model / "1" / "model.py")
    shutil.copytree(tokenizer_dir, model / "1" / "tokenizer")
    marker_dir.mkdir(parents=True, exist_ok=True)
    return root


def test_request_shapes_follow_each_config(tmp_path, tiny_tokenizer):
    """The request builder follows the generate model's config: the committed repository's generate (the
    scheduler's, max_batch_size 1) and the scripted test model speaking the same contract get [1, 1] and [1, N]
    shapes, seed UINT64, `stop_words`."""
    import numpy as np

    from exporter.gateway.models import read_model
    from exporter.gateway.triton import Generation, build_request

    committed = read_model(REPO / "model_repository" / "edge" / "generate")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    scripted = read_model(_write_scripted(tmp_path / "repo", tok_dir, tmp_path / "m") / "scripted")
    g = Generation(prompt="hi", max_tokens=7, temperature=0.5, seed=3, stop=["a", "bc"], stream=True,
                   skip_special_tokens=False)
    old, new = build_request(committed, g), build_request(scripted, g)
    shapes_old = {i.name: (list(i.shape), i.datatype) for i in old.inputs}
    shapes_new = {i.name: (list(i.shape), i.datatype) for i in new.inputs}
    assert shapes_old == shapes_new == {"text_input": ([1, 1], "BYTES"), "max_tokens": ([1, 1], "INT32"),
                          "temperature": ([1, 1], "FP32"), "seed": ([1, 1], "UINT64"), "stop_words": ([1, 2], "BYTES"),
                          "stream": ([1, 1], "BOOL"), "skip_special_tokens": ([1, 1], "BOOL"),
                          "exclude_input_in_output": ([1, 1], "BOOL"), "return_num_input_tokens": ([1, 1], "BOOL"),
                          "return_num_output_tokens": ([1, 1], "BOOL")}
    names = [i.name for i in new.inputs]
    raw = dict(zip(names, new.raw_input_contents, strict=True))
    assert np.frombuffer(raw["seed"], np.uint64).tolist() == [3]
    assert np.frombuffer(raw["skip_special_tokens"], np.bool_).tolist() == [False]


def test_json_nesting_is_bounded_before_anything_else():
    deep = b"[" * 60000 + b"]" * 60000  # ~120 KB: crashes the bundled Triton 2.51 if forwarded
    with pytest.raises(ApiError) as err:
        parse_body(b'{"model": "m", "x": ' + deep + b"}", 32)
    assert err.value.status == 400 and "nested deeper than 32" in err.value.message
    assert json_depth_exceeds({"a": [[{"b": 1}]]}, 3) and not json_depth_exceeds({"a": [[{"b": 1}]]}, 4)
    with pytest.raises(ApiError):
        parse_body(b"[1, 2]", 32)  # not an object


def test_chat_template_is_sandboxed(tmp_path):
    from exporter.gateway.chat import ChatTemplate, TemplateRejected

    ok = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}", {"bos_token": "<s>"}, "t")
    assert ok.render([{"role": "user", "content": "héllo"}]) == '<s>"héllo"'
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {}, "t")
    with pytest.raises(TemplateRejected):
        evil.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}", {}, "t")
    with pytest.raises(TemplateRejected):
        mutate.render([{"role": "user", "content": "x"}])
    refuse = ChatTemplate("{{ raise_exception('system role not supported') }}", {}, "t")
    with pytest.raises(TemplateRejected, match="system role not supported"):
        refuse.render([])


def test_api_keys_from_file_and_env(tmp_path, monkeypatch):
    from exporter.core.errors import BadInput
    from exporter.gateway import load_api_keys

    f = tmp_path / "keys"
    f.write_text("# rotated monthly\nkey-one\n\n  key-two  \n")
    monkeypatch.setenv("R1DEPLOY_API_KEYS", "key-three, key-four")
    assert load_api_keys(f) == ["key-one", "key-two", "key-three", "key-four"]
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(BadInput, match="holds no key"):
        load_api_keys(tmp_path / "empty")


# ---- through a real Triton and the `r1deploy gateway` process ---------------------------------------------------
@pytest.fixture(scope="module")
def repos(exported, session_workdir, tmp_path_factory):
    from exporter.repository import RepositoryConfig, write_repository

    root = tmp_path_factory.mktemp("gateway")
    exported("r1-distill-tiny")
    real = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=session_workdir, out=root / "real", onnx_variant="fp32"))
    markers = root / "markers"
    scripted = _write_scripted(root / "scripted_repo", real.out / "generate" / "1" / "tokenizer", markers)
    return {"real": real.out, "scripted": scripted, "markers": markers, "root": root}


@pytest.fixture(scope="module")
def triton(repos):
    from exporter.serve import ServerConfig, TritonServer

    srv = TritonServer(ServerConfig(model_repository=repos["real"], extra_repositories=[repos["scripted"]]))
    srv.start()
    yield srv
    srv.stop()


def _wait_http(url: str, proc: subprocess.Popen, want: int = 200) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == want:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == want:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered {want}")


@pytest.fixture(scope="module")
def gateway(repos, triton):
    from exporter.serve import free_port

    keys = repos["root"] / "api-keys"
    keys.write_text(KEY + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [str(R1DEPLOY), "gateway", "--triton", triton.endpoints.grpc, "--repository", str(repos["real"]),
         "--repository", str(repos["scripted"]), "--port", str(port), "--api-key-file", str(keys)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert KEY not in out + err  # keys are never logged


@pytest.fixture
def client(gateway):
    import openai

    return openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(gateway):
    import openai

    return openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(repos):
    """transformers' own chat template rendering and the tokenizer, and the in-process greedy loop."""
    from transformers import AutoTokenizer

    from exporter.repository.reference import GreedyLoop

    tok = AutoTokenizer.from_pretrained(str(repos["real"] / "generate" / "1" / "tokenizer"))
    return tok, GreedyLoop(repos["real"] / "llm" / "1" / "model.onnx")


@pytest.mark.triton
def test_models_list(client):
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["generate", "scripted"]
    assert client.models.retrieve("scripted").owned_by == "r1deploy"


@pytest.mark.triton
def test_chat_usage_equals_tokenizer_counts(client, reference):
    tok, greedy = reference
    messages = [{"role": "user", "content": "What is two plus two?"}]
    r = client.chat.completions.create(model="generate", messages=messages, max_tokens=6, temperature=0)
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys") else prompt_ids
    expected = greedy(list(prompt_ids), 6, {1})
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(prompt_ids) + len(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 6 else "stop")
    message = r.choices[0].message
    # the tiny model never closes a thought: all it says is reasoning (as R1's template opened one)
    said = (message.model_extra.get("reasoning_content") or "") + (message.content or "")
    if 6 not in expected:  # `</think>` id
        assert message.content is None and message.model_extra["reasoning"] == said
    assert said == tok.decode(expected, skip_special_tokens=True)


@pytest.mark.triton
def test_completions_whole_and_streamed_match_greedy(client, reference):
    tok, greedy = reference
    expected = greedy(tok(PROMPT)["input_ids"], 10, {1})
    text = tok.decode(expected, skip_special_tokens=True)
    r = client.completions.create(model="generate", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(expected)
    assert r.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    chunks = list(client.completions.create(model="generate", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(expected) and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


@pytest.mark.triton
def test_async_streaming_chat_and_done_marker(aclient, gateway):
    async def run():
        stream = await aclient.chat.completions.create(
            model="generate", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        whole = await aclient.chat.completions.create(
            model="generate", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
        return chunks, whole

    chunks, whole = asyncio.run(run())
    streamed = "".join((c.choices[0].delta.model_extra.get("reasoning_content") or "") + (c.choices[0].delta.content or "")
                       for c in chunks if c.choices)
    w = whole.choices[0].message
    assert streamed == (w.model_extra.get("reasoning_content") or "") + (w.content or "")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8
    # the raw event stream ends with [DONE]
    body = {"model": "generate", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    req = urllib.request.Request(gateway + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [ln for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


@pytest.mark.triton
@pytest.mark.parametrize("script,reasoning,content,finish", [
    ("noopen", "Two plus two is four.", "\n\nThe answer is 4.", "stop"),
    ("open", "Let me think.", "\n\nThe answer is 4.", "stop"),
    ("unclosed", "Still thinking about it", None, "length"),
])
def test_reasoning_split_sync_and_async_stream(client, aclient, script, reasoning, content, finish):
    messages = [{"role": "user", "content": f"[script:{script}] what is 2+2?"}]
    r = client.chat.completions.create(model="scripted", messages=messages)
    m = r.choices[0].message
    assert (m.model_extra["reasoning_content"], m.model_extra["reasoning"], m.content) == (reasoning, reasoning, content)
    assert r.choices[0].finish_reason == finish

    async def stream():
        s = await aclient.chat.completions.create(model="scripted", messages=messages, stream=True)
        return [c async for c in s]

    chunks = asyncio.run(stream())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    r_content = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    r_vllm = "".join(d.model_extra.get("reasoning") or "" for d in deltas)
    text = "".join(d.content or "" for d in deltas)
    assert (r_content, r_vllm, text) == (reasoning, reasoning, content or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish


@pytest.mark.triton
def test_raw_text_on_request_and_model_counts_used(client):
    messages = [{"role": "user", "content": "[script:open] 2+2?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, extra_body={"separate_reasoning": False})
    m = r.choices[0].message
    assert m.content == "<think>Let me think.</think>\n\nThe answer is 4." and "reasoning_content" not in (m.model_extra or {})
    # the contract's model returns its own counts: those are the usage
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def _status_error(fn):
    import openai

    with pytest.raises(openai.APIStatusError) as err:
        fn()
    assert isinstance(err.value, openai.APIError)
    assert set(err.value.body) >= {"message", "type", "param", "code"}, err.value.body
    return err.value


@pytest.mark.triton
def test_every_error_status_reaches_the_client(client, gateway, repos):
    import openai

    chat = client.chat.completions.create
    msg = [{"role": "user", "content": "hi"}]
    e = _status_error(lambda: chat(model="generate", messages=msg, n=17))
    assert e.status_code == 400 and isinstance(e, openai.BadRequestError) and "n must lie in 1..16" in e.message
    e = _status_error(lambda: chat(model="generate", messages=msg, temperature=5))
    assert e.status_code == 400 and e.body["param"] == "temperature"
    e = _status_error(lambda: chat(model="scripted", messages=[{"role": "user", "content": "word " * 100}]))
    assert e.status_code == 400 and "at most 64" in e.message
    e = _status_error(lambda: client.completions.create(model="generate", prompt=PROMPT, max_tokens=10_000))
    assert e.status_code == 400 and "1..512" in e.message
    deep: list = []
    for _ in range(100):
        deep = [deep]
    e = _status_error(lambda: chat(model="generate", messages=msg, extra_body={"metadata": deep}))
    assert e.status_code == 400 and "nested deeper" in e.message
    e = _status_error(lambda: chat(model="no-such-model", messages=msg))
    assert e.status_code == 404 and isinstance(e, openai.NotFoundError)
    e = _status_error(lambda: client.completions.create(model="generate", prompt="x" * (1 << 20)))  # > 1 MiB
    assert e.status_code == 413
    e = _status_error(lambda: chat(model="scripted", messages=[{"role": "user", "content": "[busy] hi"}]))
    assert e.status_code == 429 and isinstance(e, openai.RateLimitError) and "server busy" in e.message
    e = _status_error(lambda: chat(model="scripted", messages=[{"role": "user", "content": "[busy] hi"}], stream=True))
    assert e.status_code == 429
    wrong = openai.OpenAI(base_url=gateway + "/v1", api_key="sk-wrong", max_retries=0)
    e = _status_error(lambda: wrong.models.list())
    assert e.status_code == 401 and isinstance(e, openai.AuthenticationError)
    # 503: a gateway whose Triton is not there
    from exporter.gateway import GatewayConfig, GatewayServer
    from exporter.serve import free_port

    with GatewayServer(GatewayConfig(triton=f"127.0.0.1:{free_port()}", repositories=[repos["real"]], port=0)) as dead:
        down = openai.OpenAI(base_url=dead.url + "/v1", api_key="none", max_retries=0)
        e = _status_error(lambda: down.chat.completions.create(model="generate", messages=msg, max_tokens=2))
        assert e.status_code == 503 and isinstance(e, openai.InternalServerError)
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(dead.url + "/health", timeout=10)
        assert health.value.code == 503


@pytest.mark.triton
def test_deep_json_body_never_reaches_triton(gateway, triton):
    body = b'{"model": "generate", "prompt": ' + b"[" * 60000 + b"]" * 60000 + b"}"
    req = urllib.request.Request(gateway + "/v1/completions", data=body,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "nested deeper" in json.loads(err.value.read())["error"]["message"]
    assert triton.is_ready()


@pytest.mark.triton
def test_client_disconnect_cancels_the_triton_request(gateway, repos):
    import http.client

    markers = repos["markers"]
    body = {"model": "scripted", "prompt": "[slow] go", "max_tokens": 64, "stream": True, "seed": 4242}
    host, port = gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    got = [ln for ln in (resp.fp.readline() for _ in range(4)) if ln.startswith(b"data: ")]
    assert got  # it was streaming
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    # the connection is closed: the model sees its request cancelled long before its 64 tokens (3.2 s) are done
    deadline = time.monotonic() + 60
    while not (markers / "cancelled-4242").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (markers / "cancelled-4242").exists(), "generation was not cancelled"
    assert int((markers / "cancelled-4242").read_text()) < 64
    assert not (markers / "finished-4242").exists()


@pytest.mark.triton
def test_health_and_metrics(gateway, client):
    import openai

    client.completions.create(model="generate", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="generate", prompt=PROMPT, max_tokens=2, n=17)
    with urllib.request.urlopen(gateway + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ready"
    with urllib.request.urlopen(gateway + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'r1deploy_gateway_requests_total{endpoint="/v1/completions",model="generate",status="200"}' in text
    assert 'r1deploy_gateway_requests_total{endpoint="/v1/completions",model="",status="400"}' in text
    assert "r1deploy_gateway_time_to_first_token_seconds_count" in text
    count = [ln for ln in text.splitlines() if ln.startswith('r1deploy_gateway_completion_tokens_total{model="generate"}')]
    assert count and int(count[0].split()[-1]) >= 2


@pytest.mark.triton
def test_serve_starts_the_gateway_beside_triton(repos):
    import openai

    from exporter.serve import free_port

    port = free_port()
    proc = subprocess.Popen([str(R1DEPLOY), "--json", "serve", "--repository", str(repos["real"]), "--openai-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        info = json.loads(proc.stdout.readline())
        assert info["openai"] == f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=info["openai"] + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list()] == ["generate"]
        r = c.completions.create(model="generate", prompt=PROMPT, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()


def test_manifests_run_the_gateway_beside_triton(tmp_path):
    """The committed k8s/ overlays (what `r1deploy manifests` renders): the gateway is a second container of the
    Triton pod with its own probes and resources, keys from a Secret volume (no Secret object, no env value),
    reachable through the Service and the NetworkPolicy; an embedding model gets none."""
    from exporter.manifests import ManifestsConfig, checks, render_manifests

    for overlay in sorted((REPO / "k8s" / "overlays").iterdir()):
        objects = checks.kustomize_build(overlay)
        kinds = {o["kind"]: o for o in objects}
        assert "Secret" not in kinds
        pod = kinds["Deployment"]["spec"]["template"]["spec"]
        gw = next(c for c in pod["containers"] if c["name"] == "openai-gateway")
        assert gw["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
        assert gw["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "openai"}
        assert {"cpu", "memory"} <= set(gw["resources"]["limits"]) and "nvidia.com/gpu" not in gw["resources"]["limits"]
        assert "--triton=localhost:8001" in gw["args"] and "--profile=$(R1DEPLOY_PROFILE)" in gw["args"]
        assert {"name": "R1DEPLOY_PROFILE", "value": overlay.name} in gw["env"]
        assert not any("KEY" in e["name"] for e in gw["env"])
        keys = next(v for v in pod["volumes"] if v["name"] == "openai-api-keys")
        assert keys["secret"]["secretName"] == "r1-distill-tiny-openai-api-keys" and not keys["secret"].get("optional")
        mount = next(m for m in gw["volumeMounts"] if m["name"] == "openai-api-keys")
        assert any(a == f"--api-key-file={mount['mountPath']}/keys" for a in gw["args"])
        assert {"name": "openai", "port": 9000, "targetPort": "openai", "protocol": "TCP"} in kinds["Service"]["spec"]["ports"]
        ingress = kinds["NetworkPolicy"]["spec"]["ingress"]
        assert any({"port": 9000, "protocol": "TCP"} in rule["ports"] for rule in ingress)
        assert not checks.check_objects(objects)
    render_manifests(ManifestsConfig(model="minilm", out=tmp_path / "k8s"))
    objects = checks.kustomize_build(tmp_path / "k8s" / "overlays" / "edge")
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["triton"]


@pytest.mark.triton
def test_bench_speaks_openai(gateway, tmp_path):
    from conftest import run_cli

    r = run_cli("--json", "bench", "--protocol", "openai", "--url", gateway, "--model", "generate", "--concurrency", "2",
                "--duration", "1", "--warmup", "0.2", "--max-trials", "4", "--stability-percentage", "100",
                "--output-tokens", "8", "--input-tokens", "8", "--out", str(tmp_path),
                env={"OPENAI_API_KEY": KEY, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    level = result["levels"][0]
    assert result["protocol"] == "openai" and result["kind"] == "llm" and level["errors"] == 0
    llm = level["llm"]
    # every request asked for 8 tokens; the tiny model may end one early at its eos
    assert 0 < llm["tokens_per_request"] <= 8 and llm["output_tokens_per_s"] > 0 and llm["ttft_ms"]["p50"] > 0
    bad = run_cli("bench", "--protocol", "openai", "--url", gateway, "--model", "nope", env={"OPENAI_API_KEY": KEY})
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_triton_errors_map_to_statuses():
    from exporter.gateway.triton import error_status

    assert error_status("server busy: 8 requests queued (max_queue 8)") == 429
    assert error_status("prompt has 5000 tokens; this deployment accepts at most 2048") == 400
    assert error_status("max_tokens must lie in 1..512, got 0") == 400
    assert error_status("the server is shutting down") == 503
    assert error_status("Request for unknown model: 'generate' is not found") == 503
    assert error_status("generate failed: RuntimeError: boom") == 500


def test_short_prompts_skip_the_count_but_never_pass_a_long_one(tiny_tokenizer, tmp_path, session_workdir):
    """`surely_fits` may skip tokenizing only when the byte bound proves the prompt short enough."""
    from exporter.core.artifacts import ModelLayout
    from exporter.gateway.models import read_model

    tok_dir = ModelLayout(session_workdir, "r1-distill-tiny").tokenizer_dir
    model = read_model(_write_scripted(tmp_path / "repo", tok_dir, tmp_path / "m") / "scripted")  # max_input_len 64
    for prompt in ["hi", "<｜User｜>hello<｜Assistant｜><think>\n", "é" * 20, "日本語" * 5, "word " * 12, "x" * 70]:
        n = model.count_tokens(prompt)
        if model.surely_fits(prompt):
            assert n <= 64, prompt
    assert not model.surely_fits("word " * 100)


@pytest.mark.triton
def test_failure_after_the_stream_started_reaches_the_client(client):
    import openai

    stream = client.completions.create(model="scripted", prompt="[fail-mid] go", max_tokens=8, stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="engine lost"):
        for chunk in stream:
            seen.append(chunk.choices[0].text)
    assert seen == [" tick", " tick"]


def test_profile_sampling_applies_when_the_request_sets_none(tmp_path, session_workdir, tiny_tokenizer):
    from exporter.core.artifacts import ModelLayout
    from exporter.core.profiles import load_profiles
    from exporter.gateway.models import read_model
    from exporter.gateway.protocol import parse_request

    tok_dir = ModelLayout(session_workdir, "r1-distill-tiny").tokenizer_dir
    model = read_model(_write_scripted(tmp_path / "repo", tok_dir, tmp_path / "m") / "scripted")
    sampling = load_profiles()["edge"].sampling.as_dict()
    assert sampling == {"temperature": 0.6, "top_p": 0.95}
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    g = parse_request(body, {"scripted": model}, True, sampling).generation
    assert (g.temperature, g.top_p) == (0.6, 0.95)
    g = parse_request({**body, "temperature": 0, "top_p": 0.5}, {"scripted": model}, True, sampling).generation
    assert (g.temperature, g.top_p) == (0.0, 0.5)
    g = parse_request(body, {"scripted": model}, True, {}).generation
    assert (g.temperature, g.top_p) == (None, None)  # generate's own default
    assert g.prompt.endswith("<｜Assistant｜><think>\n") and g.skip_special_tokens is False


@pytest.mark.triton
def test_disconnect_before_a_whole_response_cancels_too(gateway, repos):
    import http.client

    markers = repos["markers"]
    body = {"model": "scripted", "prompt": "[slow] go", "max_tokens": 64, "seed": 4343}
    host, port = gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while not (markers / "started-4343").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (markers / "started-4343").exists()
    conn.sock.close()  # gone while the model generates, before any byte of the answer
    conn.close()
    while not (markers / "cancelled-4343").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (markers / "cancelled-4343").exists(), "generation was not cancelled"
    assert not (markers / "finished-4343").exists()


def test_metrics_text_passes_promtool():
    """Prometheus' own linter on the exposition text (Debian's prometheus package ships promtool)."""
    unpacked = REPO / ".venv/prometheus/usr/bin/promtool"  # `make prometheus`
    promtool = shutil.which("promtool") or os.environ.get("R1DEPLOY_PROMTOOL") or (str(unpacked) if unpacked.is_file() else None)
    if not promtool:
        pytest.skip("promtool not installed (`make prometheus`, apt-get install prometheus, or set R1DEPLOY_PROMTOOL)")
    from exporter.gateway.metrics import Metrics

    m = Metrics()
    m.request("/v1/completions", "generate", 200)
    m.request("/v1/chat/completions", "", 404)
    m.tokens("generate", 10, 5)
    m.first_token("generate", 0.012)
    m.first_token("generate", 3.0)
    r = subprocess.run([promtool, "check", "metrics"], input=m.render(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'r1deploy_gateway_time_to_first_token_seconds_bucket{model="generate",le="0.025"} 1' in m.render()


def test_ignore_eos_is_forwarded(tmp_path, tiny_tokenizer):
    """vLLM's `ignore_eos` extension reaches generate (benchmarks ask every request for exactly max_tokens)."""
    import numpy as np

    from exporter.gateway.models import read_model
    from exporter.gateway.triton import Generation, build_request

    committed = read_model(REPO / "model_repository" / "edge" / "generate")
    with_flag = build_request(committed, Generation(prompt="hi", max_tokens=7, ignore_eos=True))
    raw = dict(zip([i.name for i in with_flag.inputs], with_flag.raw_input_contents, strict=True))
    assert np.frombuffer(raw["ignore_eos"], np.bool_).tolist() == [True]
    assert "ignore_eos" not in [i.name for i in build_request(committed, Generation(prompt="hi", max_tokens=7)).inputs]
