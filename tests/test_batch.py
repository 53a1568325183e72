"""`r1deploy batch`: OpenAI batch files through the gateway in front of a real CPU Triton — killed mid-run (SIGKILL)
and rerun, every custom_id is in the output exactly once; failures land in the errors file and set the exit code;
bad input files are exit 2 naming the line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import R1DEPLOY, REPO, run_cli
from test_gateway import _write_scripted

ENV = {"PYTHONPATH": str(REPO)}


def _line(cid: str, prompt: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "scripted", "prompt": prompt, **body}})


@pytest.mark.parametrize("lines,fragment", [
    (['{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}}', "{not json"], ":2: not a JSON object"),
    ([_line("a", "x"), _line("b", "y"), _line("a", "z")], ":3: duplicate custom_id 'a' (first on line 1)"),
    ([_line("a", "x"), json.dumps({"method": "POST", "url": "/v1/completions", "body": {"model": "m"}})], ":2: missing custom_id"),
    ([json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}})], ":1: url must be"),
])
def test_bad_input_is_exit_2_naming_the_line(tmp_path, lines, fragment):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    r = run_cli("batch", "--url", "http://127.0.0.1:9", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), env=ENV)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.jsonl").exists()  # nothing sent, nothing written


@pytest.fixture(scope="module")
def gateway(exported, session_workdir, tmp_path_factory):
    from exporter.gateway import GatewayConfig, GatewayServer
    from exporter.repository import RepositoryConfig, write_repository
    from exporter.serve import ServerConfig, TritonServer

    root = tmp_path_factory.mktemp("batch")
    exported("r1-distill-tiny")
    real = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=session_workdir, out=root / "real", onnx_variant="fp32"))
    scripted = _write_scripted(root / "scripted_repo", real.out / "generate" / "1" / "tokenizer", root / "markers")
    with TritonServer(ServerConfig(model_repository=scripted)) as triton:
        with GatewayServer(GatewayConfig(triton=triton.endpoints.grpc, repositories=[scripted], port=0)) as gw:
            yield gw.url


def _ids(path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


@pytest.mark.triton
def test_killed_mid_run_then_resumed_writes_each_custom_id_once(gateway, tmp_path):
    n = 24
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    # [slow]: 50 ms per token, so the run lasts seconds and the kill lands mid-run
    src.write_text("\n".join(_line(f"req-{i:03d}", "[slow] count", max_tokens=6, seed=i) for i in range(n)) + "\n")
    args = [str(R1DEPLOY), "-q", "batch", "--url", gateway, "--input", str(src), "--output", str(out), "--concurrency", "3"]
    proc = subprocess.Popen(args, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _ids(out)
    assert 4 <= len(first) < n, "the kill did not land mid-run"
    r = run_cli("-q", "batch", "--url", gateway, "--input", str(src), "--output", str(out), "--concurrency", "3", env=ENV)
    assert r.returncode == 0, r.stderr
    ids = _ids(out)
    assert sorted(ids) == [f"req-{i:03d}" for i in range(n)]  # each exactly once
    assert ids[: len(first)] == first  # the first run's lines kept as they were
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(row["response"]["status_code"] == 200 and row["error"] is None for row in rows)
    assert all(row["response"]["body"]["object"] == "text_completion" for row in rows)
    # a third run has nothing left to do
    r = run_cli("--json", "batch", "--url", gateway, "--input", str(src), "--output", str(out), env=ENV)
    assert r.returncode == 0 and json.loads(r.stdout)["already_done"] == n and json.loads(r.stdout)["succeeded"] == 0


@pytest.mark.triton
def test_failures_go_to_the_errors_file_and_fail_the_run(gateway, tmp_path):
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    chat = json.dumps({"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "scripted", "messages": [{"role": "user", "content": "[script:open] 2+2?"}]}})
    src.write_text("\n".join([_line("ok-1", "[script:noopen] hi"), _line("bad-n", "hi", n=2), chat,
                              _line("busy", "[busy] hi"), _line("unknown-model", "hi", model="nope")]) + "\n")
    r = run_cli("batch", "--url", gateway, "--input", str(src), "--output", str(out), "--retries", "0", env=ENV)
    assert r.returncode == 1, r.stderr
    assert "3 of 5 requests failed" in r.stderr
    assert sorted(_ids(out)) == ["chat-1", "ok-1"]
    rows = {row["custom_id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows["chat-1"]["response"]["body"]["choices"][0]["message"]["reasoning_content"] == "Let me think."
    errors = {row["custom_id"]: row for row in map(json.loads, (tmp_path / "results.errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"bad-n", "busy", "unknown-model"}
    assert errors["bad-n"]["error"]["code"] == "400" and "n is not supported by model scripted" in errors["bad-n"]["error"]["message"]
    assert errors["busy"]["response"]["status_code"] == 429 and errors["unknown-model"]["error"]["code"] == "404"
