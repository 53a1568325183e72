"""A real Triton server (the CPU build, python backend) serving r1-distill-tiny's `generate` and minilm's `embed`
from python_ort repositories: answers are checked against ONNX Runtime run directly in the test."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from functools import partial

import numpy as np
import pytest
from conftest import R1DEPLOY, REPO, assert_one_line, run_cli
from models import BROKEN

from exporter import tiny_models
from exporter.repository import RepositoryConfig, parse, write_repository
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


TYPES = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
         "seed": ("UINT64", np.uint64), "stream": ("BOOL", np.bool_), "ignore_eos": ("BOOL", np.bool_),
         "exclude_input_in_output": ("BOOL", np.bool_), "skip_special_tokens": ("BOOL", np.bool_),
         "return_num_input_tokens": ("BOOL", np.bool_), "return_num_output_tokens": ("BOOL", np.bool_)}


def grpc_inputs(prompt, **params):
    """Inputs shaped as Triton's LLM clients send them to a max_batch_size-1 model: [1, 1] scalars, [1, N] lists."""
    import tritonclient.grpc as grpcclient

    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    inputs = [text]
    for name, value in params.items():
        if name in ("stop", "stop_words"):
            t = grpcclient.InferInput(name, [1, len(value)], "BYTES")
            t.set_data_from_numpy(np.array([[s.encode() for s in value]], dtype=np.object_))
        else:
            dt, np_dt = TYPES[name]
            t = grpcclient.InferInput(name, [1, 1], dt)
            t.set_data_from_numpy(np.array([[value]], dtype=np_dt))
        inputs.append(t)
    return inputs


def grpc_stream(server, inputs, timeout: float = 60, barrier=None) -> tuple[list[dict], str | None]:
    """Send one request on a gRPC stream; the chunks until finish_reason is set, or the error. With a barrier,
    the request is sent once every party's stream is open."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()

    def callback(q, result, error):
        q.put((result, error))

    client = grpcclient.InferenceServerClient(server.endpoints.grpc)
    client.start_stream(callback=partial(callback, results))
    try:
        if barrier is not None:
            barrier.wait(timeout)
        client.async_stream_infer("generate", inputs)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result, error = results.get(timeout=timeout)
            if error is not None:
                return chunks, str(error)
            chunk = {
                "text": result.as_numpy("text_output").reshape(-1)[0].decode(),
                "tokens": result.as_numpy("token_ids").reshape(-1).tolist(),
                "finish": result.as_numpy("finish_reason").reshape(-1)[0].decode(),
                "num_input": int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
                "num_output": int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
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
    assert data["num_input_tokens"] == len(tokenizer.encode(PROMPT).ids) and data["num_output_tokens"] == len(expected)


def test_grpc_stream_chunks(server, tokenizer, greedy):
    expected = greedy(tokenizer.encode(PROMPT).ids, 12, {1})
    chunks, error = grpc_stream(server, grpc_inputs(PROMPT, max_tokens=12, stream=True))
    assert error is None
    *pieces, final = chunks
    # Tokens leave per scheduler step, and the sender merges a stream's later chunks that queue up behind a send,
    # so how many tokens those carry depends on timing; the first response is never merged into: it holds the
    # first step's tokens (the prefill's and one decode step's) and the rest follow
    assert len(chunks) >= 2 and 1 <= len(chunks[0]["tokens"]) <= 2
    assert all(c["finish"] == "" and c["tokens"] and c["num_output"] == len(c["tokens"]) for c in pieces)
    assert final["finish"] in ("length", "eos")
    assert [t for c in chunks for t in c["tokens"]] == expected
    assert sum(c["num_output"] for c in chunks) == len(expected)
    streamed = "".join(c["text"] for c in chunks)
    assert streamed == tokenizer.decode(expected, skip_special_tokens=True)


def test_http_generate_stream_sse(server, tokenizer, greedy):
    """HTTP generate_stream (SSE): the scheduler sends each step's tokens, and the sender merges a stream's queued
    chunks when it is behind, so how many events arrive depends on timing; 48 tokens give it room for more than
    one, and the events concatenate to the greedy answer."""
    expected = greedy(tokenizer.encode(PROMPT).ids, 48)
    body_in = {"text_input": PROMPT, "max_tokens": 48, "stream": True, "ignore_eos": True}
    status, body = http_generate(server, body_in, stream=True)
    assert status == 200
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) >= 2 and all(not e.get("error") for e in events)
    assert all(e["finish_reason"] == "" for e in events[:-1]) and events[-1]["finish_reason"] == "length"
    ids = [t for e in events for t in (e["token_ids"] if isinstance(e["token_ids"], list) else [e["token_ids"]])]
    assert ids == expected
    assert "".join(e["text_output"] for e in events) == tokenizer.decode(expected, skip_special_tokens=True)


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
    wrong_shape = grpcclient.InferInput("text_input", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    _, error = grpc_stream(server, [wrong_shape])
    assert error and "shape" in error
    wrong_type = grpcclient.InferInput("text_input", [1, 1], "INT32")
    wrong_type.set_data_from_numpy(np.array([[3]], dtype=np.int32))
    _, error = grpc_stream(server, [wrong_type])
    assert error and "data-type" in error.lower().replace("datatype", "data-type")
    _, error = grpc_stream(server, grpc_inputs(PROMPT, max_tokens=100000, stream=True))
    assert error and "max_tokens" in error
    assert server.process.poll() is None
    status, body = http_generate(server, {"text_input": PROMPT, "max_tokens": 4})
    assert status == 200 and len(json.loads(body)["token_ids"]) >= 1


def _infer(server, model: str, inputs: list[dict]) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{server.endpoints.http}/v2/models/{model}/infer",
                                 data=json.dumps({"inputs": inputs}).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_oversized_text_is_refused_before_tokenizing(server):
    big = "word " * 200_000  # 1 MB: the tokenizer model refuses it by size, without tokenizing it
    status, body = _infer(server, "embed", [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [big]}])
    assert status == 400 and "text of 1000000 bytes is longer than the 16384 bytes accepted" in body["error"], body
    status, body = _infer(server, "embed", [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["fine"]}])
    assert status == 200


def test_model_errors_are_one_line_and_the_traceback_goes_to_the_log(server):
    """The python_ort encoder fails inside ONNX Runtime (a token id outside the vocabulary): the client gets one
    clean line, Triton's log the traceback (pb_utils.Logger)."""
    ids = {"shape": [1, 1], "datatype": "INT64"}
    status, body = _infer(server, "encoder", [
        {"name": "input_ids", **ids, "data": [10_000_000]}, {"name": "attention_mask", **ids, "data": [1]},
        {"name": "token_type_ids", **ids, "data": [0]},
    ])
    assert status == 500 and body["error"].startswith("onnxruntime: ") and "\n" not in body["error"], body
    assert "Traceback" not in body["error"]
    deadline = time.monotonic() + 30  # the log is written by another process: wait for the line, not a time
    while "python_ort: 1 request(s) failed" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_path.read_text()
    assert "python_ort: 1 request(s) failed" in log and "Traceback (most recent call last)" in log


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


def test_serve_refuses_a_port_in_use(repos):
    """Another server on the HTTP port would answer the readiness probe: refused before anything starts."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = run_cli("serve", "--repository", str(repos["r1-distill-tiny"].out), "--http-port", str(port), timeout=120)
    assert_one_line(proc, 2, f"http port {port} on 127.0.0.1 is already in use")


def test_ports_chosen_for_a_server_are_outside_the_ephemeral_range():
    """A port the kernel can hand to an outgoing connection is one a restarted server may find taken (a `serve`
    restart was lost so under load): the ports serve picks lie below the ephemeral range, distinct, and free —
    each one binds (a real socket on the real range this kernel uses)."""
    import socket

    from exporter.serve import _ephemeral_range, free_ports

    low, high = _ephemeral_range()
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert all(1024 < p < low for p in ports), (ports, low, high)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


# What the CPU Triton says of the edge repository's generate model (one instance per GPU, running the TensorRT-RTX
# plan in-process): the GPU it asks for is not there. On a GPU without the runtime, the model's own load error
# names the package instead (engine_runtimes.MissingRuntime, tests/test_scheduler.py).
EDGE_ON_CPU = ("failed to load 'generate' version 1: Invalid argument: instance group gpu0 of model generate specifies "
               "invalid or unsupported gpu id 0")


def test_startup_failure_quotes_the_abort_line(exported, session_workdir, tmp_path):
    """One server start, two repositories that cannot load here: a python model that raises in initialize(), and
    the edge profile's real repository (issue 21 item 3), which needs a GPU. The user gets one line, not a
    traceback, and the edge model's own error is one line naming the GPU."""
    from exporter.serve import abort_reason

    repo = BROKEN["failing-model-repository"].build(None, tmp_path / "repo")
    exported("r1-distill-tiny")
    edge = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", workdir=session_workdir,
                                             out=tmp_path / "edge"))
    log = tmp_path / "triton.log"
    proc = run_cli("serve", "--repository", str(repo), "--repository", str(edge.out), "--log-file", str(log),
                   "--startup-timeout", "300", timeout=400)
    # Triton loads both at once: the line quotes whichever failed last (the python stub takes longer to start)
    bad = "failed to load 'bad' version 1: Internal: RuntimeError: weights file model.onnx is missing"
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    line = proc.stderr.strip()
    assert bad in line or EDGE_ON_CPU in line, line
    text = log.read_text()
    assert "CudaDriverHelper" in text  # the harmless line is in the log ...
    assert "CudaDriverHelper" not in line and "\\n" not in line  # ... but not what the user is told
    # the edge repository alone would be told this one line (its failure, from the same log)
    edge_only = "\n".join(x for x in text.splitlines() if "model.onnx is missing" not in x)
    reason = abort_reason(edge_only)
    assert reason is not None and reason.startswith(EDGE_ON_CPU) and "Traceback" not in reason, reason


def test_serve_restarts_a_dead_server(repos):
    """A server that dies (here SIGKILL; the probe found a request that segfaults Triton 2.51) comes back on the
    same ports, the restart is said on stderr, and the dead one's shared memory is removed."""
    from exporter.serve import _mapped_shm, _process_group

    proc = subprocess.Popen(
        [str(R1DEPLOY), "--json", "serve", "--repository", str(repos["r1-distill-tiny"].out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        first = json.loads(proc.stdout.readline() or "null")
        assert first and first["restarts"] == 0, proc.stderr.read()
        shm = _mapped_shm(_process_group(first["pid"]))
        assert shm, "the python backend maps its regions under /dev/shm"
        os.kill(first["pid"], signal.SIGKILL)
        second = json.loads(proc.stdout.readline() or "null")  # the next line comes once the new one is ready
        assert second and second["restarts"] == 1, proc.stderr.read()
        assert second["pid"] != first["pid"] and second["http"] == first["http"] and second["grpc"] == first["grpc"]
        with urllib.request.urlopen(f"http://{second['http']}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        assert not any(p.exists() for p in shm), "the dead server's /dev/shm regions are removed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stderr = proc.stderr.read()
        assert f"tritonserver (pid {first['pid']}) was killed by signal 9; restarting it (1/5)" in stderr
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


def test_concurrent_mixed_requests_equal_each_alone(server, tokenizer, greedy):
    """16 requests at once — mixed prompt lengths and max_tokens, streaming and whole — through the in-flight
    batching scheduler (edge profile: 4 rows, so most wait and join while others run): every answer equals, token
    for token, the same prompt decoded alone in-process."""
    from concurrent.futures import ThreadPoolExecutor

    words = "the key value cache stores attention keys and values of every past token step by step".split()
    cases = [(" ".join(words[: 2 + (3 * i) % 13]) + f" {i}", 3 + (5 * i) % 19, i % 2 == 0) for i in range(16)]

    def one(case):
        prompt, max_tokens, stream = case
        # ignore_eos: the trained model ends off-corpus prompts at once; every row runs its full length instead
        chunks, error = grpc_stream(server, grpc_inputs(prompt, max_tokens=max_tokens, stream=stream, ignore_eos=True))
        assert error is None, error
        return [t for c in chunks for t in c["tokens"]]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, cases))
    for (prompt, max_tokens, _), tokens in zip(cases, answers, strict=True):
        assert tokens == greedy(tokenizer.encode(prompt).ids, max_tokens), prompt


def test_triton_llm_client_request_shape(server, tokenizer, greedy):
    """A request exactly as Triton's OpenAI-compatible frontend builds it for a non-vLLM model (inputs [1, 1]:
    text_input, stream, max_tokens int32, stop_words, top_p, seed uint64, temperature; return_num_* and
    exclude_input_in_output), read as it reads it: text_output, num_input_tokens, num_output_tokens."""
    expected = greedy(tokenizer.encode(PROMPT).ids, 10, {1})
    inputs = grpc_inputs(PROMPT, stream=False, max_tokens=10, temperature=0.0, top_p=1.0, seed=7,
                         stop_words=["never-generated-zzz"], return_num_input_tokens=True,
                         return_num_output_tokens=True, exclude_input_in_output=True)
    chunks, error = grpc_stream(server, inputs)
    assert error is None and len(chunks) == 1
    (only,) = chunks
    assert only["tokens"] == expected and only["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert only["num_input"] == len(tokenizer.encode(PROMPT).ids) and only["num_output"] == len(expected)
    echoed, error = grpc_stream(server, grpc_inputs(PROMPT, max_tokens=4, exclude_input_in_output=False))
    assert error is None and echoed[0]["text"].startswith(PROMPT)
    ignoring, error = grpc_stream(server, grpc_inputs(PROMPT, max_tokens=30, ignore_eos=True))
    assert error is None and len(ignoring[0]["tokens"]) == 30 and ignoring[0]["finish"] == "length"


def metric_values(server, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{server.endpoints.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_scheduler_metrics_and_cancellation(server):
    """A cancelled stream leaves the running batch (the scheduler's own metrics on Triton's metrics port show
    it), and the server goes on serving.

    The stream is cancelled from the client's callback on its first response. A request of the tiny model can
    still reach `max_tokens` (512, the edge profile's limit) before the cancellation arrives on a fast machine —
    that is not a defect, so an attempt that ends by length is repeated (up to five times); the test fails only
    if no attempt is ever seen leaving as cancelled."""
    import tritonclient.grpc as grpcclient

    def finished(reason: str) -> float:
        vals = metric_values(server, "r1deploy_generate_requests_finished{")
        return sum(v for k, v in vals.items() if f'reason="{reason}"' in k)

    outcomes = []
    for _ in range(5):
        cancelled_before, length_before = finished("cancelled"), finished("length")
        client = grpcclient.InferenceServerClient(server.endpoints.grpc)
        first = threading.Event()
        errors: list = []

        def callback(result, error, client=client, first=first, errors=errors):
            if error is not None:
                errors.append(error)
            if not first.is_set():
                first.set()
                threading.Thread(target=client.stop_stream, kwargs={"cancel_requests": True}).start()

        client.start_stream(callback=callback)
        client.async_stream_infer("generate", grpc_inputs(PROMPT, max_tokens=512, stream=True, ignore_eos=True))
        assert first.wait(60), "no first response"
        # the model's metrics are flushed to Triton every quarter second
        wait_for(lambda c=cancelled_before, n=length_before: finished("cancelled") > c or finished("length") > n,
                 what="the request to leave the batch")
        client.close()
        outcomes.append("cancelled" if finished("cancelled") > cancelled_before else "length")
        if outcomes[-1] == "cancelled":
            break
    assert outcomes[-1] == "cancelled", f"every attempt reached max_tokens before its cancellation: {outcomes}"
    wait_for(lambda: sum(metric_values(server, "r1deploy_generate_requests_running").values()) == 0, what="an empty batch")
    for name in ("requests_waiting", "kv_cache_utilization", "queue_duration_us", "time_to_first_token_us",
                 "generated_tokens", "requests_admitted"):
        assert metric_values(server, f"r1deploy_generate_{name}"), name
    assert sum(metric_values(server, "r1deploy_generate_generated_tokens").values()) > 0
    status, body = http_generate(server, {"text_input": PROMPT, "max_tokens": 4})
    assert status == 200 and len(json.loads(body)["token_ids"]) >= 1


def test_queue_limit_answers_server_busy(exported, session_workdir, tmp_path):
    """One row and a queue of one: of several long requests at once, the ones beyond the queue are refused at
    once with "server busy", the others are served."""
    from concurrent.futures import ThreadPoolExecutor

    exported("r1-distill-tiny")
    repo = write_repository(RepositoryConfig(
        model="r1-distill-tiny", profile="edge", variant="python_ort", workdir=session_workdir,
        out=tmp_path / "busy", onnx_variant="fp32", max_rows=1, max_queue=1,
    ))
    with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
        together = threading.Barrier(5)  # all five are sent at once, not as fast as each client connects
        with ThreadPoolExecutor(5) as pool:
            runs = list(pool.map(lambda _: grpc_stream(srv, grpc_inputs(PROMPT, max_tokens=512, ignore_eos=True),
                                                       barrier=together), range(5)))
        errors = [err for _, err in runs if err]
        served = [chunks for chunks, err in runs if not err]
        assert errors and all("server busy" in e for e in errors), errors
        assert len(served) >= 2 and all(len(c[-1]["tokens"]) == 512 for c in served)
        # the model's metrics are flushed to Triton every quarter second
        wait_for(lambda: sum(metric_values(srv, "r1deploy_generate_requests_rejected").values()) == len(errors),
                 what="the refusals in r1deploy_generate_requests_rejected")


def test_fused_graph_served_by_the_scheduler(exported, session_workdir, tmp_path, tokenizer, greedy):
    """The fused graph (`export --graph fused`: GroupQueryAttention over an in-place KV buffer) served by the
    generate model's scheduler through its shared-buffer engine: concurrent requests of different lengths, streamed
    and whole, equal the generic graph's greedy loop token for token."""
    from concurrent.futures import ThreadPoolExecutor

    from exporter.export import ExportConfig, export_model

    export_model(ExportConfig(model="r1-distill-tiny", workdir=session_workdir, graph="fused"))
    repo = write_repository(RepositoryConfig(
        model="r1-distill-tiny", profile="edge", variant="python_ort", workdir=session_workdir, out=tmp_path / "fused",
        graph="fused", max_rows=4, onnx_variant="fp32-fused",  # the FP32 reference's graph, whatever else is exported
    ))
    gen = parse((repo.out / "generate/config.pbtxt").read_text(), "generate")
    assert gen.parameters["kv_layout"].string_value == "shared" and not (repo.out / "llm").exists()
    assert (repo.out / gen.parameters["engine_file"].string_value).is_file()
    cases = [(f"{PROMPT} {'and more ' * i}", 4 + 3 * i, i % 2 == 0) for i in range(8)]
    with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
        with ThreadPoolExecutor(8) as pool:
            runs = list(pool.map(lambda c: grpc_stream(srv, grpc_inputs(c[0], max_tokens=c[1], stream=c[2],
                                                                        ignore_eos=True)), cases))
    for (prompt, max_tokens, _), (chunks, error) in zip(cases, runs, strict=True):
        assert error is None, error
        assert [t for c in chunks for t in c["tokens"]] == greedy(tokenizer.encode(prompt).ids, max_tokens), prompt


def test_abort_reason_skips_the_cuda_lines_and_prefers_the_fatal_one():
    """Lines as Triton 2.51 logged them here when its gRPC port was taken between r1deploy's check and its bind
    (a race the port check before start cannot close): the fatal main.cc line names the port."""
    from exporter.serve import abort_reason

    log = "\n".join([
        'E1201 09:37:27.632083 19194 server.cc:241] "CudaDriverHelper has not been initialized."',
        'W1201 09:37:27.631948 19194 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory"',
        "E1201 09:37:29.791423805   19194 chttp2_server.cc:1060]                UNKNOWN:No address added out of total 1 resolved",
        'E1201 09:37:29.794878 19194 main.cc:245] "failed to start GRPC service: Unavailable - Socket \'127.0.0.1:44173\' already in use "',
    ])
    assert abort_reason(log) == "failed to start GRPC service: Unavailable - Socket '127.0.0.1:44173' already in use"
    assert abort_reason(log.splitlines()[0]) is None  # the harmless line alone is no reason
