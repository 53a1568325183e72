"""`quantize --graph fused` streams its variants from the checkpoint (exporter.quantize_fused): the same graph, the
same figures and the same report as the traced quantize stage, in the same place, in bounded memory; the traced path
where streaming does not apply. Two workdirs with the same fused export of r1-distill-tiny, one per builder, run in
the real ONNX Runtime (the traced figures) and the streaming builder (the streamed ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line
from onnx import numpy_helper

from exporter import tiny_models
from exporter.core.errors import BadInput
from exporter.export import ExportConfig, export_model
from exporter.quantize_fused import quantize_variant
from quantize import QuantizeConfig

MODEL = "r1-distill-tiny"
CASES = {
    "edge": dict(profile="edge"),  # the CPU repository's variant: INT4 AWQ b128 qdq, gated by edge's floor
    "fp16": dict(precision="fp16"),
    "rtn": dict(precision="int4", method="rtn", block_size=32, format="ort"),
}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for builder in ("traced", "stream"):
        out[builder] = tmp_path_factory.mktemp(builder)
        export_model(ExportConfig(model=MODEL, workdir=out[builder], graph="fused"))
    return out


def _quantize(workdir: Path, builder: str, **settings):
    cfg = QuantizeConfig(model=MODEL, workdir=workdir, graph="fused", extra_texts=tiny_models.quality_texts(MODEL),
                         **settings)
    return quantize_variant(cfg, builder)


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i, str(path.parent)) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_variant_is_the_traced_one(workdirs, case):
    traced = _quantize(workdirs["traced"], "traced", **CASES[case])
    streamed = _quantize(workdirs["stream"], "auto", **CASES[case])  # auto streams this
    assert streamed.variant == traced.variant and streamed.onnx_path.parent.name == traced.variant
    report = json.loads(streamed.report_path.read_text())
    assert report["builder"] == "stream" and "builder" not in json.loads(traced.report_path.read_text())
    a, b = onnx.load(str(streamed.onnx_path), load_external_data=False), onnx.load(str(traced.onnx_path))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    ia, ib = _inits(streamed.onnx_path), _inits(traced.onnx_path)
    assert set(ia) == set(ib)
    differing = [n for n in ib if ia[n].tobytes() != ib[n].tobytes()]
    if case == "edge":  # AWQ: the same alphas and codes; scales to float rounding (the calibration's arithmetic)
        for n in differing:
            assert ia[n].dtype.kind == "f", n
            np.testing.assert_allclose(ia[n], ib[n], rtol=1e-5, err_msg=n)
    else:
        assert differing == []
    # The same sizes (the streamed model keeps its weights in model.onnx.data, 64-byte aligned: its files differ)
    for field in ("weight_bytes_fp32", "weight_bytes", "quantized_weights", "bits_per_weight", "activation_scale_bytes"):
        assert getattr(streamed.sizes, field) == getattr(traced.sizes, field), field
    # The same figures on every text (FP16: the streamed evaluation does not emulate FP16 arithmetic)
    assert set(streamed.accuracy_by_text) == set(traced.accuracy_by_text) == {"held_out", "corpus", "held_out_domain"}
    for text, figures in traced.accuracy_by_text.items():
        got = streamed.accuracy_by_text[text]
        assert got["tokens"] == figures["tokens"]
        if case == "fp16":
            assert got["cosine"] == pytest.approx(figures["cosine"], abs=1e-5)
            assert abs(got["top1"] - figures["top1"]) <= 3 / figures["tokens"]
        else:
            for k in ("cosine", "top1", "kl_divergence", "perplexity"):
                assert got[k] == pytest.approx(figures[k], rel=1e-4, abs=1e-6), (text, k)
    assert streamed.accuracy == streamed.accuracy_by_text["held_out"]
    if case == "edge":
        assert streamed.gate == {"min_cosine": 0.95, "min_top1": 0.8}
    # Up to date: the second call rebuilds nothing
    assert _quantize(workdirs["stream"], "auto", **CASES[case]).skipped


def test_a_traced_variant_is_not_taken_for_a_streamed_one(tmp_path):
    """The builder is part of the fingerprint: a traced output in place is rebuilt by the streaming builder (and back)."""
    export_model(ExportConfig(model=MODEL, workdir=tmp_path, graph="fused"))
    settings = dict(precision="int4", method="rtn", block_size=64, format="qdq")
    first = _quantize(tmp_path, "traced", **settings)
    streamed = _quantize(tmp_path, "stream", **settings)
    assert not streamed.skipped and json.loads(streamed.report_path.read_text())["builder"] == "stream"
    assert streamed.onnx_path == first.onnx_path
    back = _quantize(tmp_path, "traced", **settings)
    assert not back.skipped and "builder" not in json.loads(back.report_path.read_text())


def test_where_streaming_does_not_apply(workdirs, r1):
    """auto traces mixed precision (the gate's bisection needs the whole model); --builder stream refuses it with the
    reason, and refuses the generic graph."""
    settings = dict(precision="int4", method="rtn", block_size=32, format="qdq", min_cosine=0.5)  # flags: mixed on
    auto = _quantize(workdirs["stream"], "auto", **settings)
    assert "builder" not in json.loads(auto.report_path.read_text())  # the traced stage's report
    with pytest.raises(BadInput, match="mixed precision"):
        _quantize(workdirs["stream"], "stream", **settings)
    with pytest.raises(BadInput, match="fused graph only"):
        quantize_variant(QuantizeConfig(model=MODEL, workdir=workdirs["stream"], precision="fp16"), "stream")
    err = assert_one_line(r1("--workdir", str(workdirs["stream"]), "quantize", "--graph", "fused", "--builder", "stream",
                             "--precision", "int4", "--min-cosine", "0.5"), 2, "--builder stream")
    assert "mixed precision" in err


def _greedy(path: Path, tok, prompt: str, limit: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits each was chosen from, through the engine the served generate model runs."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporter" / "repository" / "python_models"))
    from kv_shared import SharedKVEngine

    engine = SharedKVEngine.from_path(path, max_rows=1, max_seq=512, threads=1)
    logits = [engine.prefill([0], [tok.encode(prompt).ids])[0]]
    out = [int(logits[-1].argmax())]
    while len(out) < limit and out[-1] != tok.token_to_id(tiny_models.EOS):
        logits.append(engine.decode([0], [out[-1]])[0])
        out.append(int(logits[-1].argmax()))
    return out, np.stack(logits)


def test_the_served_default_answers_as_before(workdirs):
    """The CPU repository serves edge's INT4 AWQ fused variant, which is now streamed: greedy decoding of every corpus
    prompt (the R1 chat turns and the prose/code lines) gives the traced variant's tokens, token for token. The
    logits are compared too, since the trained model's greedy answers survive even RTN b32: the two AWQ variants
    (same codes, scales within 4e-7) measured 8.5e-3 of the largest logit apart — ONNX Runtime's MatMulNBits
    quantizes activations to int8 at serving, which turns float-rounding differences into a step now and then —
    and RTN b32 0.35; the bound is 2e-2."""
    from tokenizers import Tokenizer

    traced = _quantize(workdirs["traced"], "traced", profile="edge")
    streamed = _quantize(workdirs["stream"], "auto", profile="edge")
    tok = Tokenizer.from_file(str(workdirs["stream"] / MODEL / "tokenizer" / "tokenizer.json"))
    cases = tiny_models.reproduction_cases()
    assert len(cases) > 40
    for prompt, continuation in cases:
        limit = len(tok.encode(continuation).ids) + 4
        (a, la), (b, lb) = _greedy(streamed.onnx_path, tok, prompt, limit), _greedy(traced.onnx_path, tok, prompt, limit)
        assert a == b, prompt
        assert np.max(np.abs(la - lb)) <= 2e-2 * np.max(np.abs(lb)), prompt
