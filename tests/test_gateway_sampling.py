"""The sampling fields of the OpenAI API through the gateway: logprobs / top_logprobs, n, seed, best_of, echo,
suffix, stop, the penalties, logit_bias and min_tokens — the official `openai` client against a real CPU Triton
serving r1-distill-tiny's (trained) `generate`, with the gateway run as `r1deploy gateway` (the fixtures of
tests/test_gateway.py). Log-probabilities are checked against the logits an independent loop computes in-process
on the same ONNX; what each field does to the tokens is checked exactly in tests/test_scheduler.py, here that it
reaches the scheduler and comes back in OpenAI's shape. No part is mocked."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from test_gateway import KEY, PROMPT, _status_error, aclient, client, gateway, repos, triton  # noqa: F401
from test_scheduler import Stepper, _log_softmax

from exporter import tiny_models

pytestmark = pytest.mark.triton
QUESTION = "What is a KV cache?"
OPEN = "The model"  # an open prompt: sampled choices differ (the trained model answers corpus prompts by heart)


@pytest.fixture(scope="module")
def ref(repos):  # noqa: F811
    """The served tokenizer and an in-process loop over the served ONNX."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(repos["real"] / "generate" / "1" / "tokenizer" / "tokenizer.json"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(repos["real"] / "llm" / "1" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    return tok, Stepper(session)


def _greedy(ref, text: str, max_tokens: int):
    tok, stepper = ref
    eos = {tok.token_to_id(tiny_models.EOS)}
    return stepper.run(tok.encode(text).ids, max_tokens, lambda raw, _: int(np.argmax(raw)), eos=eos)


def test_chat_logprobs_of_a_greedy_run_are_the_log_softmax_of_the_onnx_logits(client, ref):  # noqa: F811
    tok, _ = ref
    tokens, raws = _greedy(ref, tiny_models.chat_prompt(QUESTION), 10)
    r = client.chat.completions.create(model="generate", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(tokens) == r.usage.completion_tokens
    for entry, token, raw in zip(content, tokens, raws, strict=True):
        want = _log_softmax(raw)
        assert entry.token == tok.decode([token], skip_special_tokens=False)
        assert abs(entry.logprob - want[token]) < 1e-4
        assert entry.bytes == list(entry.token.encode())
        best = [int(i) for i in np.argsort(-want, kind="stable")[:3]]
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i], skip_special_tokens=False) for i in best]
        assert np.allclose([t.logprob for t in entry.top_logprobs], want[best], atol=1e-4)
    # streamed: the same entries, spread over the chunks
    chunks = list(client.chat.completions.create(
        model="generate", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0,
        logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    assert all(c.choices[0].index == 0 for c in chunks if c.choices)


def test_completions_logprobs_and_offsets(client, ref):  # noqa: F811
    tok, _ = ref
    tokens, raws = _greedy(ref, PROMPT, 8)
    r = client.completions.create(model="generate", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in tokens]
    for value, token, raw in zip(lp.token_logprobs, tokens, raws, strict=True):
        assert abs(value - _log_softmax(raw)[token]) < 1e-4
    assert all(len(top) == 2 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))  # greedy: it is best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == r.choices[0].text


def test_n_choices_are_reproducible_by_seed_whole_and_streamed(client):  # noqa: F811
    def texts(**kw):
        r = client.completions.create(model="generate", prompt=OPEN, max_tokens=12, temperature=1.0, seed=11,
                                      n=3, **kw)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.text for c in r.choices], r.usage.completion_tokens

    first, used = texts()
    assert texts() == (first, used) and len(set(first)) > 1
    one = client.completions.create(model="generate", prompt=OPEN, max_tokens=12, temperature=1.0, seed=11)
    assert one.choices[0].text == first[0]  # choice i draws with seed + i
    streamed = ["", "", ""]
    finishes = {}
    for c in client.completions.create(model="generate", prompt=OPEN, max_tokens=12, temperature=1.0, seed=11,
                                       n=3, stream=True):
        for choice in c.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert streamed == first and sorted(finishes) == [0, 1, 2]
    chat = client.chat.completions.create(model="generate", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6, temperature=0, n=2)
    a, b = (c.message.model_extra["reasoning_content"] for c in chat.choices)
    assert a == b and chat.usage.completion_tokens == 12  # greedy: the same twice, both counted


def test_best_of_returns_the_choice_with_the_highest_cumulative_logprob(client):  # noqa: F811
    kw = {"model": "generate", "prompt": OPEN, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    every = client.completions.create(n=4, logprobs=0, **kw)
    sums = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(n=1, best_of=4, **kw)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == every.choices[int(np.argmax(sums))].text
    e = _status_error(lambda: client.completions.create(n=2, best_of=1, **kw))
    assert e.status_code == 400 and e.body["param"] == "best_of"
    e = _status_error(lambda: client.completions.create(best_of=3, stream=True, **kw))
    assert e.body["param"] == "best_of"
    e = _status_error(lambda: client.chat.completions.create(
        model="generate", messages=[{"role": "user", "content": "hi"}], extra_body={"best_of": 2}))
    assert e.body["param"] == "best_of" and "/v1/completions" in e.message


def test_echo_stop_and_suffix(client, ref):  # noqa: F811
    tok, _ = ref
    plain = client.completions.create(model="generate", prompt=PROMPT, max_tokens=12, temperature=0).choices[0]
    echoed = client.completions.create(model="generate", prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="generate", prompt=PROMPT, max_tokens=12, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == PROMPT + plain.text
    words = plain.text.split()
    stop = words[2]
    cut = client.completions.create(model="generate", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == plain.text[: plain.text.index(stop)] and stop not in cut.choices[0].text
    e = _status_error(lambda: client.completions.create(model="generate", prompt=PROMPT, echo=True, logprobs=1))
    assert e.status_code == 400 and e.body["param"] == "echo"
    e = _status_error(lambda: client.completions.create(model="generate", prompt=PROMPT, suffix=" end"))
    assert e.status_code == 400 and e.body["param"] == "suffix" and "fill-in-the-middle" in e.message


def test_penalties_and_logit_bias_change_the_output(client, ref):  # noqa: F811
    tok, _ = ref
    kw = {"model": "generate", "prompt": OPEN, "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**kw).choices[0]
    plain_ids = tok.encode(plain.text, add_special_tokens=False).ids
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                  {"extra_body": {"ignore_eos": True, "repetition_penalty": 2.0}}):
        other = client.completions.create(**{**kw, **extra}).choices[0]
        assert other.text != plain.text, extra
        ids = tok.encode(other.text, add_special_tokens=False).ids
        # fewer repeats: the share of distinct tokens grows
        assert len(set(ids)) / len(ids) > len(set(plain_ids)) / len(plain_ids), extra
    word = tok.token_to_id("Ġcache") or tok.encode(" cache", add_special_tokens=False).ids[0]
    forced = client.completions.create(**{**kw, "max_tokens": 5}, logit_bias={str(word): 100}).choices[0]
    assert forced.text == tok.decode([word] * 5)
    forbidden = {str(t): -100 for t in set(plain_ids)}
    other = client.completions.create(**{**kw, "max_tokens": 8}, logit_bias=forbidden).choices[0]
    assert not set(tok.encode(other.text, add_special_tokens=False).ids) & set(plain_ids)
    e = _status_error(lambda: client.completions.create(**kw, logit_bias={"x": 1}))
    assert e.status_code == 400 and e.body["param"] == "logit_bias"
    e = _status_error(lambda: client.completions.create(**kw, presence_penalty=3))
    assert e.body["param"] == "presence_penalty"


def test_top_k_cuts_the_draw_and_is_refused_when_invalid(client):  # noqa: F811
    """top_k 1 at a high temperature is greedy; a bad top_k is a 400 naming it; the scripted model (no top_k input)
    refuses it rather than ignoring it."""
    kw = {"model": "generate", "prompt": OPEN, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    cut = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "top_k": 1}}, temperature=2.0, seed=5)
    assert cut.choices[0].text == greedy
    wide = {client.completions.create(**kw, temperature=2.0, seed=s).choices[0].text for s in (1, 2, 3)}
    assert wide != {greedy}  # without the cut the same temperature leaves the greedy path
    e = _status_error(lambda: client.completions.create(**{**kw, "extra_body": {"top_k": -2}}))
    assert e.status_code == 400 and e.body["param"] == "top_k"
    msg = [{"role": "user", "content": "hi"}]
    e = _status_error(lambda: client.chat.completions.create(model="scripted", messages=msg, extra_body={"top_k": 3}))
    assert e.status_code == 400 and e.body["param"] == "top_k" and "not supported by model scripted" in e.message


def test_min_tokens_holds_off_the_end(client):  # noqa: F811
    # off-corpus text: the trained model ends it (almost) at once
    kw = {"model": "generate", "prompt": "zq xv", "max_tokens": 30, "temperature": 0}
    short = client.completions.create(**kw)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 10
    held = client.completions.create(**kw, extra_body={"min_tokens": 20})
    assert held.usage.completion_tokens >= 20


def test_fields_the_model_lacks_are_refused_naming_them(client):  # noqa: F811
    """`scripted` speaks the older contract (no sampling inputs): each field is a 400 naming it, never ignored."""
    msg = [{"role": "user", "content": "hi"}]
    for kw, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 1.0}, "presence_penalty"),
                      ({"logit_bias": {"5": 1}}, "logit_bias")]:
        e = _status_error(lambda kw=kw: client.chat.completions.create(model="scripted", messages=msg, **kw))
        assert e.status_code == 400 and e.body["param"] == param and "not supported by model scripted" in e.message
    e = _status_error(lambda: client.chat.completions.create(model="generate", messages=msg, top_logprobs=2))
    assert e.body["param"] == "top_logprobs" and "logprobs: true" in e.message


def test_async_streamed_n_chat_carries_each_index(aclient):  # noqa: F811
    async def run():
        s = await aclient.chat.completions.create(model="generate", messages=[{"role": "user", "content": QUESTION}],
                                                  max_tokens=6, temperature=0.8, seed=3, n=2, stream=True,
                                                  logprobs=True)
        return [c async for c in s]

    chunks = asyncio.run(run())
    by_index = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            if choice.logprobs:
                by_index[choice.index] += choice.logprobs.content
    assert len(by_index[0]) == len(by_index[1]) == 6
    assert all(e.logprob <= 0 for e in by_index[0] + by_index[1])


# ---- structured output -----------------------------------------------------------------------------------------
# nested objects, arrays, enums, required, nullable; numbers and strings bounded (a grammar cannot make a small
# model end an unbounded number: it would run to max_tokens, as it would on any server)
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
               "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"],
               "additionalProperties": False},
    "enum_flag": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                  "ok": {"type": "boolean"}}, "required": ["color", "ok"]},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
             "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
               "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": {"type": "string", "maxLength": 30}},
               "required": ["id", "email"]}, "active": {"type": "boolean"}}, "required": ["user", "active"]},
    "array_of_objects": {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {
                         "type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                          "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                         "required": ["x", "y"]}}}, "required": ["points"]},
    "nullable": {"type": "object", "properties": {"kind": {"type": "string", "enum": ["a", "b"]},
                 "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                 "note": {"type": ["string", "null"], "maxLength": 15}}, "required": ["kind", "count", "note"]},
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_for_every_schema(client, temperature):  # noqa: F811
    """Chat with response_format json_schema (strict), greedy and sampled: the reasoning is free (R1's template
    opened a think block), the content parses and validates against its schema for every schema of the set."""
    import json

    import jsonschema

    for name, schema in SCHEMAS.items():
        r = client.chat.completions.create(
            model="generate", messages=[{"role": "user", "content": QUESTION}], max_tokens=400,
            temperature=temperature, seed=7,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "stop", (name, m)
        assert m.model_extra["reasoning_content"], name  # the thought came first, unconstrained
        jsonschema.validate(json.loads(m.content), schema)


def test_json_object_whole_and_streamed_and_on_completions(client):  # noqa: F811
    import json

    kw = {"model": "generate", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400,
          "temperature": 0, "response_format": {"type": "json_object"}}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    assert isinstance(json.loads(whole), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == whole
    # completions take response_format too (vLLM's extension): no think block, all of the text is JSON
    r = client.completions.create(model="generate", prompt="Answer in JSON: ", max_tokens=200, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "p", "schema": SCHEMAS["person"]}}})
    assert json.loads(r.choices[0].text).keys() == {"name", "age"}


def test_bad_response_formats_are_refused(client):  # noqa: F811
    msg = [{"role": "user", "content": "hi"}]
    for fmt, needle in [({"type": "yaml"}, "response_format.type"),
                        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be"),
                        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
                         "not usable")]:
        e = _status_error(lambda fmt=fmt: client.chat.completions.create(model="generate", messages=msg,
                                                                         response_format=fmt))
        assert e.status_code == 400 and needle in e.message, e.message
    e = _status_error(lambda: client.chat.completions.create(model="scripted", messages=msg,
                                                             response_format={"type": "json_object"}))
    assert e.body["param"] == "response_format" and "not supported by model scripted" in e.message


# ---- prefix reuse, served ----------------------------------------------------------------------------------------
def test_served_prefix_reuse_answers_as_without_and_counts_its_hits(repos, triton, session_workdir, tmp_path):  # noqa: F811
    """A repository written with --prefix-cache-tokens, on its own CPU Triton: greedy and seeded requests that
    share a long prefix get exactly the tokens of the default repository (no reuse, the `triton` fixture), and
    the hit counters appear on the metrics port."""
    import json
    import urllib.request

    from exporter.repository import RepositoryConfig, write_repository
    from exporter.serve import ServerConfig, TritonServer

    repo = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=session_workdir, out=tmp_path / "prefix", onnx_variant="fp32",
                                             prefix_cache_tokens=4096))
    assert json.loads(next(ln for ln in (repo.out / "generate/config.pbtxt").read_text().splitlines()
                           if "prefix_cache_tokens" in ln).split("string_value:", 1)[1].strip()[1:-1]
                      .replace('\\"', '"'))["prefix_cache_tokens"] == 4096

    def ask(http: str, text: str, **kw) -> list[int]:
        body = json.dumps({"text_input": text, "max_tokens": 12, **kw}).encode()
        req = urllib.request.Request(f"http://{http}/v2/models/generate/generate", data=body)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["token_ids"]

    shared = "You are a careful assistant. " * 12
    asks = [(shared + q, kw) for q in ("What is a KV cache?", "What is prefill?", "What is decode?")
            for kw in ({}, {"temperature": 0.9, "seed": 4})]
    want = [ask(triton.endpoints.http, text, **kw) for text, kw in asks]
    with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
        got = [ask(srv.endpoints.http, text, **kw) for text, kw in asks]

        def value(name: str) -> float:
            with urllib.request.urlopen(f"http://{srv.endpoints.metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + "{"))

        # the model updates its metrics every 0.25 s from its loop: wait for the update after the last request
        deadline = time.monotonic() + 30
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(repo.out / "generate/1/tokenizer/tokenizer.json"))
        while value("r1deploy_generate_prefix_cache_query_tokens") < sum(len(tok.encode(t).ids) for t, _ in asks):
            assert time.monotonic() < deadline, "the prefix-cache metrics never appeared"
            time.sleep(0.2)
        hits, rate = value("r1deploy_generate_prefix_cache_hit_tokens"), value("r1deploy_generate_prefix_cache_hit_rate")
    assert got == want
    assert hits >= 5 * 64 and 0 < rate < 1
