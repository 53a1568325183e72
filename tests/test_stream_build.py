"""The streaming builder (exporter/stream_build.py): checkpoint shards → the fused graph at FP32 / FP16 / INT4, one
tensor at a time. Each output is checked against what `export --graph fused` + `quantize --graph fused` write from
the same checkpoint — the same nodes, the same initializer bytes (AWQ: the same choices, scales to float rounding)
— and both run in the real ONNX Runtime on rows of different lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line
from onnx import numpy_helper

from exporter.core.errors import BadInput, StageFailed
from exporter.core.profiles import AccuracyGate
from exporter.export import ExportConfig, export_model
from exporter.sources import resolve_source
from exporter.stream_build import StreamConfig, stream_build
from quantize import QuantizeConfig, quantize_model
from quantize.evaluate import fused_feeds, session

MODEL = "r1-distill-tiny"
CASES = {
    "fp32": (StreamConfig(), None),
    "fp16": (StreamConfig(precision="fp16"), dict(precision="fp16")),
    "rtn-qdq": (StreamConfig(precision="int4", method="rtn", block_size=32, format="qdq"),
                dict(precision="int4", method="rtn", block_size=32, format="qdq")),
    "rtn-ort": (StreamConfig(precision="int4", method="rtn", block_size=32, format="ort"),
                dict(precision="int4", method="rtn", block_size=32, format="ort")),
    "awq-qdq": (StreamConfig(precision="int4", method="awq", block_size=32, format="qdq"),
                dict(precision="int4", method="awq", block_size=32, format="qdq")),
}


def _nodes(m: onnx.ModelProto) -> list:
    return [n.SerializeToString() for n in m.graph.node]


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def _run(path: Path, lengths: list[int], report: dict) -> np.ndarray:
    """Logits at every position of right-padded rows of different lengths, in one call."""
    width = max(lengths)
    mask = np.arange(width)[None, :] < np.array(lengths)[:, None]
    ids = np.where(mask, (np.arange(width)[None, :] * 7 + np.arange(len(lengths))[:, None] * 13 + 5) % 200, 0)
    sess = session(path)
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {"input_ids": ids.astype(np.int64), **fused_feeds(mask.astype(np.int64), report["cache"])}
    feeds = {k: (v.astype(np.float16) if types[k] == "tensor(float16)" else v) for k, v in feeds.items()}
    return np.asarray(sess.run(["logits"], feeds)[0], np.float32)[mask]


@pytest.fixture(scope="module")
def built(exported_fused, session_workdir, tmp_path_factory):
    """Both paths from the same checkpoint: stream_build → out[key, "stream"], the stages → out[key, "stages"]."""
    fused = exported_fused(MODEL)
    ckpt = resolve_source(MODEL, session_workdir).path
    root = tmp_path_factory.mktemp("stream")
    out = {"report": json.loads(fused.report_path.read_text())}
    for key, (scfg, qcfg) in CASES.items():
        out[key, "stream"] = stream_build(ckpt, root / key, scfg).onnx_path
        out[key, "stages"] = fused.onnx_path if qcfg is None else quantize_model(
            QuantizeConfig(model=MODEL, workdir=session_workdir, graph="fused", **qcfg)).onnx_path
    return out


@pytest.mark.parametrize("key", ["fp32", "fp16", "rtn-qdq", "rtn-ort"])
def test_streamed_graph_is_the_one_the_stages_write(built, key):
    """FP32, FP16 and INT4 RTN: node for node and byte for byte the graph of export + quantize (only where the
    weight bytes live differs: the stream always writes model.onnx.data)."""
    a, b = onnx.load(str(built[key, "stream"])), onnx.load(str(built[key, "stages"]))
    assert _nodes(a) == _nodes(b)
    assert [v.SerializeToString() for v in a.graph.input] == [v.SerializeToString() for v in b.graph.input]
    assert [v.SerializeToString() for v in a.graph.output] == [v.SerializeToString() for v in b.graph.output]
    ai, bi = _inits(a), _inits(b)
    assert set(ai) == set(bi)
    for name, value in bi.items():
        assert ai[name].dtype == value.dtype and ai[name].tobytes() == value.tobytes(), name
    assert (built[key, "stream"].parent / "model.onnx.data").stat().st_size > 0
    lengths = [7, 3, 1]
    np.testing.assert_array_equal(_run(built[key, "stream"], lengths, built["report"]),
                                  _run(built[key, "stages"], lengths, built["report"]))


def test_int4_streams_fp16_and_int4_layouts(built):
    ops = {key: [n.op_type for n in onnx.load(str(built[key, "stream"]), load_external_data=False).graph.node]
           for key in CASES}
    assert ops["rtn-ort"].count("MatMulNBits") == 10 and "DequantizeLinear" not in ops["rtn-ort"]
    assert ops["rtn-qdq"].count("DequantizeLinear") == 10 and ops["awq-qdq"].count("DequantizeLinear") == 10
    fp16 = onnx.load(str(built["fp16", "stream"]), load_external_data=False)
    kv = [v for v in fp16.graph.input if v.name.startswith("past_key_values.")]
    assert kv and {v.type.tensor_type.elem_type for v in kv} == {onnx.TensorProto.FLOAT16}


def test_awq_calibrated_layer_by_layer_matches_the_stage(built):
    """AWQ here carries the calibration hidden states through each layer in numpy; the stage captures them from
    ONNX Runtime on the whole FP32 graph. Same search, activations equal to float rounding: the same alphas (the
    graph has the same activation-scale Muls), codes and scales close, logits close."""
    a, b = onnx.load(str(built["awq-qdq", "stream"])), onnx.load(str(built["awq-qdq", "stages"]))
    assert _nodes(a) == _nodes(b)
    ai, bi = _inits(a), _inits(b)
    assert set(ai) == set(bi)
    scales = [n for n in bi if n.endswith("_awq_inv_scale")]
    assert scales  # AWQ chose a non-zero alpha somewhere on this model: the comparison covers the scaling
    for name, value in bi.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(ai[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
        else:  # int4 codes: rounding at a tie may flip a code by one on a handful of weights
            assert np.mean(ai[name] != value) < 1e-3, name
    lengths = [9, 4, 2]
    x, y = _run(built["awq-qdq", "stream"], lengths, built["report"]), _run(built["awq-qdq", "stages"], lengths, built["report"])
    assert np.max(np.abs(x - y)) <= 1e-3 * max(1.0, float(np.max(np.abs(y))))


@pytest.mark.parametrize("key", ["rtn-qdq", "awq-qdq", "fp16"])
def test_streamed_accuracy_is_the_stages_onnxruntime_measurement(built, key):
    """The builder measures what it wrote layer by layer (two forwards in numpy/torch: the checkpoint's FP32 weights
    and the written ones) on the stage's held-out sentences; the quantize stage runs both whole graphs in ONNX
    Runtime. INT4: the same figures to float rounding. FP16: the builder does not emulate FP16 arithmetic (only the
    rounded weights), so the figures are close, not equal — the report's definitions say so."""
    stream = json.loads((built[key, "stream"].parent / "stream_report.json").read_text())
    stage = json.loads((built[key, "stages"].parent / "quantize_report.json").read_text())["accuracy"]
    got = stream["accuracy"]
    assert stream["evaluation"] == "ok" and got["tokens"] == stage["tokens"] > 1000
    assert got["perplexity_fp32"] == pytest.approx(stage["perplexity_fp32"], rel=1e-5)
    if key == "fp16":
        assert got["cosine"] == pytest.approx(stage["cosine"], abs=1e-5)
        assert abs(got["top1"] - stage["top1"]) <= 3 / stage["tokens"]
        assert "not measured here" in stream["definitions"]
    else:
        assert got["cosine"] < 0.999 and got["kl_divergence"] > 1e-3  # INT4 moved the logits: not a trivial match
        for k in ("cosine", "top1", "kl_divergence", "perplexity"):
            assert got[k] == pytest.approx(stage[k], rel=1e-4, abs=1e-6), k


def test_a_build_below_the_gate_leaves_no_model(r1, tmp_path, session_workdir, exported_fused):
    """A gate the INT4 build cannot meet: exit 1 with one line naming the figure, no model.onnx or its data left,
    the figures kept in stream_report.rejected.json. A gate without the evaluation is bad input."""
    exported_fused(MODEL)
    ckpt = resolve_source(MODEL, session_workdir).path
    out = tmp_path / "gated"
    with pytest.raises(StageFailed, match="cosine .* below the gate 0.9999"):
        stream_build(ckpt, out, StreamConfig(precision="int4", method="rtn", block_size=32,
                                             gate=AccuracyGate(min_cosine=0.9999)))
    assert sorted(p.name for p in out.iterdir()) == ["stream_report.rejected.json"]
    rejected = json.loads((out / "stream_report.rejected.json").read_text())
    assert rejected["accuracy"]["cosine"] < 0.9999 and rejected["gate"]["min_cosine"] == 0.9999
    err = assert_one_line(r1("stream-build", str(ckpt), "--out", str(out), "--precision", "int4", "--method", "rtn",
                             "--block-size", "32", "--min-top1", "0.999"), 1, "top-1 agreement")
    assert "rejected" in err and not (out / "model.onnx").exists()
    # the edge profile's gate passes: the model and its report are written, the rejected report is gone
    proc = r1("stream-build", str(ckpt), "--out", str(out), "--precision", "int4", "--method", "rtn",
              "--block-size", "32", "--profile", "edge")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "stream_report.json"]
    assert "passed" in proc.stdout
    with pytest.raises(BadInput, match="needs the evaluation"):
        stream_build(ckpt, tmp_path / "noeval", StreamConfig(precision="fp16", evaluate=False,
                                                            gate=AccuracyGate(min_cosine=0.9)))


def test_fp16_narrowing_is_onnxruntimes_byte_for_byte():
    """The builder's FP16 narrowing against the converter the quantize stage uses, on the values where they could
    part: zeros, subnormal and overflowing magnitudes of both signs, infinities, NaN, and ordinary weights."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from exporter.stream_build import _fp16

    edge = np.array([0.0, -0.0, 1e-9, -1e-9, 5.96e-8, -5.96e-8, 6e-8, 3e-8, 65504.0, 65520.0, -70000.0, 1e30,
                     -1e30, np.inf, -np.inf, np.nan, 1.0, -2.5], np.float32)
    values = np.concatenate([edge, np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 10.0 ** (
        np.random.default_rng(1).integers(-9, 6, 100_000))]).astype(np.float32)
    assert _fp16(values).tobytes() == convert_np_to_float16(values).tobytes()


def _sharded_bf16_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.to(torch.bfloat16).save_pretrained(str(path), max_shard_size="100KB")
    return path


def test_sharded_bf16_checkpoint_streams_as_the_fused_export(tmp_path):
    """How real checkpoints arrive: BF16, several shards and model.safetensors.index.json; FP32 is the graph
    `export --graph fused` writes (verified there against PyTorch), and INT4 RTN runs."""
    ckpt = _sharded_bf16_llama(tmp_path / "ckpt")
    assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2
    ref = export_model(ExportConfig(model=str(ckpt), workdir=tmp_path / "build", graph="fused"))
    assert max(ref.max_abs_diff.values()) <= 1e-4
    got = stream_build(ckpt, tmp_path / "fp32", StreamConfig())
    a, b = onnx.load(str(got.onnx_path)), onnx.load(str(ref.onnx_path))
    assert _nodes(a) == _nodes(b)
    bi = _inits(b)
    assert all(v.tobytes() == bi[k].tobytes() for k, v in _inits(a).items()) and set(_inits(a)) == set(bi)
    int4 = stream_build(ckpt, tmp_path / "int4", StreamConfig(precision="int4", method="rtn", block_size=32))
    assert len(int4.quantized) == 10
    report = json.loads(ref.report_path.read_text())
    lengths = [6, 2]
    cos = [float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))
           for x, y in zip(_run(int4.onnx_path, lengths, report), _run(ref.onnx_path, lengths, report), strict=True)]
    assert min(cos) > 0.9


def test_bad_input_is_refused(tmp_path, session_workdir, exported_fused, r1):
    exported_fused(MODEL)
    ckpt = resolve_source(MODEL, session_workdir).path
    with pytest.raises(BadInput, match="precision"):
        StreamConfig(precision="int8")
    stream_build(ckpt, tmp_path / "once", StreamConfig())
    with pytest.raises(BadInput, match="already holds a model"):
        stream_build(ckpt, tmp_path / "once", StreamConfig())
    # AWQ calibrates with the checkpoint's tokenizer: a checkpoint without one is refused, and nothing is left behind
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((ckpt / f).read_bytes())
    with pytest.raises(BadInput, match="use --method rtn"):
        stream_build(bare, tmp_path / "awq", StreamConfig(precision="int4", method="awq", block_size=32))
    assert list((tmp_path / "awq").iterdir()) == []
    # RTN needs no tokenizer to write; the accuracy it cannot measure is reported as skipped, with the reason,
    # unless a gate asks for it
    rtn = stream_build(bare, tmp_path / "rtn", StreamConfig(precision="int4", method="rtn", block_size=32))
    assert rtn.evaluation.startswith("skipped: ") and "tokenizer" in rtn.evaluation and not rtn.accuracy
    with pytest.raises(BadInput, match="gate cannot be checked"):
        stream_build(bare, tmp_path / "rtn-gated", StreamConfig(precision="int4", method="rtn", block_size=32,
                                                                gate=AccuracyGate(min_cosine=0.9)))
    assert list((tmp_path / "rtn-gated").iterdir()) == []
    moe = resolve_source("r1-moe-tiny", session_workdir).path  # DeepseekV3: MLA keeps the generic graph
    err = assert_one_line(r1("stream-build", str(moe), "--out", str(tmp_path / "moe")), 2, "deepseek_v3")
    assert "generic graph" in err
    assert_one_line(r1("stream-build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")), 2, "nowhere")


def test_the_console_script_builds_int4(r1, tmp_path, session_workdir, exported_fused):
    """`r1deploy --json stream-build`: the typed result, and a model ONNX Runtime loads."""
    import onnxruntime as ort

    exported_fused(MODEL)
    ckpt = resolve_source(MODEL, session_workdir).path
    proc = r1("--json", "stream-build", str(ckpt), "--out", str(tmp_path / "int4"), "--precision", "int4",
              "--method", "rtn", "--block-size", "32")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["precision"] == "int4" and result["quantized"] and result["data_bytes"] > 0
    ort.InferenceSession(result["onnx_path"], providers=["CPUExecutionProvider"])
