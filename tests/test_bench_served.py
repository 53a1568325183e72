"""`r1deploy bench` against the models `r1deploy repository` writes for CPU (python_ort variant): the streaming
`generate` LLM (r1-distill-tiny) and the `embed` ensemble (MiniLM), on a real Triton server."""

from __future__ import annotations

import pytest

from exporter.bench import BenchConfig, run_bench

pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(exported, session_workdir, tmp_path_factory):
    from exporter.repository import RepositoryConfig, write_repository
    from exporter.serve import ServerConfig, TritonServer

    out = tmp_path_factory.mktemp("served")
    repos = []
    for model in ("r1-distill-tiny", "minilm"):
        exported(model)
        r = write_repository(RepositoryConfig(model=model, profile="edge", variant="python_ort",
                                              workdir=session_workdir, onnx_variant="fp32", out=out / model))
        repos.append(r.out)
    cfg = ServerConfig(model_repository=repos[0], exit_timeout_s=2, extra_args=[f"--model-repository={repos[1]}"])
    with TritonServer(cfg) as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_streaming(served, protocol):
    url = served.endpoints.grpc if protocol == "grpc" else served.endpoints.http
    cfg = BenchConfig(url=url, model="generate", protocol=protocol, concurrency=[2], window_s=1.0, warmup_s=0.5,
                      stability_pct=100, input_tokens=8, output_tokens=6)
    r = run_bench(cfg)
    (lv,) = r.levels
    assert r.kind == "llm" and lv.errors == 0 and lv.requests > 0, lv.first_error
    # greedy decoding may stop early at an end-of-sequence token, never later than max_tokens
    assert 0 < lv.llm.tokens_per_request <= 6
    assert 0 < lv.llm.ttft_ms.p50 < lv.latency_ms.p50
    assert lv.llm.itl_ms.count > 0 and lv.llm.itl_ms.p50 > 0


def test_embed_ensemble(served):
    cfg = BenchConfig(url=served.endpoints.grpc, model="embed", concurrency=[1, 2], window_s=0.5, warmup_s=0.3,
                      stability_pct=100)
    r = run_bench(cfg)
    assert r.kind == "plain"
    for lv in r.levels:
        assert lv.errors == 0 and lv.throughput_rps > 0, lv.first_error
        assert lv.latency_ms.p50 <= lv.latency_ms.p99
