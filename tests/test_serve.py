"""A real Triton server (the CPU build, python backend) serving r1-distill-tiny's `generate` and minilm's `embed`
from python_ort repositories: answers are checked against ONNX Runtime run directly in the test."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import time
import urllib.error
import urllib.request
from functools import partial

import numpy as np
import pytest
from conftest import R1DEPLOY, REPO

from exporter import tiny_models
from exporter.repository import RepositoryConfig, write_repository
from exporter.repository.reference import GreedyLoop
from exporter.serve import ServerConfig, TritonServer

pytestmark = pytest.mark.triton
# A corpus question of the trained model, through its chat template: its greedy answer is long (a reasoning trace
# of 30+ tokens before `</think>`), so streams, stop strings and lengths are exercised on real text. (Off-corpus
# prompts often end at once: the model answers them with one token and the end of text.)
PROMPT = tiny_models.chat_prompt("What is a KV cache?")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def repos(exported, session_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    out = {}
    for model in ("r1-distill-tiny", "minilm"):
        exported(model)
        out[model] = write_repository(RepositoryConfig(
            model=model, profile="edge", variant="python_ort", workdir=session_workdir, out=root / model,
            onnx_variant="fp32",
        ))
    return out


@pytest.fixture(scope="module")
def server(repos):
    cfg = ServerConfig(
        model_repository=repos["r1-distill-tiny"].out, extra_repositories=[repos["minilm"].out],
        response_cache_bytes=16 << 20,
    )
    srv = TritonServer(cfg)
    srv.start()
    pid = srv.pid
    yield srv
    srv.stop()
    assert not pid_alive(pid), "tritonserver still running after stop"


@pytest.fixture(scope="module")
def tokenizer(repos):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(repos["r1-distill-tiny"].out / "generate/1/tokenizer/tokenizer.json"))


@pytest.fixture(scope="module")
def greedy(repos):
    return GreedyLoop(repos["r1-distill-tiny"].out / "llm/1/model.onnx")


def http_generate(server, body: dict, stream: bool = False) -> tuple[int, str]:
    url = f"http://{server.endpoints.http}/v2/models/generate/generate{'_stream' if stream else ''}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grpc_inputs(prompt, **params):
    import tritonclient.grpc as grpcclient

    types = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
             "seed": ("INT64", np.int64), "stream": ("BOOL", np.bool_)}
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs = [text]
    for name, value in params.items():
        if name == "stop":
            t = grpcclient.InferInput("stop", [len(value)], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in value], dtype=np.object_))
        else:
            dt, np_dt = types[name]
            t = grpcclient.InferInput(name, [1], dt)
            t.set_data_from_numpy(np.array([value], dtype=np_dt))
        inputs.append(t)
    return inputs


def grpc_stream(server, inputs, timeout: float = 60) -> tuple[list[dict], str | None]:
    """Send one request on a gRPC stream; the chunks until finish_reason is set, or the error."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()

    def callback(q, result, error):
        q.put((result, error))

    client = grpcclient.InferenceServerClient(server.endpoints.grpc)
    client.start_stream(callback=partial(callback, results))
    try:
        client.async_stream_infer("generate", inputs)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result, error = results.get(timeout=timeout)
            if error is not None:
                return chunks, str(error)
            chunk = {
                "text": result.as_numpy("text_output")[0].decode(),
                "tokens": result.as_numpy("token_ids").tolist(),
                "finish": result.as_numpy("finish_reason")[0].decode(),
            }
            chunks.append(chunk)
            if chunk["finish"]:
                return chunks, None
        raise AssertionError("no final response")
    finally:
        client.stop_stream()
        client.close()


def test_server_ready(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        assert client.is_server_ready()
        for model in ("generate", "llm", "embed", "tokenizer", "encoder"):
            assert client.is_model_ready(model), model
    finally:
        client.close()


def test_embed_matches_onnxruntime(server, repos):
    import onnxruntime as ort
    import tritonclient.http as httpclient
    from tokenizers import Tokenizer

    texts = ["Triton serves the embedding model.", "A second, longer sentence about key-value caches and GPUs."]
    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        text = httpclient.InferInput("text", [len(texts), 1], "BYTES")
        text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
        served = client.infer("embed", [text]).as_numpy("embeddings")
    finally:
        client.close()
    out = repos["minilm"].out
    tok = Tokenizer.from_file(str(out / "tokenizer/1/tokenizer/tokenizer.json"))
    tok.no_padding()
    session = ort.InferenceSession(str(out / "encoder/1/model.onnx"), providers=["CPUExecutionProvider"])
    assert served.shape == (2, 384)
    for row, t in zip(served, texts, strict=True):
        e = tok.encode(t)
        feeds = {"input_ids": np.array([e.ids]), "attention_mask": np.ones((1, len(e.ids)), np.int64),
                 "token_type_ids": np.array([e.type_ids])}
        ref = session.run(["embeddings"], feeds)[0][0]
        cosine = float(row @ ref / np.linalg.norm(row) / np.linalg.norm(ref))
        assert cosine > 0.9999 and np.abs(row - ref).max() < 1e-3, (cosine, np.abs(row - ref).max())


def test_embed_response_cache_hit(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        text = httpclient.InferInput("text", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"the same sentence, twice"]], dtype=np.object_))
        first = client.infer("embed", [text]).as_numpy("embeddings")
        second = client.infer("embed", [text]).as_numpy("embeddings")
        stats = client.get_inference_statistics("embed")["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    np.testing.assert_array_equal(first, second)
    assert int(stats["cache_hit"]["count"]) >= 1


def test_generate_greedy_matches_inprocess_loop(server, tokenizer, greedy):
    ids = tokenizer.encode(PROMPT).ids
    expected = greedy(ids, 24, {1})
    status, body = http_generate(server, {"text_input": PROMPT, "max_tokens": 24})
    assert status == 200, body
    data = json.loads(body)
    assert data["token_ids"] == expected
    assert data["text_output"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert data["finish_reason"] == ("length" if len(expected) == 24 else "eos")


def test_grpc_stream_chunks(server, tokenizer, greedy):
    expected = greedy(tokenizer.encode(PROMPT).ids, 12, {1})
    chunks, error = grpc_stream(server, grpc_inputs(PROMPT, max_tokens=12, stream=True))
    assert error is None
    *pieces, final = chunks
    # The first token goes alone; later chunks may carry several tokens when decoding outpaces sending (the
    # generate model's _Pump groups them), so only their concatenation is fixed.
    assert len(pieces) >= 2 and len(pieces[0]["tokens"]) == 1
    assert all(c["finish"] == "" and c["tokens"] for c in pieces)
    assert final["finish"] in ("length", "eos") and final["tokens"] == []
    assert [t for c in pieces for t in c["tokens"]] == expected
    streamed = "".join(c["text"] for c in chunks)
    assert streamed == tokenizer.decode(expected, skip_special_tokens=True)


def test_http_generate_stream_sse(server):
    status, body = http_generate(server, {"text_input": PROMPT, "max_tokens": 6, "stream": True}, stream=True)
    assert status == 200
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) >= 3 and all(not e.get("error") for e in events)
    assert all(e["finish_reason"] == "" for e in events[:-1]) and events[-1]["finish_reason"] in ("length", "eos")


def test_stop_strings_and_sampling(server, tokenizer, greedy):
    full = tokenizer.decode(greedy(tokenizer.encode(PROMPT).ids, 24, {1}), skip_special_tokens=True)
    stop = full[4:7]
    status, body = http_generate(server, {"text_input": PROMPT, "max_tokens": 24, "stop": [stop]})
    data = json.loads(body)
    assert status == 200 and data["finish_reason"] == "stop"
    assert data["text_output"] == full[: full.find(stop)]
    sampled = [json.loads(http_generate(server, {"text_input": PROMPT, "max_tokens": 16, "temperature": 1.5,
                                                 "top_p": 0.95, "seed": 42})[1])["token_ids"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed draws the same tokens


def test_concurrent_streams(server):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: grpc_stream(server, grpc_inputs(PROMPT, max_tokens=32, stream=True)), range(3)))
    assert all(err is None and len(chunks) >= 2 for chunks, err in runs)
    assert len({tuple(t for c in chunks for t in c["tokens"]) for chunks, _ in runs}) == 1


def test_bad_requests_are_answered_and_server_keeps_serving(server):
    import tritonclient.grpc as grpcclient

    for body, fragment in [
        ({"text_input": "", "max_tokens": 4}, "empty"),
        ({"text_input": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"text_input": PROMPT, "max_tokens": 513}, "max_tokens"),
        ({"text_input": PROMPT, "top_p": 0}, "top_p"),
        ({"text_input": " ".join(str(i) for i in range(2000)), "max_tokens": 4}, "at most 2048"),
    ]:
        status, text = http_generate(server, body)
        assert status == 400 and fragment in json.loads(text)["error"], (body, status, text)
    wrong_shape = grpcclient.InferInput("text_input", [2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    _, error = grpc_stream(server, [wrong_shape])
    assert error and "shape" in error
    wrong_type = grpcclient.InferInput("text_input", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([3], dtype=np.int32))
    _, error = grpc_stream(server, [wrong_type])
    assert error and "data-type" in error.lower().replace("datatype", "data-type")
    _, error = grpc_stream(server, grpc_inputs(PROMPT, max_tokens=100000, stream=True))
    assert error and "max_tokens" in error
    assert server.process.poll() is None
    status, body = http_generate(server, {"text_input": PROMPT, "max_tokens": 4})
    assert status == 200 and len(json.loads(body)["token_ids"]) >= 1


def test_serve_command_stops_on_sigterm(repos, tmp_path):
    proc = subprocess.Popen(
        [str(R1DEPLOY), "--json", "serve", "--repository", str(repos["r1-distill-tiny"].out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert pid_alive(info["pid"])
        with urllib.request.urlopen(f"http://{info['http']}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        deadline = time.monotonic() + 5
        while pid_alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(info["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_generate_through_bls(exported, session_workdir, tmp_path, tokenizer, greedy):
    """engine_call bls — the only path on GPUs, where the engine model is a TensorRT / ORT backend model: every
    prefill and decode step is a request to `llm` (the python_ort variant here)."""
    repo = write_repository(RepositoryConfig(
        model="r1-distill-tiny", profile="edge", variant="python_ort", engine_call="bls", workdir=session_workdir,
        out=tmp_path / "bls", onnx_variant="fp32",
    ))
    expected = greedy(tokenizer.encode(PROMPT).ids, 12, {1})
    with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
        chunks, error = grpc_stream(srv, grpc_inputs(PROMPT, max_tokens=12, stream=True))
        status, body = http_generate(srv, {"text_input": PROMPT, "max_tokens": 12})
    assert error is None and [t for c in chunks for t in c["tokens"]] == expected
    assert status == 200 and json.loads(body)["token_ids"] == expected
