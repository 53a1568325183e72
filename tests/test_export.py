"""Export stage: real exports of the three presets and of other HF checkpoints, verified with real ONNX Runtime
sessions against PyTorch."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import copy_workdir

from exporter.export import ExportConfig, Exporter, export_model
from exporter.sources import ModelKind


@pytest.mark.parametrize("model", ["r1-distill-tiny", "r1-moe-tiny", "minilm"])
def test_preset_exports_match_pytorch_on_three_or_more_shapes(exported, model):
    result = exported(model)
    report = json.loads(result.report_path.read_text())
    assert len(report["cases"]) >= 3
    for case in report["cases"]:
        for out in case["outputs"]:
            assert out["max_abs_diff"] <= 1e-4, (case["case"], out)
            assert out["passed"]
    assert set(report["max_abs_diff"]) == set(result.output_names)
    onnx.checker.check_model(str(result.onnx_path))


def test_decoder_export_has_kv_cache_and_dynamic_axes(exported):
    result = exported("r1-distill-tiny")
    assert result.kind is ModelKind.DECODER
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.1.value"} <= set(inputs)
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    dims = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[2].dim_param, "batch and past-length axes must be dynamic"
    assert not dims[1].dim_param and not dims[3].dim_param, "heads and head_dim are static"
    assert model.opset_import[0].version == 21


def test_case_names_cover_batch_decode_and_padding(exported):
    report = json.loads(exported("r1-distill-tiny").report_path.read_text())
    names = [c["case"] for c in report["cases"]]
    assert any(c["shapes"]["input_ids"][0] > 1 for c in report["cases"])
    assert any(n.startswith("decode") for n in names)
    assert any(n.startswith("padded") for n in names)


def test_moe_decoder_caches_mla_latent(exported):
    report = json.loads(exported("r1-moe-tiny").report_path.read_text())
    assert report["architecture"] == "DeepseekV3ForCausalLM"
    # transformers 5.x DeepseekV3 caches the compressed MLA latent and the rope key, one head each
    assert report["cache"]["key_shape"] == [1, 32]
    assert report["cache"]["value_shape"] == [1, 16]


def test_encoder_export_gives_normalised_embeddings(exported):
    result = exported("minilm")
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    hidden, emb = sess.run(["last_hidden_state", "embeddings"], feeds)
    assert hidden.shape == (1, 4, 384)
    assert emb.shape == (1, 384)
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5


def test_unchanged_inputs_skip_and_force_redoes(exported, session_workdir, tmp_path):
    exported("r1-distill-tiny")
    wd = copy_workdir(session_workdir, tmp_path / "w", "r1-distill-tiny")  # --force rewrites it: a private copy
    onnx_path = wd / "r1-distill-tiny" / "onnx" / "fp32" / "model.onnx"

    def identity() -> tuple[int, int]:  # a rewrite renames a new directory into place: a new inode
        st = onnx_path.stat()
        return st.st_ino, st.st_mtime_ns

    before = identity()
    again = export_model(ExportConfig(model="r1-distill-tiny", workdir=wd))
    assert again.skipped and again.onnx_path == onnx_path and identity() == before
    manifest = json.loads((onnx_path.parent / "manifest.json").read_text())
    assert manifest["outputs"]["model.onnx"]["sha256"]
    assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(manifest["tools"])
    assert manifest["inputs"]["model.safetensors"]

    forced = export_model(ExportConfig(model="r1-distill-tiny", workdir=wd, force=True))
    assert not forced.skipped and forced.cases, "--force exports and verifies again"
    assert identity() != before
    assert max(forced.max_abs_diff.values()) <= 1e-4


def test_a_killed_export_leaves_nothing_a_rerun_keeps(tmp_path):
    """SIGKILL mid-export leaves its temporary directory; the next run removes it (and only the leftovers of
    processes that are gone, never a directory of another name)."""
    import signal
    import subprocess
    import time

    from conftest import R1DEPLOY

    wd = tmp_path / "w"
    onnx_dir = wd / "r1-distill-tiny" / "onnx"
    proc = subprocess.Popen([str(R1DEPLOY), "--workdir", str(wd), "export", "--model", "r1-distill-tiny"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # only so a broken export cannot hang the suite
    while not list(onnx_dir.glob(".fp32.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (stale,) = onnx_dir.glob(".fp32.tmp-*")
    assert stale.name.startswith(f".fp32.tmp-{proc.pid}-")
    live = onnx_dir / f".fp32.tmp-{os.getpid()}-running"  # as a concurrent run's would be: kept
    live.mkdir()
    users = onnx_dir / ".fp32.tmp-notes"  # not a name r1deploy makes: kept
    users.mkdir()
    result = export_model(ExportConfig(model="r1-distill-tiny", workdir=wd, verify=False))
    assert not result.skipped and result.onnx_path.is_file()
    assert not stale.exists()
    assert live.is_dir() and users.is_dir()


def test_legacy_exporter_and_forced_external_data(tmp_path):
    result = export_model(
        ExportConfig(model="r1-distill-tiny", workdir=tmp_path, exporter=Exporter.LEGACY, external_data_threshold_mib=0.5)
    )
    assert result.external_data
    assert (result.onnx_path.parent / "model.onnx.data").is_file()
    assert max(result.max_abs_diff.values()) <= 1e-4
    # the graph file alone is small: the weights live in the data file
    assert result.onnx_path.stat().st_size < (result.onnx_path.parent / "model.onnx.data").stat().st_size


def test_legacy_exporter_single_file_moe(tmp_path):
    """The legacy path hands the TorchScript serialiser no weights and writes them itself (transposed matrices
    as strided views, in row blocks): the result must still match PyTorch and fold into one file."""
    result = export_model(ExportConfig(model="r1-moe-tiny", workdir=tmp_path, exporter=Exporter.LEGACY))
    assert not result.external_data
    assert sorted(p.name for p in result.onnx_path.parent.iterdir()) == [
        "export_report.json", "manifest.json", "model.onnx"]
    assert max(result.max_abs_diff.values()) <= 1e-4
    model = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(model)
    initializers = {t.name for t in model.graph.initializer}
    assert not initializers & {i.name for i in model.graph.input}, "weights must not stay graph inputs"
    assert result.onnx_path.parent.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dynamo_external_data(tmp_path):
    result = export_model(ExportConfig(model="r1-moe-tiny", workdir=tmp_path, external_data_threshold_mib=0.5))
    assert result.external_data and (result.onnx_path.parent / "model.onnx.data").is_file()
    assert max(result.max_abs_diff.values()) <= 1e-4


def _tiny_llama(path):
    """A DeepSeek-R1-Distill-Llama-architecture checkpoint (random weights), sharded with an index file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True, max_shard_size="100KB")
    return path


def test_any_local_checkpoint_sharded_llama(tmp_path):
    ckpt = _tiny_llama(tmp_path / "llama-ckpt")
    assert (ckpt / "model.safetensors.index.json").is_file()
    result = export_model(ExportConfig(model=str(ckpt), workdir=tmp_path / "wd"))
    assert result.architecture == "LlamaForCausalLM" and result.kind is ModelKind.DECODER
    assert max(result.max_abs_diff.values()) <= 1e-4


def test_failed_verification_names_output_and_writes_nothing(tmp_path, r1):
    proc = r1("--workdir", str(tmp_path), "export", "--model", "r1-distill-tiny", "--tolerance", "1e-12")
    assert proc.returncode == 1, proc.stderr
    assert "ONNX Runtime does not match PyTorch: output 'logits'" in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [proc.stderr.strip().splitlines()[-1]]
    onnx_root = tmp_path / "r1-distill-tiny" / "onnx"
    assert not (onnx_root / "fp32").exists()
    assert not [p for p in onnx_root.iterdir() if ".tmp-" in p.name]


def test_cli_export_json(tmp_path, r1):
    proc = r1("--workdir", str(tmp_path), "--json", "export", "--model", "minilm")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kind"] == "encoder" and data["skipped"] is False
    assert data["max_abs_diff"]["embeddings"] <= 1e-4


def test_streaming_inline_of_external_data_is_lossless(exported, tmp_path):
    from onnx import numpy_helper

    from exporter.onnx_files import inline_external_data

    src = exported("r1-moe-tiny").onnx_path
    onnx.save(onnx.load(str(src)), str(tmp_path / "model.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    inline_external_data(tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    a, b = onnx.load(str(src)), onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(b)
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert np.array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
    a.graph.ClearField("initializer")
    b.graph.ClearField("initializer")
    assert a.SerializeToString() == b.SerializeToString()
