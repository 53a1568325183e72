"""`/v1/embeddings` (minilm's `embed` ensemble and its encoder) and `/tokenize` / `/detokenize` through
`r1deploy gateway` in front of a real CPU Triton, with the official `openai` client: served embeddings against an
in-process ONNX Runtime run of the same encoder file, float and base64, string / list / token-id inputs, more
inputs than one Triton request holds, usage, and the refusals. Nothing is mocked."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import gateway_beside_triton

KEY = "sk-embed-test-0123456789"
TEXTS = ["Triton serves the embedding model.", "A second, longer sentence about key-value caches and GPUs.",
         "short", "日本語のテキスト", "The fifth one.", "And a sixth, past one request's rows."]


@pytest.fixture(scope="module")
def repos(exported, session_workdir, tmp_path_factory):
    from exporter.repository import RepositoryConfig, write_repository

    root = tmp_path_factory.mktemp("embeddings")
    out = {"root": root}
    for model in ("r1-distill-tiny", "minilm"):
        exported(model)
        out[model] = write_repository(RepositoryConfig(model=model, profile="edge", variant="python_ort",
                                                       workdir=session_workdir, out=root / model,
                                                       onnx_variant="fp32")).out
    return out


@pytest.fixture(scope="module")
def gateway(repos):
    with gateway_beside_triton([repos["r1-distill-tiny"], repos["minilm"]], repos["root"] / "api-keys", KEY) as url:
        yield url


@pytest.fixture
def client(gateway):
    import openai

    return openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(repos):
    """The encoder file the repository serves, run in-process with ONNX Runtime on one text at a time."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    out = repos["minilm"]
    tok = Tokenizer.from_file(str(out / "tokenizer/1/tokenizer/tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    session = ort.InferenceSession(str(out / "encoder/1/model.onnx"), providers=["CPUExecutionProvider"])

    def run(text: str) -> np.ndarray:
        e = tok.encode(text)
        feeds = {"input_ids": np.array([e.ids]), "attention_mask": np.ones((1, len(e.ids)), np.int64),
                 "token_type_ids": np.array([e.type_ids])}
        return session.run(["embeddings"], feeds)[0][0]

    return tok, run


def _close(a, b) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    # rows padded in a batch differ from a row alone in the last bits only (tests/test_serve.py's bound)
    assert cosine > 0.9999 and np.abs(a - b).max() < 1e-3, (cosine, np.abs(a - b).max())


@pytest.mark.triton
def test_embeddings_equal_onnxruntime_in_process(client, reference):
    tok, run = reference
    r = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(TEXTS))) and r.model == "embed"
    assert all(len(d.embedding) == 384 for d in r.data)
    for d, text in zip(r.data, TEXTS, strict=True):
        _close(d.embedding, run(text))
    counts = [len(tok.encode(t).ids) for t in TEXTS]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(counts)
    # the official client's default: it asks for base64 and decodes the float32 bytes
    b64 = client.embeddings.create(model="embed", input=TEXTS)
    np.testing.assert_array_equal(np.array([d.embedding for d in b64.data], np.float32),
                                  np.array([d.embedding for d in r.data], np.float32))
    one = client.embeddings.create(model="embed", input=TEXTS[1], encoding_format="float", dimensions=384, user="u-1")
    _close(one.data[0].embedding, run(TEXTS[1]))
    # token ids (the tokenizer's own, special tokens included) give the text's embedding
    ids = client.embeddings.create(model="embed", input=[tok.encode(t).ids for t in TEXTS[:5]], encoding_format="float")
    for d, text in zip(ids.data, TEXTS[:5], strict=True):
        _close(d.embedding, run(text))
    single = client.embeddings.create(model="embed", input=tok.encode(TEXTS[0]).ids, encoding_format="float")
    assert len(single.data) == 1 and single.usage.prompt_tokens == len(tok.encode(TEXTS[0]).ids)
    _close(single.data[0].embedding, run(TEXTS[0]))


@pytest.mark.triton
def test_embeddings_refusals(client):
    import openai

    create = client.embeddings.create
    for kwargs, param, status in [
        ({"input": "x", "dimensions": 128}, "dimensions", 400),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", 400),
        ({"input": ""}, "input", 400),
        ({"input": ["ok", ""]}, "input[1]", 400),
        ({"input": ["ok", [1, 2]]}, "input", 400),
        ({"input": [[1, 2], [10**9]]}, "input[1]", 400),
        ({"input": "word " * 600}, "input", 400),
        ({"input": "x", "extra_body": {"truncate_prompt_tokens": 8}}, "truncate_prompt_tokens", 400),
        ({"input": "x", "extra_body": {"normalize": True}}, "normalize", 400),
        ({"input": "x", "model": "generate"}, "model", 400),
        ({"input": "x", "model": "nope"}, "model", 404),
    ]:
        kwargs = {"model": "embed", "encoding_format": "float", **kwargs}
        with pytest.raises(openai.APIStatusError) as err:
            create(**kwargs)
        assert err.value.status_code == status and err.value.body["param"] == param, (kwargs, err.value.body)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"generate", "embed"} and models["embed"].model_extra["max_model_len"] == 512


def _post(gateway, path, body, key=KEY):
    req = urllib.request.Request(gateway + path, data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.triton
def test_tokenize_and_detokenize(gateway, repos):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(str(repos["r1-distill-tiny"] / "generate/1/tokenizer/tokenizer.json"))
    status, doc = _post(gateway, "/tokenize", {"model": "generate", "prompt": "What is a KV cache?",
                                               "return_token_strs": True})
    assert status == 200 and doc["tokens"] == tok.encode("What is a KV cache?").ids and doc["count"] == len(doc["tokens"])
    assert doc["token_strs"] == [tok.id_to_token(i) for i in doc["tokens"]] and doc["max_model_len"] > 0
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    hf = AutoTokenizer.from_pretrained(str(repos["r1-distill-tiny"] / "generate/1/tokenizer"))
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    status, chat = _post(gateway, "/tokenize", {"model": "generate", "messages": messages})
    assert status == 200 and chat["tokens"] == list(want)
    status, back = _post(gateway, "/detokenize", {"model": "generate", "tokens": chat["tokens"]})
    assert status == 200 and back["prompt"] == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    status, emb = _post(gateway, "/tokenize", {"model": "embed", "prompt": "short"})
    assert status == 200 and emb["count"] == 3 and emb["max_model_len"] == 512  # [CLS] short [SEP]
    for path, body, param, code in [
        ("/tokenize", {"model": "generate", "prompt": "x", "messages": messages}, "prompt", 400),
        ("/tokenize", {"model": "generate", "prompt": "x", "chat_template": "{{ 1 }}"}, "chat_template", 400),
        ("/tokenize", {"model": "generate", "prompt": 3}, "prompt", 400),
        ("/detokenize", {"model": "generate", "tokens": [10**9]}, "tokens", 400),
        ("/detokenize", {"model": "nope", "tokens": [1]}, "model", 404),
    ]:
        status, err = _post(gateway, path, body)
        assert status == code and err["error"]["param"] == param, (body, err)
    status, err = _post(gateway, "/tokenize", {"model": "generate", "prompt": "x"}, key="wrong")
    assert status == 401


def _wrong_type(f) -> object:
    if "string" not in f.types:
        return "x"
    return True if "boolean" not in f.types else 3


@pytest.mark.triton
def test_every_field_of_the_embeddings_and_tokenize_tables(gateway):
    """As tests/test_gateway_api.py walks chat and completions: each field's example accepted, refused ones and
    wrong JSON types a 400 naming the field, unknown fields refused."""
    from exporter.gateway.fields import DETOKENIZE, EMBEDDINGS, REFUSED, TOKENIZE

    for path, registry, base in [("/v1/embeddings", EMBEDDINGS, {"model": "embed", "input": "hello"}),
                                 ("/tokenize", TOKENIZE, {"model": "generate", "prompt": "hello"}),
                                 ("/detokenize", DETOKENIZE, {"model": "generate", "tokens": [7]})]:
        for f in registry.values():
            if f.status == REFUSED:
                status, err = _post(gateway, path, {**base, f.name: f.example})
                assert status == 400 and err["error"]["param"] == f.name, (path, f.name, err)
                continue
            if f.example is not None:
                status, doc = _post(gateway, path, {**base, f.name: f.example})
                assert status == 200, (path, f.name, doc)
            status, err = _post(gateway, path, {**base, f.name: _wrong_type(f)})
            assert status == 400 and err["error"]["param"] == f.name, (path, f.name, err)
        status, err = _post(gateway, path, {**base, "frobnicate": 1})
        assert status == 400 and err["error"]["param"] == "frobnicate"


@pytest.mark.triton
def test_langchain_openai_embeddings(gateway, reference):
    """LangChain's OpenAIEmbeddings (its own token counting off: it would fetch tiktoken's files)."""
    lc = pytest.importorskip("langchain_openai")
    _, run = reference
    emb = lc.OpenAIEmbeddings(base_url=gateway + "/v1", api_key=KEY, model="embed", check_embedding_ctx_length=False,
                              max_retries=0)
    vectors = emb.embed_documents(TEXTS[:3])
    for v, text in zip(vectors, TEXTS[:3], strict=True):
        _close(v, run(text))
    _close(emb.embed_query(TEXTS[3]), run(TEXTS[3]))


@pytest.mark.triton
def test_serve_starts_the_gateway_for_an_embedding_only_repository(repos, reference):
    """`r1deploy serve` of a repository with only the embed ensemble: the gateway comes up beside Triton (it used to
    start only for LLMs) and answers /v1/embeddings with the served encoder's vectors; there is no chat model."""
    import json
    import signal
    import subprocess

    import openai
    from conftest import R1DEPLOY

    from exporter.serve import free_port

    proc = subprocess.Popen([str(R1DEPLOY), "--json", "serve", "--repository", str(repos["minilm"]),
                             "--openai-port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        client = openai.OpenAI(base_url=info["openai"] + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["embed"]
        r = client.embeddings.create(model="embed", input=TEXTS[0], encoding_format="float")
        _close(r.data[0].embedding, reference[1](TEXTS[0]))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
