"""`r1deploy pipeline` end to end on the default model, through the real console script: every stage runs
for real here (TensorRT-RTX engine, a real Triton server, kustomize); full TensorRT is absent and its engines
must be reported as skipped with the install hint — never as done."""

from __future__ import annotations

import json


def test_pipeline_runs_every_stage_and_reports_skips(tmp_path, r1):
    proc = r1("--workdir", str(tmp_path), "--json", "pipeline", "--bench-seconds", "0.5", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    stages = {s["stage"]: s for s in result["stages"]}
    assert result["failed"] is None
    for name in ("export", "quantize fp16", "quantize int4-awq-b128-qdq", "engine edge", "repository production",
                 "repository research", "repository edge", "repository cpu", "manifests", "serve + bench"):
        assert stages[name]["status"] == "ok", stages.get(name)
    for name in ("engine production", "engine research"):
        assert stages[name]["status"] == "skipped"
        assert "r1deploy[gpu]" in stages[name]["detail"]
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
    # a second run finds every stage up to date
    again = r1("--workdir", str(tmp_path), "--json", "pipeline", "--no-serve", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    details = {s["stage"]: s["detail"] for s in json.loads(again.stdout)["stages"]}
    assert "(up to date)" in details["export"] and "(up to date)" in details["engine edge"]
