"""TensorRT-LLM through Triton's tensorrtllm_backend (exporter/trtllm.py): what can be checked without a GPU.
Nothing here runs TensorRT-LLM (not installable here): the generated repository is checked against the backend's
published templates (the mandatory parameters and tensors recorded from them in
exporter/data/tensorrtllm/backend_templates.json, with their commit), the trtllm-build command against
trtllm-build's published argument list (trtllm_build_args.json, with its commit), the entry model against
r1deploy's real gateway reader, and the manifests for production with a 70B FP16 plan against kustomize,
kubernetes-validate and the project's checks."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest
import yaml
from conftest import R1DEPLOY
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from exporter import trtllm
from exporter.core.errors import BadInput
from exporter.core.profiles import Precision, load_profiles
from exporter.plan import load_shape

PROFILES = load_profiles()
SHAPE_70B = load_shape("r1-distill-llama-70b")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("trtllm") / "repo"
    result = trtllm.write_trtllm_repository(SHAPE_70B, PROFILES["production"], out, "r1-distill-llama-70b",
                                            eos_token_ids=[128001])
    return result


def _config(repo, name: str) -> mc.ModelConfig:
    return text_format.Parse((repo.out / name / "config.pbtxt").read_text(), mc.ModelConfig())


def _get(config: mc.ModelConfig, path: str):
    if path.startswith("tensor["):
        name = path[len("tensor["):path.index("]")]
        return [t.data_type for t in list(config.input) + list(config.output) if t.name == name]
    if path == "instance_group.count":
        return [g.count for g in config.instance_group]
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def test_70b_fp16_on_production_is_tensor_parallel_over_the_pod(repo):
    p = repo.plan
    assert (p.tp_size, p.plan_gpus, p.precision) == (8, 2, "fp16")  # the plan needs 2 GPUs; the pod has 8 NVLinked
    assert (p.max_batch_size, p.max_input_len, p.max_seq_len) == (64, 4096, 5120)
    assert p.max_num_tokens >= p.max_input_len  # no chunked context: a whole prompt is one step
    assert sorted(p.name for p in repo.out.iterdir()) == sorted(trtllm.MODELS)


@pytest.mark.parametrize("name", trtllm.MODELS)
def test_every_mandatory_template_parameter_is_set(repo, name):
    """Each variable the backend's docs list as mandatory for this model, at every place its template uses it:
    unquoted ones (max_batch_size, decoupled, queue, instance count, logits types) and `parameters` entries."""
    entry = trtllm.templates()["models"][name]
    config = _config(repo, name)
    text = (repo.out / name / "config.pbtxt").read_text()
    assert "${" not in text
    assert entry["mandatory"], "the catalogue lost the docs' mandatory list"
    values = trtllm._values(repo.plan, trtllm.NodePaths("r1-distill-llama-70b", "production"))
    for var in entry["mandatory"]:
        places = entry["locations"].get(var, [])
        keys = [k for k, v in entry["parameters"].items() if v == var]
        assert places or keys, f"{name}: mandatory {var} is nowhere in the template"
        for path in places:
            got = _get(config, path)
            expected = values[var]
            if path.startswith("tensor["):
                assert got and all(g == mc.DataType.Value(expected) for g in got), (name, var, path)
            elif path == "instance_group.count":
                assert got == [int(expected)], (name, var)
            elif path.endswith("preferred_batch_size"):
                assert list(got) == [int(expected)], (name, var)
            elif isinstance(got, bool):
                assert got is (expected == "true"), (name, var)
            else:
                assert str(got) == expected, (name, var, path, got)
        for key in keys:
            assert config.parameters[key].string_value == values[var], (name, key)


@pytest.mark.parametrize("name", trtllm.MODELS)
def test_tensors_are_the_templates(repo, name):
    """The backend's model.py files read and write these names: the config carries the template's tensors
    (names, types, shapes, optional, reshape) exactly."""
    entry = trtllm.templates()["models"][name]
    config = _config(repo, name)
    for key, tensors in (("input", config.input), ("output", config.output)):
        assert [t.name for t in tensors] == [t["name"] for t in entry[key]]
        for t, want in zip(tensors, entry[key], strict=True):
            assert list(t.dims) == want["dims"]
            if "reshape" in want:
                assert t.HasField("reshape") and list(t.reshape.shape) == want["reshape"]
            if not want["data_type"] == "TYPE_FP32":  # FP32 is also the stand-in of templated dtypes
                assert mc.DataType.Name(t.data_type) == want["data_type"]
    if name == "ensemble":
        assert [s.model_name for s in config.ensemble_scheduling.step] == ["preprocessing", "tensorrt_llm", "postprocessing"]


def test_configs_parse_as_triton_configs_and_the_gateway_finds_its_entry(repo):
    from exporter.gateway.models import read_repositories

    for name in trtllm.MODELS:
        config = _config(repo, name)
        assert config.name == name
    assert _config(repo, "tensorrt_llm").backend == "tensorrtllm"
    assert _config(repo, "tensorrt_llm").model_transaction_policy.decoupled
    # r1deploy's gateway, unchanged, serves the BLS entry: decoupled text_input → text_output, with its limits
    (model,) = read_repositories([repo.out]).values()
    assert model.name == "tensorrt_llm_bls"
    assert (model.limits.max_input_len, model.limits.max_output_len, model.limits.max_sequence_len) == (4096, 1024, 5120)
    assert model.eos_token_ids == [128001]
    assert {"stop_words", "num_return_sequences", "return_log_probs", "stream"} <= set(model.inputs)


def _trtllm_build_parser() -> argparse.ArgumentParser:
    """trtllm-build's published arguments (trtllm_build_args.json), as an argparse parser that errors instead of
    exiting."""
    parser = argparse.ArgumentParser(prog="trtllm-build", exit_on_error=False, add_help=False)
    types = {"str": str, "int": int}
    for flag, spec in trtllm.build_arguments()["args"].items():
        kwargs = {}
        if spec.get("action"):
            kwargs["action"] = spec["action"]
        else:
            kwargs["type"] = types[spec["type"]]
            if "choices" in spec:
                kwargs["choices"] = spec["choices"]
            if "nargs" in spec:
                kwargs["nargs"] = spec["nargs"]
        parser.add_argument(flag, *spec.get("aliases", []), **kwargs)
    return parser


def _parse_strict(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise argparse.ArgumentError(None, f"unrecognized arguments: {unknown}")
    return ns


@pytest.mark.parametrize("profile, precision", [("production", "fp16"), ("research", "fp16"), ("research", "int4")])
def test_build_command_parses_against_trtllm_builds_argument_list(profile, precision):
    p = trtllm.plan_trtllm(SHAPE_70B, PROFILES[profile], Precision(precision))
    paths = trtllm.NodePaths("r1-distill-llama-70b", profile)
    argv = trtllm.build_argv(p, paths)
    assert argv[0] == "trtllm-build"
    ns = _parse_strict(_trtllm_build_parser(), argv[1:])
    assert (ns.max_batch_size, ns.max_input_len, ns.max_seq_len) == (p.max_batch_size, p.max_input_len, p.max_seq_len)
    assert ns.max_num_tokens == p.max_num_tokens and ns.kv_cache_type == "paged" and ns.workers == p.tp_size
    assert ns.checkpoint_dir == paths.trtllm_checkpoint and ns.output_dir == paths.engine_dir
    convert = trtllm.convert_argv(p, paths)
    assert convert[convert.index("--tp_size") + 1] == str(p.tp_size)
    if precision == "int4":
        assert convert[1].endswith("/quantization/quantize.py")
        assert convert[convert.index("--qformat") + 1] == "int4_awq" and "--awq_block_size" in convert
    else:
        assert convert[1].endswith("/models/core/llama/convert_checkpoint.py")
    script = trtllm.build_script(p, paths)
    assert " ".join(argv) in script and " ".join(convert) in script


def test_the_argument_list_catches_a_wrong_flag_and_a_wrong_choice():
    parser = _trtllm_build_parser()
    with pytest.raises(argparse.ArgumentError):
        _parse_strict(parser, ["--max_sequence_len", "5120"])  # not a trtllm-build flag (it is --max_seq_len)
    with pytest.raises(argparse.ArgumentError):
        _parse_strict(parser, ["--gemm_plugin", "fp16"])  # float16, not fp16


def test_launch_is_one_tritonserver_per_rank_under_mpirun():
    p = trtllm.plan_trtllm(SHAPE_70B, PROFILES["production"])
    argv = trtllm.launch_argv(p, "/models/x/model_repository/production", (8001, 8000, 8002), ["--log-verbose=0"])
    assert argv[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(argv[2:]).split(" : ")
    assert len(ranks) == 8 == argv.count("tritonserver")
    assert "--log-verbose=0" in ranks[0] and "--load-model" not in ranks[0]
    assert all("--model-control-mode=explicit --load-model=tensorrt_llm" in r for r in ranks[1:])
    assert [f"shm-region-prefix-name=prefix{i}_" in r for i, r in enumerate(ranks)] == [True] * 8


@pytest.mark.parametrize("model, profile, message", [
    ("r1-distill-llama-70b", "edge", "runs tensorrt-rtx"),
    ("deepseek-r1", "production", "DeepseekV3ForCausalLM has no TensorRT-LLM converter"),
    ("r1-distill-qwen-32b", "production", None),  # Qwen2 fits: 40 heads / 8 KV heads over tp 8
])
def test_refusals_say_why(model, profile, message):
    shape = load_shape(model)
    if message is None:
        assert trtllm.plan_trtllm(shape, PROFILES[profile]).tp_size == 8
        return
    with pytest.raises(BadInput, match=message):
        trtllm.plan_trtllm(shape, PROFILES[profile])


def test_auto_chooses_tensorrt_llm_only_where_the_plan_needs_more_than_one_gpu():
    assert trtllm.uses_trtllm("auto", PROFILES["production"], 2)
    assert not trtllm.uses_trtllm("auto", PROFILES["production"], 1)
    assert not trtllm.uses_trtllm("auto", PROFILES["edge"], 3)  # TensorRT-RTX: not a TensorRT-LLM profile
    assert trtllm.uses_trtllm("tensorrt-llm", PROFILES["production"], 1)
    assert not trtllm.uses_trtllm("r1deploy", PROFILES["production"], 2)


# ---- through the console script ------------------------------------------------------------------------------

def _r1(*args, timeout=300):
    return subprocess.run([str(R1DEPLOY), *args], capture_output=True, text=True, timeout=timeout)


def test_cli_repository_auto_writes_tensorrt_llm_for_a_70b_fp16_plan(tmp_path):
    proc = _r1("--json", "--workdir", str(tmp_path / "wd"), "repository", "--model", "r1-distill-llama-70b",
               "--profile", "production", "--out", str(tmp_path / "repo"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "unverified" and data["plan"]["tp_size"] == 8 and data["entry_model"] == "tensorrt_llm_bls"
    assert (tmp_path / "repo" / "tensorrt_llm" / "1" / "build_engine.sh").is_file()


def test_cli_repository_refuses_options_tensorrt_llm_would_ignore(tmp_path):
    proc = _r1("--workdir", str(tmp_path / "wd"), "repository", "--model", "r1-distill-llama-70b",
               "--profile", "production", "--runtime", "tensorrt-llm", "--max-rows", "4", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--max-rows apply to r1deploy's generate repository" in lines[0]
    assert not (tmp_path / "r").exists()


def test_a_directory_r1deploy_did_not_write_is_never_replaced(tmp_path, repo):
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    with pytest.raises(BadInput, match="it holds notes, which r1deploy did not write"):
        trtllm.write_trtllm_repository(SHAPE_70B, PROFILES["production"], out, "r1-distill-llama-70b")
    assert (out / "notes").is_dir()
    # its own output is replaced (a rerun)
    again = trtllm.write_trtllm_repository(SHAPE_70B, PROFILES["production"], repo.out, "r1-distill-llama-70b",
                                           eos_token_ids=[128001])
    assert sorted(p.name for p in again.out.iterdir()) == sorted(trtllm.MODELS)


def test_cli_manifests_for_a_70b_fp16_plan_render_and_pass_every_check(tmp_path):
    out = tmp_path / "k8s"
    proc = _r1("manifests", "--model", "r1-distill-llama-70b", "--profile", "production", "--profile", "research",
               "--out", str(out), "--check")
    assert proc.returncode == 0, proc.stderr
    assert "checks passed: 2 overlays built" in proc.stdout + proc.stderr
    from exporter.manifests import checks

    built = checks.kustomize_build(out / "overlays" / "production")
    pod = next(o for o in built if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    image = yaml.safe_load((trtllm.resources.files("exporter") / "data/versions.yaml").read_text())["tensorrtllm"]["image"]
    assert triton["image"] == image and triton["command"] == ["mpirun"] and triton["args"].count("tritonserver") == 8
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "exec" not in triton["readinessProbe"] and triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    build = next(c for c in pod["initContainers"] if c["name"] == "engine-build")
    assert build["image"] == image and build["command"][1].endswith("/tensorrt_llm/1/build_engine.sh")
    assert build["resources"]["limits"]["nvidia.com/gpu"] == "8"
    gateway = next(c for c in pod["containers"] if c["name"] == "openai-gateway")
    assert gateway["image"] != image  # the gateway, unchanged, runs from r1deploy's own image
    research = next(o for o in checks.kustomize_build(out / "overlays" / "research") if o["kind"] == "Deployment")
    args = next(c for c in research["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")["args"]
    assert args.count("tritonserver") == 2 and "--load-model=tensorrt_llm_bls" in args


def test_policy_checks_pass_on_the_70b_tensorrt_llm_overlays(tmp_path):
    """checkov (its own venv, as `make policy` installs it) on the production and research overlays of the 70B
    FP16 plan, with the project's waivers: the TensorRT-LLM pod adds no finding."""
    import os
    import shutil
    import sys
    from pathlib import Path

    repo_root = Path(__file__).resolve().parents[1]
    checkov = next((c for c in (os.environ.get("CHECKOV"), repo_root / ".venv-checkov" / "bin" / "checkov") if c
                    and Path(c).exists()), None) or shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov not installed: `make policy` creates .venv-checkov with it (or set $CHECKOV)")
    out = tmp_path / "k8s"
    assert _r1("manifests", "--model", "r1-distill-llama-70b", "--profile", "production", "--profile", "research",
               "--out", str(out)).returncode == 0
    res = subprocess.run([sys.executable, str(repo_root / ".ci" / "policy_checks.py"), "--checkov", str(checkov),
                          "--k8s", str(out)], capture_output=True, text=True, cwd=repo_root, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0 failed" in res.stdout
