"""The repository stage without a server: configs parse back, agree with the ONNX / engine, and the committed
copy has not drifted."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from exporter.core.errors import BadInput
from exporter.core.profiles import load_profiles
from exporter.repository import RepositoryConfig, parse, write_repository
from exporter.repository.tensors import onnx_io

PROFILES = ("production", "research", "edge")
BINARY_SUFFIXES = (".onnx", ".data", ".plan")


def private_workdir(src: Path, dest: Path, model: str) -> Path:
    """Only the fp32 export and the tokenizer: no quantized variant or engine another test may have built."""
    for sub in ("onnx/fp32", "tokenizer"):
        shutil.copytree(src / model / sub, dest / model / sub)
    return dest


@pytest.fixture(scope="module")
def workdir(exported, session_workdir, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("repo-workdir")
    for model in ("r1-distill-tiny", "minilm"):
        exported(model)
        private_workdir(session_workdir, dest, model)
    return dest


def committed_files(root: Path) -> dict[str, bytes]:
    """The files of a repository that git keeps: no tokenizer copies, no binaries."""
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and "/1/tokenizer/" not in rel and not rel.endswith(BINARY_SUFFIXES):
            out[rel] = f.read_bytes()
    return out


@pytest.mark.parametrize("model", ["r1-distill-tiny", "minilm"])
@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_generate_parse_and_match_onnx(workdir, tmp_path, model, profile):
    r = write_repository(RepositoryConfig(model=model, profile=profile, workdir=workdir, out=tmp_path / "repo"))
    prof = load_profiles()[profile]
    assert r.variant.value == prof.serving_variant.value == "tensorrt_plan"
    io = onnx_io(workdir / model / "onnx/fp32/model.onnx", "")
    configs = {m.name: parse(m.config_path.read_text(), str(m.config_path)) for m in r.models}
    for name, cfg in configs.items():
        assert cfg.name == name
        assert cfg.version_policy.latest.num_versions == 1
    if model != "minilm" and profile == "edge":
        # the TensorRT-RTX plan runs in the generate model (test_edge_runs_its_plan_in_generate): no engine model
        assert sorted(configs) == ["generate"] and r.missing == ["generate/1/model.plan"]
        return
    assert r.missing == [f"{'llm' if model != 'minilm' else 'encoder'}/1/model.plan"]
    engine = configs["llm" if model != "minilm" else "encoder"]
    assert engine.platform == "tensorrt_plan"
    assert engine.max_batch_size == prof.max_batch_size
    assert [i.name for i in engine.input] == [t.name for t in io.inputs]
    assert [o.name for o in engine.output] == [t.name for t in io.outputs]
    for cfg_in, t in zip(engine.input, io.inputs, strict=True):
        assert list(cfg_in.dims) == list(t.shape[1:])
    assert list(engine.dynamic_batching.preferred_batch_size) == prof.preferred_batch_sizes
    assert engine.dynamic_batching.max_queue_delay_microseconds == prof.max_queue_delay_us
    assert [(g.kind, list(g.gpus), g.count) for g in engine.instance_group] == [(1, [i], 1) for i in range(prof.gpus_per_pod)]
    assert set(engine.model_warmup[0].inputs) == {t.name for t in io.inputs}
    if model == "minilm":
        embed = configs["embed"]
        assert embed.platform == "ensemble" and embed.response_cache.enable
        assert list(embed.output[0].dims) == [384]
        assert [s.model_name for s in embed.ensemble_scheduling.step] == ["tokenizer", "encoder"]
        assert (r.out / "tokenizer/1/tokenizer/tokenizer.json").is_file()
    else:
        gen = configs["generate"]
        assert gen.backend == "python" and gen.model_transaction_policy.decoupled and gen.max_batch_size == 1
        assert [i.name for i in gen.input] == [
            "text_input", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_words", "stop", "stream", "health_check", "ignore_eos",
            "exclude_input_in_output", "skip_special_tokens", "return_num_input_tokens", "return_num_output_tokens",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias",
            "num_return_sequences", "return_log_probs", "top_logprobs", "guided_decoding_guide_type",
            "guided_decoding_guide",
        ]
        assert [i.name for i in gen.input if not i.optional] == ["text_input"]
        assert [o.name for o in gen.output] == ["text_output", "token_ids", "finish_reason", "num_input_tokens",
                                                "num_output_tokens", "sequence_index", "output_log_probs",
                                                "top_logprob_ids", "top_logprobs"]
        assert not gen.response_cache.enable
        assert gen.parameters["engine_call"].string_value == "bls"
        sched = json.loads(gen.parameters["scheduler"].string_value)
        assert sched["max_rows"] == prof.max_batch_size and sched["engine_max_batch"] == engine.max_batch_size
        assert sched["kv_budget_tokens"] == prof.max_batch_size * prof.max_sequence_len
        src = REPO / "exporter/repository/python_models"
        assert (r.out / "generate/1/model.py").read_text() == (src / "generate.py").read_text()
        for module in ("llm_scheduler", "kv_padded", "engine_runtimes"):
            assert (r.out / f"generate/1/{module}.py").read_text() == (src / f"{module}.py").read_text()
        # every GPU instance lists both shape profiles, and the decode warm-up lies inside one of them
        from exporter.engine.shapes import onnx_input_dims, shape_profiles

        assert all(list(g.profile) == ["0", "1"] for g in engine.instance_group)
        shapes = shape_profiles("decoder", onnx_input_dims(workdir / model / "onnx/fp32/model.onnx")[0], prof)
        warm = engine.model_warmup[0]
        dims = {n: [warm.batch_size, *w.dims] for n, w in warm.inputs.items()}
        assert any(all(all(lo <= d <= hi for d, lo, hi in zip(dims[n], sp.inputs[n].min, sp.inputs[n].max, strict=True))
                       for n in dims) for sp in shapes), dims


def test_same_inputs_same_bytes(workdir, tmp_path):
    a = write_repository(RepositoryConfig(model="minilm", profile="research", variant="onnxruntime_onnx", workdir=workdir, out=tmp_path / "a"))
    b = write_repository(RepositoryConfig(model="minilm", profile="research", variant="onnxruntime_onnx", workdir=workdir, out=tmp_path / "b"))
    fa = {f.relative_to(a.out): f.read_bytes() for f in a.out.rglob("*") if f.is_file()}
    fb = {f.relative_to(b.out): f.read_bytes() for f in b.out.rglob("*") if f.is_file()}
    assert fa == fb
    enc = parse((a.out / "encoder/config.pbtxt").read_text(), "encoder")
    assert enc.backend == "onnxruntime" and (a.out / "encoder/1/model.onnx").is_file()
    accel = enc.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"


def test_a_gpu_pod_runs_one_scheduler_loop_per_gpu(workdir, tmp_path):
    """Production's 8 GPUs behind BLS: 8 generate instances, each with one GPU's limits (the plan is per GPU),
    so 8 engine calls can be in flight; the scheduler limits are those one GPU's plan gives. UNVERIFIED on a GPU."""
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="production", workdir=workdir, out=tmp_path / "p"))
    gen = parse((r.out / "generate/config.pbtxt").read_text(), "generate")
    llm = parse((r.out / "llm/config.pbtxt").read_text(), "llm")
    gpus = load_profiles()["production"].gpus_per_pod
    assert gpus == 8 and len(llm.instance_group) == gpus
    assert [(g.kind, g.count) for g in gen.instance_group] == [(2, gpus)]  # KIND_CPU × one per GPU
    one = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="production", workdir=workdir,
                                            out=tmp_path / "q", max_rows=3))
    sched = json.loads(parse((one.out / "generate/config.pbtxt").read_text(), "g").parameters["scheduler"].string_value)
    assert sched["max_rows"] == 3  # per loop, not divided among the loops


def test_cpu_variants(workdir, tmp_path):
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort", workdir=workdir, out=tmp_path / "r"))
    llm = parse((r.out / "llm/config.pbtxt").read_text(), "llm")
    assert llm.backend == "python" and [g.kind for g in llm.instance_group] == [2]  # KIND_CPU
    assert (r.out / "llm/1/model.onnx").is_file() and (r.out / "llm/1/model.py").is_file()
    gen = parse((r.out / "generate/config.pbtxt").read_text(), "generate")
    assert gen.parameters["engine_call"].string_value == "inprocess"
    assert gen.parameters["engine_runtime"].string_value == "onnxruntime"
    assert (r.out / gen.parameters["engine_file"].string_value).is_file()
    assert gen.parameters["intra_op_num_threads"].string_value == "1"
    assert [(g.kind, g.count) for g in gen.instance_group] == [(2, 1)]  # a CPU engine: one loop
    assert r.notes and "fp32" in r.notes[0]
    every_core = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                                   workdir=workdir, out=tmp_path / "t", intra_op_threads=0))
    threads = parse((every_core.out / "generate/config.pbtxt").read_text(), "generate").parameters["intra_op_num_threads"]
    assert threads.string_value == "0"
    with pytest.raises(BadInput, match="intra_op_threads must be an integer ≥ 0"):
        RepositoryConfig(profile="edge", variant="python_ort", intra_op_threads=-1)
    # INT4 on ONNX Runtime: activations FP32 (what the quantize stage measured) unless asked for int8, in both
    # models that run a session
    assert gen.parameters["ort_int4_activations"].string_value == "fp32"
    assert llm.parameters["ort_int4_activations"].string_value == "fp32"
    int8 = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=workdir, out=tmp_path / "i8", int4_activations="int8"))
    for model in ("generate", "llm"):
        config = parse((int8.out / f"{model}/config.pbtxt").read_text(), model)
        assert config.parameters["ort_int4_activations"].string_value == "int8"
    with pytest.raises(BadInput, match="int4 activations must be fp32 or int8"):
        RepositoryConfig(profile="edge", variant="python_ort", int4_activations="int4")
    ort_cpu = write_repository(RepositoryConfig(model="minilm", profile="edge", variant="onnxruntime_onnx", device="cpu", workdir=workdir, out=tmp_path / "o"))
    enc = parse((ort_cpu.out / "encoder/config.pbtxt").read_text(), "encoder")
    assert not enc.optimization.execution_accelerators.gpu_execution_accelerator
    with pytest.raises(BadInput, match="only on GPUs"):
        RepositoryConfig(profile="edge", variant="tensorrt_plan", device="cpu")
    with pytest.raises(BadInput, match="needs bls"):
        RepositoryConfig(profile="edge", variant="onnxruntime_onnx", engine_call="inprocess")


def test_intra_op_threads_follow_the_model_size(tmp_path):
    """One thread for a small model (the server's own threads keep a core), every core (0) from 64 MiB of ONNX
    files, where a decode step is long enough to split; a value given is kept."""
    from exporter.repository.writer import EVERY_CORE_FROM_BYTES, intra_op_threads_for

    graph, data = tmp_path / "model.onnx", tmp_path / "model.onnx.data"
    graph.write_bytes(b"x" * 1000)
    with open(data, "wb") as fh:  # sparse: the size is what counts
        fh.truncate(EVERY_CORE_FROM_BYTES - 1000 - 1)
    auto = RepositoryConfig(profile="edge", variant="python_ort")
    assert intra_op_threads_for(auto, [graph, data]) == 1
    with open(data, "ab") as fh:
        fh.write(b"y")
    assert intra_op_threads_for(auto, [graph, data]) == 0
    assert intra_op_threads_for(RepositoryConfig(profile="edge", variant="python_ort", intra_op_threads=3), [graph, data]) == 3


def _fake_engine(workdir: Path, profile: str, max_batch: int, runtime: str, serving_fp16: bool = False) -> None:
    """An engine.json (and a stand-in plan) for the fp32 export's IO — or, `serving_fp16`, for the serving graph of
    an fp16 engine: FP16 cache IO, logits [batch, 1, vocab]."""
    from exporter.engine import EngineMetadata
    from exporter.engine.shapes import ShapeProfile, ShapeRange

    io = onnx_io(workdir / "r1-distill-tiny/onnx/fp32/model.onnx", "")
    prof = load_profiles()[profile]

    def dtype(t) -> str:
        if t.data_type != "TYPE_FP32":
            return "int64"
        return "float16" if serving_fp16 and t.name.startswith(("past_key_values.", "present.")) else "float32"

    def tensors(ts):
        return [{"name": t.name, "dtype": dtype(t),
                 "shape": [-1, 1, t.shape[2]] if serving_fp16 and t.name == "logits" else list(t.shape)} for t in ts]

    shape = ShapeProfile("generation", {t.name: ShapeRange([1] * len(t.shape), [1] * len(t.shape), [max_batch] * len(t.shape)) for t in io.inputs})
    meta = {
        "model": "r1-distill-tiny", "model_kind": "decoder", "deployment_profile": profile, "runtime": runtime,
        "runtime_version": "1.0.0", "gpu_product": prof.gpu.product, "compute_capabilities": [prof.gpu.compute_capability],
        "hardware_compatible": False, "hardware_compatibility": "none", "precision": "fp32", "onnx_variant": "fp32",
        "onnx_sha256": "0", "engine_file": "model.plan", "engine_sha256": "0", "engine_bytes": 4, "strongly_typed": True,
        "max_batch_size": max_batch, "shape_profiles": [shape], "inputs": tensors(io.inputs), "outputs": tensors(io.outputs),
        "optimization_level": 3, "workspace_bytes": 1, "timing_cache": {"supported": False}, "build_seconds": 0.0, "reproduce": [],
    }
    if serving_fp16:
        meta.update(precision="fp16", graph={"form": "serving", "logits": "last", "kv_dtype": "fp16", "version": 1})
    from exporter.core.typed import from_data, to_data

    engine_dir = workdir / "r1-distill-tiny/engines" / profile
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / "engine.json").write_text(json.dumps(to_data(from_data(EngineMetadata, json.loads(json.dumps(to_data(meta)))))))
    (engine_dir / "model.plan").write_bytes(b"plan")


def test_engine_caps_max_batch_size(workdir, tmp_path):
    wd = private_workdir(workdir, tmp_path / "wd", "r1-distill-tiny")
    _fake_engine(wd, "research", max_batch=2, runtime="tensorrt")
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="research", workdir=wd, out=tmp_path / "r"))
    llm = parse((r.out / "llm/config.pbtxt").read_text(), "llm")
    assert llm.max_batch_size == r.max_batch_size == 2  # the profile asks 16; the engine holds 2
    assert list(llm.dynamic_batching.preferred_batch_size) == []  # 4 and 8 do not fit
    assert (r.out / "llm/1/model.plan").read_bytes() == b"plan"
    assert r.io_source == "engines/research/engine.json" and not r.missing
    _fake_engine(wd, "edge", max_batch=2, runtime="tensorrt-rtx")
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", workdir=wd, out=tmp_path / "e"))
    sched = json.loads(parse((r.out / "generate/config.pbtxt").read_text(), "g").parameters["scheduler"].string_value)
    # the engine holds 2 rows a call (the profile asks 4): the scheduler's 4 rows take two calls a step
    assert sched["engine_max_batch"] == r.max_batch_size == 2 and sched["max_rows"] == 4
    assert (r.out / "generate/1/model.plan").read_bytes() == b"plan" and not (r.out / "llm").exists()
    assert r.io_source == "engines/edge/engine.json" and not r.missing
    _fake_engine(wd, "edge", max_batch=2, runtime="tensorrt")  # a full-TensorRT plan for a TensorRT-RTX profile
    with pytest.raises(BadInput, match="tensorrt engine"):
        write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", workdir=wd, out=tmp_path / "r2"))


def _runner_inputs(gen) -> tuple[set, set]:
    """The engine inputs and outputs the generate model's KV engine (kv_padded.PaddedKVEngine) feeds and asks the
    runner for, from its config: the token/mask/position inputs, every cache slot's past in and present out."""
    slots = json.loads(gen.parameters["kv_cache"].string_value)["slots"]
    inputs = {"input_ids", "attention_mask", "position_ids", *(s["past"] for s in slots)}
    outputs = {json.loads(gen.parameters["kv_cache"].string_value)["logits"], *(s["present"] for s in slots)}
    return inputs, outputs


def test_edge_runs_its_plan_in_generate(workdir, tmp_path):
    """Issue 21 item 3: the edge profile's TensorRT-RTX plan (which Triton's TensorRT backend cannot load) is run
    by the generate model in-process — one GPU instance per GPU of the pod, the runtime and the plan's path for
    engine_runtimes.load_runner, the engine's inputs from the export — and no `llm` model is written. Bls is
    refused for it; a full-TensorRT profile may choose the same in-process path."""
    prof = load_profiles()["edge"]
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", workdir=workdir, out=tmp_path / "e"))
    assert r.engine_call == "inprocess" and [m.name for m in r.models] == ["generate"] and not (r.out / "llm").exists()
    gen = parse((r.out / "generate/config.pbtxt").read_text(), "generate")
    p = {k: v.string_value for k, v in gen.parameters.items()}
    assert p["engine_call"] == "inprocess" and p["engine_runtime"] == "tensorrt_rtx" and "engine_model" not in p
    assert p["engine_file"] == "generate/1/model.plan" == r.missing[0]  # where the plan is placed once built
    assert [(g.kind, list(g.gpus), g.count) for g in gen.instance_group] == [(1, [i], 1) for i in range(prof.gpus_per_pod)]
    io = onnx_io(workdir / "r1-distill-tiny/onnx/fp32/model.onnx", "")
    assert _runner_inputs(gen) == ({t.name for t in io.inputs}, {t.name for t in io.outputs})
    assert any("in-process" in n and "unverified" in n for n in r.notes)
    with pytest.raises(BadInput, match="TensorRT-RTX plans, which Triton's TensorRT backend"):
        RepositoryConfig(profile="edge", engine_call="bls")
    prod = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="production", engine_call="inprocess",
                                             workdir=workdir, out=tmp_path / "p"))
    gen = parse((prod.out / "generate/config.pbtxt").read_text(), "generate")
    assert gen.parameters["engine_runtime"].string_value == "tensorrt" and [m.name for m in prod.models] == ["generate"]
    assert len(gen.instance_group) == load_profiles()["production"].gpus_per_pod


def test_committed_repository_has_not_drifted(workdir, tmp_path):
    """model_repository/<profile>/ is what `r1deploy repository --profile P --out model_repository/P` writes for
    r1-distill-tiny from its fp32 export with no engine built (see docs/serving.md)."""
    for profile in PROFILES:
        r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile=profile, workdir=workdir, out=tmp_path / profile))
        fresh, committed = committed_files(r.out), committed_files(REPO / "model_repository" / profile)
        assert sorted(fresh) == sorted(committed), f"{profile}: file sets differ"
        for rel, data in fresh.items():
            assert data == committed[rel], f"model_repository/{profile}/{rel} drifted: regenerate it"
        for rel in fresh:
            if rel.endswith(".pbtxt"):
                parse(committed[rel].decode(), rel)


def test_cli_json_and_bad_input(r1, workdir, tmp_path):
    res = r1("--workdir", str(workdir), "--json", "repository", "--model", "minilm", "--profile", "edge",
             "--variant", "python_ort", "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["entry_model"] == "embed" and data["variant"] == "python_ort"
    assert sorted(m["name"] for m in data["models"]) == ["embed", "encoder", "tokenizer"]
    bad = r1("--workdir", str(tmp_path / "empty"), "repository", "--model", "r1-distill-tiny")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not been exported" in bad.stderr
    bad = r1("--workdir", str(workdir), "repository", "--profile", "nope")
    assert bad.returncode == 2 and "unknown deployment profile" in bad.stderr
    bad = r1("--workdir", str(workdir), "repository", "--variant", "python_ort", "--intra-op-threads", "-1")
    assert bad.returncode == 2 and "--intra-op-threads" in bad.stderr


# The generate model's sampling and text logic, loaded from its source file (it imports no Triton module).
def _generate_module():
    spec = importlib.util.spec_from_file_location("llm_scheduler", REPO / "exporter/repository/python_models/llm_scheduler.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sampler_and_text_stream():
    g = _generate_module()
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    assert g.Sampler(0.0, 1.0, None)(logits) == 1
    a = [g.Sampler(1.0, 0.9, 7)(logits) for _ in range(5)]
    s = g.Sampler(1.0, 0.9, 7)
    assert a[0] == s(logits)  # same seed, same first draw
    narrow = g.Sampler(5.0, 0.01, 1)
    assert {narrow(logits) for _ in range(20)} == {1}  # the nucleus holds only the top token

    pieces = {1: "Hel", 2: "lo ST", 3: "OP after"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    t = g.TextStream(decode, ["STOP"])
    assert t.push(1) == "Hel"
    assert t.push(2) == "lo "  # "ST" may begin the stop string: held back
    assert t.push(3) == "" and t.stopped and t.text == "Hello "
    utf8 = {1: b"ab\xc3", 2: b"\xa9", 3: b"\xe2\x82"}  # byte-level tokens: "é" and "€" split across tokens
    t = g.TextStream(lambda ids: b"".join(utf8[i] for i in ids).decode("utf-8", "replace"), [])
    assert t.push(1) == "ab"  # an incomplete UTF-8 character is held back …
    assert t.push(2) == "\u00e9"  # … until the next token completes it
    assert t.push(3) == "" and t.finish() == "\ufffd" and t.text == "ab\u00e9\ufffd"  # never completed
    t = g.TextStream(decode, [], incremental=False)
    assert [t.push(i) for i in (1, 2, 3)] == ["", "", ""] and t.finish() == t.text == "Hello STOP after"


def test_text_stream_matches_whole_decode_with_a_real_tokenizer(tmp_path):
    """Incremental windows must give exactly the text one decode of all tokens gives: random token ids of the
    embedded model's byte-level BPE (split multi-byte characters included), with and without stop strings."""
    from tokenizers import Tokenizer

    from exporter.tiny_models import write_tiny_checkpoint

    g = _generate_module()
    tok = Tokenizer.from_file(str(write_tiny_checkpoint("r1-distill-tiny", tmp_path / "ckpt") / "tokenizer.json"))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = np.random.default_rng(0)
    ids = tok.encode("Grüße, 東京! naïve café — 3.14 € ok " * 3).ids
    for trial in range(40):
        tokens = ids if trial == 0 else [int(x) for x in rng.integers(0, tok.get_vocab_size(), 60)]
        whole = decode(tokens)
        t = g.TextStream(decode, [])
        streamed = "".join(t.push(x) for x in tokens) + t.finish()
        assert streamed == whole == t.text, trial
        stop = whole[20:23]
        if stop and "\ufffd" not in stop:
            t = g.TextStream(decode, [stop])
            streamed = "".join(t.push(x) for x in tokens if not t.stopped) + t.finish()
            assert t.stopped and streamed == t.text == whole[: whole.find(stop)], trial


@pytest.mark.rtx
def test_the_engines_io_types_reach_llm_and_generate(workdir, tmp_path):
    """Issue 19: an engine built from the serving graph (FP16 cache IO, logits for the last position) is described
    by its engine.json, not by the ONNX's FP32 IO: the `llm` tensorrt_plan config declares FP16 past/present and
    logits [1, vocab], and the generate model keeps its cache as float16. Without an engine the repository
    describes the engine build-engine would make from the variant it uses (its serving graph)."""
    from tritonclient.grpc import model_config_pb2 as mc

    wd = private_workdir(workdir, tmp_path / "wd", "r1-distill-tiny")
    _fake_engine(wd, "research", max_batch=4, runtime="tensorrt", serving_fp16=True)
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="research", workdir=wd, out=tmp_path / "r"))
    llm = parse((r.out / "llm/config.pbtxt").read_text(), "llm")
    types = {t.name: (t.data_type, list(t.dims)) for t in [*llm.input, *llm.output]}
    assert types["past_key_values.0.key"][0] == types["present.1.value"][0] == mc.TYPE_FP16
    assert types["logits"] == (mc.TYPE_FP32, [1, 1024])
    gen = parse((r.out / "generate/config.pbtxt").read_text(), "generate")
    assert json.loads(gen.parameters["kv_cache"].string_value)["dtype"] == "float16"
    # no engine: the fp32 variant's serving graph (FP32 cache, the last position's logits)
    shutil.rmtree(wd / "r1-distill-tiny/engines")
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="research", workdir=wd, out=tmp_path / "n"))
    llm = parse((r.out / "llm/config.pbtxt").read_text(), "llm")
    types = {t.name: (t.data_type, list(t.dims)) for t in [*llm.input, *llm.output]}
    assert types["logits"] == (mc.TYPE_FP32, [1, 1024]) and types["past_key_values.0.key"][0] == mc.TYPE_FP32
    assert r.io_source == "the serving graph of onnx/fp32/model.onnx (build-engine's)"


def test_real_engine_is_placed_with_its_metadata(workdir, tmp_path, monkeypatch):
    """A TensorRT-RTX engine built by the engine stage (no GPU needed to build): the repository takes its IO and
    max_batch_size from engine.json and copies the plan."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (r1deploy[rtx]) builds the engine")
    from exporter.engine import EngineConfig, EngineMetadata, build_engine

    wd = private_workdir(workdir, tmp_path / "wd", "r1-distill-tiny")
    edge = load_profiles()["edge"]
    build_engine(EngineConfig(model="r1-distill-tiny", profile=edge, workdir=wd, precision="fp32"))
    meta = EngineMetadata.load(wd / "r1-distill-tiny/engines/edge")
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile=edge, workdir=wd, out=tmp_path / "r"))
    gen = parse((r.out / "generate/config.pbtxt").read_text(), "generate")
    assert r.io_source == "engines/edge/engine.json" and not r.missing and r.onnx_variant == meta.onnx_variant
    assert r.max_batch_size <= meta.max_batch_size
    assert _runner_inputs(gen) == ({t.name for t in meta.inputs}, {t.name for t in meta.outputs})
    past = next(t for t in meta.inputs if t.name.startswith("past_key_values."))
    assert meta.graph.form == "serving" and json.loads(gen.parameters["kv_cache"].string_value)["dtype"] == past.dtype
    plan = r.out / gen.parameters["engine_file"].string_value  # generate.py resolves it from the repository root
    assert plan.stat().st_size == meta.engine_bytes
    # the generate model's runner (the copy placed beside it), from this config and this real plan: no GPU here,
    # so its load fails with one line saying so
    monkeypatch.syspath_prepend(str(r.out / "generate/1"))  # as Triton's python backend does: its siblings import
    spec = importlib.util.spec_from_file_location("placed_engine_runtimes", r.out / "generate/1/engine_runtimes.py")
    er = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(er)
    config = {"parameters": {k: {"string_value": v.string_value} for k, v in gen.parameters.items()}}
    with pytest.raises(er.MissingRuntime) as info:
        er.load_runner(gen.parameters["engine_runtime"].string_value, plan, config)
    assert "\n" not in str(info.value) and "no CUDA device" in str(info.value), info.value
