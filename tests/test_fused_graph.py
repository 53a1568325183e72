"""The fused decoder graph (`export --graph fused`, exporter/fused_graph.py): parity with PyTorch on rows of
different lengths, FP16 and INT4 (RTN and AWQ, both formats) applied to it with accuracy measured on it — all in
the real ONNX Runtime, against the real PyTorch model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.core import artifacts
from exporter.core.errors import StageFailed
from exporter.export import ExportConfig, export_model
from quantize import QuantizeConfig, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporter" / "repository" / "python_models"))
from kv_shared import SharedKVEngine  # noqa: E402

MODEL = "r1-distill-tiny"


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_fused_export_matches_pytorch_on_rows_of_different_lengths(exported_fused, exported):
    generic = exported(MODEL)
    r = exported_fused(MODEL)
    assert r.onnx_path.parent.name == "fp32-fused" and generic.onnx_path.parent.name == "fp32"
    names = [c.case for c in r.cases]
    assert any("padded" in n for n in names) and any("decode" in n for n in names) and any("chunk" in n for n in names)
    for case in r.cases:
        for o in case.outputs:
            assert o.passed and o.max_abs_diff <= 1e-4, (case.case, o.output, o.max_abs_diff)
    ops = _ops(r.onnx_path)
    assert ops.count("GroupQueryAttention") == 2 and "SkipSimplifiedLayerNormalization" in ops
    assert "Softmax" not in ops and "Concat" not in ops  # attention and the cache append live inside GQA
    assert len(ops) < len(_ops(generic.onnx_path)) / 4
    report = json.loads(r.report_path.read_text())
    assert report["graph"] == "fused" and "query_seqlens" in report["input_names"]


def _tiny_checkpoint(path: Path, kind: str, bf16: bool = False) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":  # trained-looking q/k/v biases and tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                             tie_word_embeddings=True))
    else:  # DeepSeek-R1-Distill-Llama's rope scaling
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
    if bf16:  # how R1-Distill checkpoints are published
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("kind,bf16", [("qwen2", False), ("llama", False), ("llama", True)])
def test_fused_export_of_local_qwen2_and_llama_checkpoints(tmp_path, kind, bf16):
    ckpt = _tiny_checkpoint(tmp_path / f"{kind}-ckpt", kind, bf16)
    if bf16:
        assert '"BF16"' in (ckpt / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    r = export_model(ExportConfig(model=str(ckpt), workdir=tmp_path / "build", graph="fused"))
    assert r.max_abs_diff and max(r.max_abs_diff.values()) <= 1e-4
    assert ("Add" in _ops(r.onnx_path)) == (kind == "qwen2")  # the bias is kept only where it is not zero


def test_fused_verification_fails_on_a_wrong_graph(exported_fused, tmp_path):
    """The check can fail: the same graph with the attention scale doubled is refused, naming the output."""
    from exporter.sources import load_model, resolve_source
    from exporter.verify import compare_fused, fused_references
    from exporter.wrappers import CacheLayout, DecoderWithPast

    r = exported_fused(MODEL)
    model = onnx.load(str(r.onnx_path))
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            for a in node.attribute:
                if a.name == "scale":
                    a.f *= 2
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    report = json.loads(r.report_path.read_text())
    cache = report["cache"]
    layout = CacheLayout(cache["num_layers"], tuple(cache["key_shape"]), tuple(cache["value_shape"]))
    torch_model, _ = load_model(resolve_source(MODEL, r.onnx_path.parents[3]))
    refs = fused_references(DecoderWithPast(torch_model).eval(), layout, report["vocab_size"])
    with pytest.raises(StageFailed, match="logits"):
        compare_fused(tmp_path / "wrong.onnx", refs, r.output_names, 1e-4)


def test_deepseek_v3_keeps_the_generic_graph(tmp_path, r1):
    res = r1("--workdir", str(tmp_path), "export", "--model", "r1-moe-tiny", "--graph", "fused")
    assert res.returncode == 2 and "generic" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r1-moe-tiny" / "onnx").exists()


@pytest.fixture(scope="module")
def fused_variants(exported_fused, exported, session_workdir):
    exported(MODEL)
    exported_fused(MODEL)
    out = {}
    for key, settings in (("fp16", dict(precision="fp16")),
                          ("awq-ort", dict(precision="int4", method="awq", block_size=32, format="ort")),
                          ("awq-qdq", dict(precision="int4", method="awq", block_size=32, format="qdq")),
                          ("rtn-qdq", dict(precision="int4", method="rtn", block_size=32, format="qdq"))):
        for graph in ("fused", "generic"):
            out[key, graph] = quantize_model(QuantizeConfig(model=MODEL, workdir=session_workdir, graph=graph, **settings))
    return out


def test_fp16_and_int4_variants_of_the_fused_graph(fused_variants):
    for key in ("fp16", "awq-ort", "awq-qdq", "rtn-qdq"):
        r = fused_variants[key, "fused"]
        assert r.onnx_path.parent.name.endswith("-fused") and r.onnx_path.is_file()
        ops = _ops(r.onnx_path)
        assert "GroupQueryAttention" in ops
        if key != "fp16":
            assert r.quantized_layers == 10  # q|k|v, o, gate, up, down per layer (lm_head kept FP32)
            assert ("MatMulNBits" in ops) == (key == "awq-ort") and ("DequantizeLinear" in ops) == (key != "awq-ort")
    assert fused_variants["fp16", "fused"].accuracy["cosine"] > 0.9999
    # AWQ searches its scales on the activations it captures from the fused graph: it beats RTN there too
    assert fused_variants["awq-qdq", "fused"].accuracy["cosine"] > fused_variants["rtn-qdq", "fused"].accuracy["cosine"]


def test_quantize_accuracy_is_computed_on_the_fused_graph(fused_variants):
    """RTN quantizes each output column on its own, so packing q|k|v into one weight changes nothing: the fused
    INT4 graph computes what the generic one does and its measured accuracy must agree with the generic graph's."""
    fused, generic = fused_variants["rtn-qdq", "fused"].accuracy, fused_variants["rtn-qdq", "generic"].accuracy
    for key in ("cosine", "top1", "perplexity"):
        assert abs(fused[key] - generic[key]) < 1e-3 * max(1.0, abs(generic[key])), key
    report = json.loads(fused_variants["rtn-qdq", "fused"].report_path.read_text())
    assert report["settings"]["graph"] == "fused"


def test_fp16_fused_graph_keeps_its_cache_in_place(fused_variants, exported_fused):
    """FP16: the KV cache is FP16 in the graph's IO (a Cast would copy it every step), logits stay FP32."""
    fp16 = SharedKVEngine.from_path(fused_variants["fp16", "fused"].onnx_path, max_rows=2, max_seq=32, threads=1)
    fp32 = SharedKVEngine.from_path(exported_fused(MODEL).onnx_path, max_rows=2, max_seq=32, threads=1)
    assert {b.dtype for b in fp16.buffers.values()} == {np.dtype(np.float16)} and fp16.logits_dtype is np.float32
    prompts = [[5, 9, 13, 21, 40], [7, 8]]
    a, b = fp16.prefill([0, 1], prompts), fp32.prefill([0, 1], prompts)
    for _ in range(4):
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.999
        toks = b.argmax(-1).tolist()
        a, b = fp16.decode([0, 1], toks), fp32.decode([0, 1], toks)
    assert artifacts.onnx_variant("fp16", graph="fused") == "fp16-fused"
