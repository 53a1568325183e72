"""`r1deploy pipeline` end to end on the default model, through the real console script: every stage runs
for real here (TensorRT-RTX engine, a real Triton server, kustomize); full TensorRT is absent and its engines
must be reported as skipped with the install hint — never as done — and the repositories that need those engines
as incomplete, naming what is missing."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_one_line, copy_workdir


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.rtx
def test_pipeline_runs_every_stage_and_reports_skips(tmp_path, r1):
    proc = r1("--workdir", str(tmp_path), "--json", "pipeline", "--bench-seconds", "0.5", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    stages = {s["stage"]: s for s in result["stages"]}
    assert result["failed"] is None
    for name in ("export", "quantize fp16", "quantize int4-awq-b128-qdq", "engine edge", "repository edge",
                 "repository cpu", "manifests"):
        assert stages[name]["status"] == "ok", stages.get(name)
    # a short bench on a busy machine may not settle: that is an incomplete measurement, never a failure
    assert stages["serve + bench"]["status"] in ("ok", "incomplete"), stages["serve + bench"]
    for name in ("engine production", "engine research"):
        assert stages[name]["status"] == "skipped"
        assert "r1deploy[gpu]" in stages[name]["detail"]
    for name in ("repository production", "repository research"):  # written, but without the engine they serve
        assert stages[name]["status"] == "incomplete", stages[name]
        assert stages[name]["detail"].startswith("missing llm/1/model.plan")
    assert stages["export"]["figures"]["max_abs_diff"] <= 1e-4
    assert stages["quantize int4-awq-b128-qdq"]["figures"]["accuracy"]["logits_cosine"] >= 0.95
    served = stages["serve + bench"]["figures"]
    assert served["request"].startswith("generate →")
    # the served default model answers its corpus question legibly: its reasoning, then its answer
    from exporter.tiny_models import CHAT_TURNS

    question, reasoning, answer = CHAT_TURNS[0]
    assert (served["question"], served["reasoning"], served["answer"]) == (question, reasoning, answer)
    assert served["finish_reason"] == "eos"
    assert served["bench"]["throughput_rps"] > 0 and served["bench"]["tokens_per_s"] > 0
    assert (tmp_path / "r1-distill-tiny" / "engines" / "edge" / "engine.json").is_file()
    assert (tmp_path / "r1-distill-tiny" / "k8s" / "overlays" / "production" / "kustomization.yaml").is_file()
    # a second run finds every stage up to date; --strict makes the skipped and incomplete rows an exit 1
    again = r1("--workdir", str(tmp_path), "--json", "pipeline", "--no-serve", "--strict", timeout=900)
    line = assert_one_line(again, 1, "--strict: 4 stage(s) not ok")
    assert "repository production incomplete" in line and "engine research skipped" in line
    details = {s["stage"]: s["detail"] for s in json.loads(again.stdout)["stages"]}
    assert "(up to date)" in details["export"] and "(up to date)" in details["engine edge"]


@pytest.mark.slow
def test_a_failed_stage_prints_the_summary_so_far_and_json(tmp_path, r1, exported, session_workdir):
    """TensorRT-RTX installed but broken (a stub module that fails to load, as a missing CUDA library does): the
    edge engine row says failed with the error — not skipped — and the rows before it, the JSON and the one-line
    error still come out."""
    exported("r1-distill-tiny")
    wd = copy_workdir(session_workdir, tmp_path / "w", "r1-distill-tiny")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for mod in ("tensorrt_rtx_bindings", "tensorrt_rtx"):
        (stubs / f"{mod}.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])}
    proc = r1("--workdir", str(wd), "--json", "pipeline", "--profile", "edge", "--no-serve", env=env, timeout=900)
    line = assert_one_line(proc, 1, "engine edge: TensorRT-RTX is installed but cannot be loaded")
    assert "libcudart.so.13" in line
    result = json.loads(proc.stdout)
    rows = [(s["stage"], s["status"]) for s in result["stages"]]
    assert rows == [("export", "ok"), ("export fused", "ok"), ("quantize int4-awq-b128-qdq", "ok"), ("engine edge", "failed")]
    assert result["failed"].startswith("engine edge: TensorRT-RTX is installed but cannot be loaded")
    # without --json the human table is printed before the error
    human = r1("--workdir", str(wd), "pipeline", "--profile", "edge", "--no-serve", env=env, timeout=900)
    assert human.returncode == 1 and "engine edge" in human.stdout and "failed" in human.stdout
