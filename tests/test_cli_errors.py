"""Bad input: one clear line on stderr, exit code 2, no traceback (unless -v). Each runs the real console script."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_one_line as _assert_one_line


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from pathlib import Path

    from exporter.tiny_models import write_tiny_checkpoint

    return write_tiny_checkpoint("r1-distill-tiny", Path(tmp_path_factory.mktemp("ckpt")) / "r1-distill-tiny")


def test_missing_path(r1, tmp_path):
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(tmp_path / "nope")), 2, "model path not found")


def test_directory_without_config(r1, tmp_path):
    (tmp_path / "ckpt").mkdir()
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(tmp_path / "ckpt")), 2, "has no config.json")


def test_corrupt_safetensors(r1, tmp_path, tiny_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(bad)), 2, "corrupt safetensors file")


def test_garbage_safetensors_header(r1, tmp_path, tiny_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(bad)), 2, "corrupt safetensors file")


def test_unsupported_architecture(r1, tmp_path, tiny_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="not-a-model", architectures=["NotAModelForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(bad)), 2, "unsupported architecture")


def test_seq2seq_architecture_is_refused(r1, tmp_path, tiny_ckpt):
    bad = tmp_path / "t5"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(bad)), 2, "unsupported architecture 'T5ForConditionalGeneration'")


def test_unknown_preset(r1, tmp_path):
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", "r1-huge"), 2, "unknown model preset 'r1-huge'")


def test_invalid_yaml_config(r1, tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("export:\n  model: [unclosed\n")
    _assert_one_line(r1("--config", str(cfg), "profiles"), 2, "invalid YAML")


def test_unknown_option_in_yaml_config(r1, tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("export:\n  modle: minilm\n")
    _assert_one_line(r1("--config", str(cfg), "profiles"), 2, "export.modle is not an option")


def test_unwritable_output_directory(r1, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _assert_one_line(r1("--workdir", str(blocker / "out"), "export", "--model", "minilm"), 2, "cannot create output directory")


def test_pickle_checkpoint_needs_allow_pickle(r1, tmp_path, tiny_ckpt):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_ckpt, ckpt)
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(ckpt)), 2, "--allow-pickle")


def test_remote_code_needs_trust(r1, tmp_path, tiny_ckpt):
    ckpt = tmp_path / "remote"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _assert_one_line(r1("--workdir", str(tmp_path), "export", "--model", str(ckpt)), 2, "--trust-remote-code")


def test_unknown_profile_in_user_profiles_file(r1, tmp_path):
    bad = tmp_path / "profiles.yaml"
    bad.write_text("edge:\n  gpus_per_pod: -1\n")
    _assert_one_line(r1("--profiles", str(bad), "profiles"), 2, "gpus_per_pod must be")


def test_verbose_shows_traceback(r1, tmp_path):
    proc = r1("-v", "--workdir", str(tmp_path), "export", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "model path not found" in proc.stderr


def test_yaml_config_sets_options(r1, tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"workdir: {tmp_path / 'wd'}\njson: true\nexport:\n  model: minilm\n  opset: 21\n")
    proc = r1("--config", str(cfg), "export")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "minilm"
    assert (tmp_path / "wd" / "minilm" / "onnx" / "fp32" / "model.onnx").is_file()


def test_user_profiles_file_adds_a_profile(r1, tmp_path):
    extra = tmp_path / "profiles.yaml"
    extra.write_text(
        "edge-l4:\n"
        "  description: one L4\n"
        "  gpu: {product: NVIDIA-L4, compute_capability: '8.9', memory_gib: 24}\n"
        "  gpus_per_pod: 1\n  runtime: tensorrt\n  serving_variant: tensorrt_plan\n  precision: int4\n"
        "  max_batch_size: 8\n  preferred_batch_sizes: [4]\n  max_queue_delay_us: 100\n"
        "  max_input_len: 1024\n  max_output_len: 256\n  replicas: 1\n  max_replicas: 2\n"
        "  slo: {tokens_per_s: 200}\n  accuracy: {min_cosine: 0.95}\n"
        "research:\n  max_batch_size: 24\n"
    )
    proc = r1("--profiles", str(extra), "--json", "profiles")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"production", "research", "edge", "edge-l4"}
    assert data["research"]["max_batch_size"] == 24
    assert data["research"]["gpus_per_pod"] == 2  # untouched keys keep the built-in value
    assert data["edge-l4"]["gpu"]["compute_capability"] == "8.9"
