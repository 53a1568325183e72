"""Engine stage: real TensorRT-RTX 1.7 engines built on this CPU-only machine (AOT for SM89/SM80), engine.json,
the portability guard, the stage cache, the CLI and `make build-engine`.

Nothing here loads an engine on a GPU (there is none); full TensorRT cannot be installed here, so its paths are
covered only where they need no library (command line, metadata rules) and are NOT verified against real
TensorRT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line, copy_workdir
from models import BROKEN

from exporter.core import artifacts
from exporter.core.errors import BadInput
from exporter.core.profiles import GpuSpec, Runtime, get_profile
from exporter.engine import (
    EngineConfig,
    EngineMetadata,
    build_engine,
    ensure_compatible,
    plan_build,
    trtexec_command,
)
from exporter.engine.shapes import axis_ranges, shape_profiles

REPO = Path(__file__).resolve().parents[1]


def _rtx_installed() -> bool:
    try:
        from exporter.engine.runtimes import load_runtime

        load_runtime(Runtime.TENSORRT_RTX)
        return True
    except Exception:
        return False


# Only the tests that build an engine need TensorRT-RTX; the shape-profile, metadata and error tests run anywhere.
rtx = [pytest.mark.rtx, pytest.mark.skipif(not _rtx_installed(), reason="TensorRT-RTX (r1deploy[rtx]) is needed for real engine builds")]


def _onnx_variants_for_test(workdir: Path, model: str, variants: tuple[str, ...]) -> None:
    """Write the fp16 / int4-awq-b128-qdq ONNX variants through the quantize stage, with explicit settings and no
    deployment profile, so its accuracy gate is reported but not enforced: these tests are about engines, not
    about INT4 accuracy of a 0.5 M-parameter random model."""
    from quantize import QuantizeConfig, quantize_model

    layout = artifacts.ModelLayout(workdir, model)
    for v in variants:
        if not layout.onnx_path(v).is_file():
            settings = dict(precision="fp16") if v == "fp16" else dict(precision="int4", method="awq", block_size=128, format="qdq")
            quantize_model(QuantizeConfig(model=model, workdir=workdir, **settings))


@pytest.fixture(scope="module")
def tiny(exported, session_workdir, tmp_path_factory):
    """A private workdir for this module (a copy of the session's export): engines built here change nothing that
    another module reads."""
    exported("r1-distill-tiny")
    wd = copy_workdir(session_workdir, tmp_path_factory.mktemp("engines"), "r1-distill-tiny")
    _onnx_variants_for_test(wd, "r1-distill-tiny", ("fp16", "int4-awq-b128-qdq"))
    return wd


@pytest.fixture
def own_tiny(tiny, tmp_path):
    """A workdir of this test's own, for tests that build something other than the edge engine."""
    return copy_workdir(tiny, tmp_path / "w", "r1-distill-tiny")


@pytest.fixture(scope="module")
def edge_build(tiny):
    """The edge (RTX 4090, SM89, int4 QDQ) engine of r1-distill-tiny, built once for the module."""
    return build_engine(EngineConfig(model="r1-distill-tiny", profile=get_profile("edge"), workdir=tiny))


def _run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    r1 = Path(sys.executable).parent / "r1deploy"
    return subprocess.run([str(r1), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


# -- shape profiles (no TensorRT needed) ----------------------------------------------------------------------

def test_decoder_shape_profiles_follow_the_deployment_profile():
    edge = get_profile("edge")  # max_batch 4, preferred [1, 2], input 2048, output 512
    dims = {
        "input_ids": ("batch", "sequence"),
        "attention_mask": ("batch", "total_sequence"),
        "past_key_values.0.key": ("batch", 2, "past_sequence", 32),
    }
    ctx, gen = shape_profiles("decoder", dims, edge)
    assert (ctx.name, gen.name) == ("context", "generation")
    assert ctx.inputs["input_ids"].max == [4, 2048] and ctx.inputs["input_ids"].opt == [2, 1024]
    assert ctx.inputs["past_key_values.0.key"].max == [4, 2, 0, 32]
    assert (gen.inputs["input_ids"].min, gen.inputs["input_ids"].max) == ([1, 1], [4, 1])
    assert gen.inputs["past_key_values.0.key"].min == [1, 2, 1, 32]
    assert gen.inputs["past_key_values.0.key"].max == [4, 2, edge.max_sequence_len - 1, 32]
    # attention_mask covers past + current tokens in every corner of both shape profiles
    for sp in (ctx, gen):
        for which in ("min", "opt", "max"):
            past = getattr(sp.inputs["past_key_values.0.key"], which)[2]
            seq = getattr(sp.inputs["input_ids"], which)[1]
            assert getattr(sp.inputs["attention_mask"], which)[1] == past + seq
    assert gen.inputs["attention_mask"].max[1] == edge.max_sequence_len


def test_encoder_sequence_capped_at_max_position_embeddings():
    ranges = axis_ranges("encoder", get_profile("research"), max_position_embeddings=512)
    assert list(ranges) == ["encode"]
    assert (ranges["encode"]["sequence"].max, ranges["encode"]["batch"].max) == (512, 16)
    with pytest.raises(BadInput, match="not one of"):
        shape_profiles("encoder", {"pixel_values": ("batch", "channels")}, get_profile("edge"))


# -- real TensorRT-RTX builds -----------------------------------------------------------------------------------

@rtx[0]
@rtx[1]
def test_edge_int4_engine_and_metadata(edge_build, tiny):
    r = edge_build
    assert not r.skipped and r.engine_path.is_file()
    meta = EngineMetadata.load(r.metadata_path)
    report = artifacts.read_export_report(artifacts.ModelLayout(tiny, "r1-distill-tiny"))
    onnx_path = artifacts.ModelLayout(tiny, "r1-distill-tiny").onnx_path("int4-awq-b128-qdq")
    assert meta.runtime is Runtime.TENSORRT_RTX and meta.runtime_version.startswith("1.7.")
    assert (meta.gpu_product, meta.compute_capabilities) == ("NVIDIA-GeForce-RTX-4090", ["8.9"])
    assert (meta.precision, meta.onnx_variant, meta.strongly_typed) == ("int4", "int4-awq-b128-qdq", True)
    assert meta.onnx_sha256 == artifacts.sha256_file(onnx_path)
    assert meta.engine_sha256 == artifacts.sha256_file(r.engine_path) and meta.engine_bytes == r.engine_path.stat().st_size
    assert [p.name for p in meta.shape_profiles] == ["context", "generation"]
    assert meta.max_batch_size == 4
    assert [t.name for t in meta.inputs] == report["input_names"]
    assert [t.name for t in meta.outputs] == report["output_names"]
    dtypes = {t.name: t.dtype for t in meta.inputs + meta.outputs}
    assert dtypes["input_ids"] == "int64" and dtypes["logits"] == "float32"
    # the serving graph (issue 19): logits for the last position only, the KV cache IO in FP16 (int4: FP32 compute)
    shapes = {t.name: t.shape for t in meta.outputs}
    assert shapes["logits"] == [-1, 1, 1024]
    assert {dtypes[n] for n in dtypes if n.startswith(("past_key_values.", "present."))} == {"float16"}
    assert (meta.graph.form, meta.graph.logits, meta.graph.kv_dtype) == ("serving", "last", "fp16")
    assert meta.graph.logits_gather.startswith("lm_head input")  # gathered before the LM head, not after it
    assert meta.timing_cache.supported is False and "no-op" in meta.timing_cache.note
    assert meta.reproduce[0] == "tensorrt_rtx" and "--computeCapabilities=89" in meta.reproduce
    served = onnx_path.parent / "engine_graph.onnx"
    assert f"--onnx={served}" in meta.reproduce and meta.reproduce_graph[-1] == str(served)
    assert sum(a.startswith("--minShapes=") for a in meta.reproduce) == 2  # one triple per shape profile
    assert meta.build_seconds > 0  # recorded; how fast is benchmarks' business, not a test's
    assert (r.engine_path.parent / "manifest.json").is_file()


@rtx[0]
@rtx[1]
def test_unchanged_rebuild_skipped_and_force_rebuilds(edge_build, tiny):
    cfg = dict(model="r1-distill-tiny", profile=get_profile("edge"), workdir=tiny)

    def identity(path: Path) -> tuple[int, int]:  # a rebuild renames a new directory into place: a new inode
        st = path.stat()
        return st.st_ino, st.st_mtime_ns

    before = identity(edge_build.engine_path)
    again = build_engine(EngineConfig(**cfg))
    assert again.skipped
    assert identity(again.engine_path) == before, "an up-to-date engine is not rewritten"
    forced = build_engine(EngineConfig(**cfg, force=True))
    assert not forced.skipped
    assert identity(forced.engine_path) != before, "--force writes a new engine"
    # TensorRT-RTX has no timing cache: the forced build records that truthfully and writes no cache file
    assert forced.timing_cache.supported is False and forced.timing_cache.loaded_bytes == 0
    assert not any(artifacts.ModelLayout(tiny, "r1-distill-tiny").timing_cache_dir.glob("tensorrt-rtx-*"))


@rtx[0]
@rtx[1]
def test_fp16_engine_via_cli_json(own_tiny, r1):
    res = r1("--workdir", str(own_tiny), "--json", "build-engine", "--model", "r1-distill-tiny", "--profile", "edge",
             "--precision", "fp16", "--runtime", "tensorrt-rtx", "--no-prepare")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["onnx_variant"], out["precision"], out["compute_capabilities"]) == ("fp16", "fp16", ["8.9"])
    meta = EngineMetadata.load(Path(out["metadata_path"]))
    assert meta.onnx_variant == "fp16" and meta.engine_bytes > 0
    io = {t.name: (t.dtype, t.shape) for t in meta.inputs + meta.outputs}
    # the fp16 variant keeps FP32 IO (keep_io_types); its serving graph drops the cache's boundary Casts
    assert io["past_key_values.0.key"][0] == io["present.1.value"][0] == "float16"
    assert io["logits"] == ("float32", [-1, 1, 1024]) and out["graph"]["kv_dtype"] == "fp16"


@rtx[0]
@rtx[1]
def test_minilm_encoder_engine(exported, session_workdir, tmp_path):
    exported("minilm")
    wd = copy_workdir(session_workdir, tmp_path / "w", "minilm")
    _onnx_variants_for_test(wd, "minilm", ("fp16",))
    r = build_engine(EngineConfig(model="minilm", profile=get_profile("edge"), workdir=wd, precision="fp16"))
    meta = EngineMetadata.load(r.metadata_path)
    assert meta.model_kind == "encoder" and [p.name for p in meta.shape_profiles] == ["encode"]
    assert meta.shape_profile("encode").inputs["input_ids"].max == [4, 512]  # capped at max_position_embeddings
    assert {t.name for t in meta.outputs} == {"last_hidden_state", "embeddings"}
    assert any("max_position_embeddings" in w for w in meta.warnings)
    assert meta.graph.form == "generic" and not meta.reproduce_graph  # an encoder's graph is not rewritten
    with pytest.raises(BadInput, match="rewrites a decoder's logits and KV cache; minilm is an encoder"):
        plan_build(EngineConfig(model="minilm", profile=get_profile("edge"), workdir=wd, precision="fp16", graph="serving"))


# -- the serving graph (issue 19 item 3): what TensorRT is given for a decoder ------------------------------------

def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ONNX Runtime's CPU fusion of DequantizeLinear → MatMul into MatMulNBits quantizes the activations to int8 at its
    # default accuracy level (4); the FP16 rounding of the cache then moves the int4 model's logits ~90x further
    # (measured teacher-forced over 64 steps: 0.27 against 0.0029) than in a weight-only INT4 GEMM with float
    # activations, which is what TensorRT runs. Level 1 keeps the activations FP32.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _greedy(session, kv_dtype, steps: int = 24):
    """A left-padded prefill of 3 rows (the scheduler's generic KV engine pads prompts on the left), then `steps`
    greedy decode steps, each step's present fed back as past. Returns each call's last-position logits, the last
    presents, and the prefill's logits shape."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, :3] = mask[2, :6] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    past = {i.name: np.zeros((3, 2, 0, 32), kv_dtype) for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    names = [o.name for o in session.get_outputs()]
    logits, prefill_shape = [], None
    for _ in range(steps + 1):
        out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}), strict=True))
        prefill_shape = prefill_shape or out["logits"].shape
        logits.append(out["logits"][:, -1])
        past = {n: out[n.replace("past_key_values.", "present.")] for n in past}
        ids, pos = logits[-1].argmax(-1)[:, None], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
    return np.stack(logits), past, prefill_shape


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int4-awq-b128-qdq"])
def test_serving_graph_computes_what_the_generic_graph_does(tiny, variant):
    """The rewrite TensorRT is given, run in ONNX Runtime against the variant it comes from, over a left-padded
    prefill and 24 greedy decode steps fed with the rewritten graph's own (FP16) cache. fp32 and fp16: the same
    logits bit for bit (fp16: the removed Casts were keep_io_types' round trip). int4 (FP32 compute, the cache stored
    as FP16): the same greedy tokens, logits within 0.01 (measured 0.0028 of logits up to ~14.6)."""
    import onnx

    from exporter.engine.serving_graph import engine_graph, kv_dtype_for

    path = artifacts.ModelLayout(tiny, "r1-distill-tiny").onnx_path(variant)
    generic = onnx.load(str(path), load_external_data=False)
    before = generic.SerializeToString()
    kv = kv_dtype_for(variant.split("-")[0])
    served, info = engine_graph(generic, kv)
    assert generic.SerializeToString() == before, "the variant's graph is left as it is"
    assert (info.form, info.logits, info.kv_dtype) == ("serving", "last", "fp32" if variant == "fp32" else "fp16")
    if variant == "fp16":  # the boundary Casts are gone: the cache inputs feed the graph's FP16 ops directly
        readers = [n for n in served.graph.node if any(x.startswith("past_key_values.") for x in n.input)]
        assert readers and not any(n.op_type == "Cast" for n in readers)
    want, want_past, want_shape = _greedy(_ort_session(generic), np.float32)
    got, got_past, got_shape = _greedy(_ort_session(served), np.float16 if kv == "fp16" else np.float32)
    assert want_shape == (3, 9, 1024) and got_shape == (3, 1, 1024)
    assert {p.dtype for p in got_past.values()} == {np.dtype(np.float16 if kv == "fp16" else np.float32)}
    if variant in ("fp32", "fp16"):
        assert np.array_equal(got, want)
        assert all(np.array_equal(got_past[n], want_past[n].astype(got_past[n].dtype)) for n in got_past)
    else:
        assert np.array_equal(got.argmax(-1), want.argmax(-1)), "greedy tokens differ"
        assert float(np.abs(got - want).max()) < 0.01


def test_serving_graph_without_an_lm_head_matmul_and_what_it_refuses():
    """A graph whose logits come from no MatMul by a constant gets the Gather on the output itself (the same values);
    a graph without a KV cache, or with ONNX Runtime's own ops (the fused graph), is refused in one line."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporter.engine.serving_graph import engine_graph

    def graph(nodes, domain_ops=()):
        past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 4])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
        outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 8]),
                helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "past", 4])]
        return helper.make_model(helper.make_graph(nodes, "g", [past, x], outs), opset_imports=[
            helper.make_opsetid("", 21), *[helper.make_opsetid(d, 1) for d in domain_ops]])

    plain = graph([helper.make_node("Relu", ["x"], ["logits"]),
                   helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])])
    served, info = engine_graph(plain, "fp16")
    assert (info.logits, info.logits_gather) == ("last", "output")
    onnx.checker.check_model(served, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    past = np.random.default_rng(1).standard_normal((2, 2, 3, 4)).astype(np.float16)
    logits, present = ort.InferenceSession(served.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "past_key_values.0.key": past})
    assert np.array_equal(logits, np.maximum(x, 0)[:, -1:]) and present.dtype == np.float16
    assert np.array_equal(present, past)

    no_cache = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 8])]))
    with pytest.raises(BadInput, match="for decoders with a KV cache"):
        engine_graph(no_cache, "fp16")
    fused = graph([helper.make_node("Gelu", ["x"], ["logits"], domain="com.microsoft"),
                   helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])], ["com.microsoft"])
    with pytest.raises(BadInput, match="non-standard ops"):
        engine_graph(fused, "fp16")
    with pytest.raises(BadInput, match="KV-cache dtype 'bf16'"):
        engine_graph(plain, "bf16")


@rtx[0]
@rtx[1]
def test_serving_graph_with_external_weights_and_the_generic_option(own_tiny):
    """TensorRT parses the rewritten graph's bytes with the variant's path, so weights kept in external data resolve
    from the variant's directory; the step recorded before the trtexec line writes the graph it reads, and that file
    parses to the engine's inputs and outputs. `graph="generic"` (`--engine-graph generic`) builds the variant as it
    is — the cache IO it has (FP32 for keep_io_types' FP16) and logits at every position — as another engine."""
    import onnx

    from exporter.engine.runtimes import load_runtime

    path = artifacts.ModelLayout(own_tiny, "r1-distill-tiny").onnx_path("fp16")
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    cfg = dict(model="r1-distill-tiny", profile=get_profile("edge"), workdir=own_tiny, precision="fp16")
    meta = EngineMetadata.load(build_engine(EngineConfig(**cfg)).metadata_path)
    io = {t.name: (t.dtype, t.shape) for t in meta.inputs + meta.outputs}
    assert io["logits"] == ("float32", [-1, 1, 1024]) and io["present.0.key"][0] == "float16"

    python, *args = meta.reproduce_graph
    assert python == "python"
    subprocess.run([sys.executable, *args], check=True, cwd=REPO, capture_output=True)
    rt = load_runtime(Runtime.TENSORRT_RTX)
    _b, network, _p = rt.parse_onnx(Path(args[-1]), rt.logger())
    parsed = {t.name: (rt.dtype_name(t.dtype), [int(d) for d in t.shape])
              for t in [network.get_input(i) for i in range(network.num_inputs)]
              + [network.get_output(i) for i in range(network.num_outputs)]}
    assert parsed == io

    generic = build_engine(EngineConfig(**cfg, graph="generic"))
    assert not generic.skipped, "another graph is another engine"
    g = EngineMetadata.load(generic.metadata_path)
    gio = {t.name: (t.dtype, t.shape) for t in g.inputs + g.outputs}
    assert gio["logits"] == ("float32", [-1, -1, 1024]) and gio["past_key_values.0.key"][0] == "float32"
    assert (g.graph.form, g.graph.logits, g.graph.kv_dtype, g.reproduce_graph) == ("generic", "all", "fp32", [])
    assert f"--onnx={path}" in g.reproduce


# -- portability guard ---------------------------------------------------------------------------------------

@rtx[0]
@rtx[1]
def test_metadata_mismatch_refused(edge_build):
    meta = EngineMetadata.load(edge_build.metadata_path)
    edge, production = get_profile("edge"), get_profile("production")
    ensure_compatible(meta, edge)
    ensure_compatible(meta, edge, runtime_version=meta.runtime_version)
    with pytest.raises(BadInput, match="tensorrt-rtx engine but deployment profile 'production'"):
        ensure_compatible(meta, production)
    rtx_a100 = dataclasses.replace(production, runtime=Runtime.TENSORRT_RTX)
    with pytest.raises(BadInput, match=r"compute capability 8\.9 .*compute capability 8\.0"):
        ensure_compatible(meta, rtx_a100)
    with pytest.raises(BadInput, match="built with tensorrt-rtx 1.7.1.116 but the server runs 1.8.0"):
        ensure_compatible(meta, edge, runtime_version="1.8.0")


@rtx[0]
@rtx[1]
def test_hardware_compatible_rtx_engine_accepted_on_other_gpu(own_tiny):
    rtx3090 = dataclasses.replace(get_profile("edge"), name="edge-3090",
                                  gpu=GpuSpec("NVIDIA-GeForce-RTX-3090", "8.6", 24))
    hwc = build_engine(EngineConfig(model="r1-distill-tiny", profile=get_profile("edge"), workdir=own_tiny,
                                    hardware_compatible=True, precision="fp16"))
    meta = EngineMetadata.load(hwc.metadata_path)
    assert meta.hardware_compatibility == "ampere_plus" and {"8.0", "8.6", "8.9"} <= set(meta.compute_capabilities)
    ensure_compatible(meta, rtx3090)
    plain = dataclasses.replace(meta, compute_capabilities=["8.9"], hardware_compatible=False, hardware_compatibility="none")
    with pytest.raises(BadInput, match="not hardware-compatible"):
        ensure_compatible(plain, rtx3090)


def test_full_tensorrt_command_line_and_ampere_plus_rule(tiny):
    """Full TensorRT is not installable here: this checks only r1deploy's own logic for it (the trtexec line and
    the Ampere+ rule of the guard) — NOT verified against real TensorRT."""
    plan = plan_build(EngineConfig(model="r1-distill-tiny", profile=get_profile("production"), workdir=tiny,
                                   hardware_compatible=True))
    argv = trtexec_command(plan)
    assert argv[0] == "trtexec" and "--stronglyTyped" in argv
    assert "--memPoolSize=workspace:16384M" in argv and "--builderOptimizationLevel=3" in argv
    assert "--hardwareCompatibilityLevel=ampere+" in argv
    assert any(a.startswith("--timingCacheFile=") and "timing-cache/tensorrt-" in a for a in argv)
    assert plan.onnx_variant == "fp16" and plan.engine_dir.name == "production"
    gen = plan.shape_profiles[1]
    assert gen.inputs["attention_mask"].max == [64, get_profile("production").max_sequence_len]


# -- errors -------------------------------------------------------------------------------------------------

@rtx[0]
@rtx[1]
def test_parser_error_is_one_line_with_node_and_op(tmp_path, r1):
    layout = artifacts.ModelLayout(tmp_path, "broken")
    BROKEN["unknown-op-graph"].build(None, layout.onnx_path("fp32"))
    (layout.onnx_dir("fp32") / "export_report.json").write_text(json.dumps({"kind": "encoder"}))
    res = r1("--workdir", str(tmp_path), "build-engine", "--model", "broken", "--profile", "edge", "--precision", "fp32",
             "--no-prepare")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "node 'my_fancy_node' (op FancyOp)" in lines[0]


def test_missing_variant_is_bad_input(tiny):
    edge = get_profile("edge")
    b32 = dataclasses.replace(edge, quantization=dataclasses.replace(edge.quantization, block_size=32))
    # `tiny` is this module's private copy of the session's workdir, which other modules may have quantized to
    # this variant already (test_quantize does): removed here, so the test does not depend on the order
    shutil.rmtree(artifacts.ModelLayout(tiny, "r1-distill-tiny").onnx_dir("int4-awq-b32-qdq"), ignore_errors=True)
    with pytest.raises(BadInput, match="no int4-awq-b32-qdq ONNX .* run `r1deploy quantize"):
        plan_build(EngineConfig(model="r1-distill-tiny", profile=b32, workdir=tiny))


# A meta-path finder that makes the TensorRT modules absent (ModuleNotFoundError, as on a machine without them).
_BLOCK_MODULES = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorrt_rtx_bindings", "tensorrt_rtx", "tensorrt"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.parametrize("runtime,extra", [("tensorrt-rtx", "rtx"), ("tensorrt", "gpu")])
def test_absent_runtime_exits_2_with_install_hint(tmp_path, runtime, extra):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_BLOCK_MODULES)
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    res = _run(["--workdir", str(tmp_path / "w"), "build-engine", "--model", "r1-distill-tiny", "--profile", "edge",
                "--runtime", runtime], env=env)
    assert_one_line(res, 2, "is not installed")
    assert res.stderr.count("\n") == 1
    assert f"pip install 'r1deploy[{extra}]'" in res.stderr


def test_broken_runtime_is_a_failure_naming_the_error(tmp_path):
    """TensorRT-RTX present but unloadable (a CUDA library missing): exit 1 quoting the import error, not a skip.
    The module is a stub that fails the way a broken install does — a real broken install cannot be made here."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for mod in ("tensorrt_rtx_bindings", "tensorrt_rtx"):
        (stubs / f"{mod}.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])}
    res = _run(["--workdir", str(tmp_path / "w"), "build-engine", "--model", "r1-distill-tiny", "--profile", "edge",
                "--runtime", "tensorrt-rtx"], env=env)
    line = assert_one_line(res, 1, "TensorRT-RTX is installed but cannot be loaded")
    assert "OSError: libcudart.so.13: cannot open shared object file" in line


def _make_build_engine(workdir: Path) -> subprocess.CompletedProcess:
    """What users run in CI. `-o <stamp>`: never reinstall the venv from inside a test; BIN: this interpreter's
    console script (a worktree has no .venv of its own)."""
    return subprocess.run(
        ["make", "-o", ".venv/.r1deploy-installed", "build-engine", f"WORKDIR={workdir}", "MODEL=r1-distill-tiny",
         "PROFILE=edge", "RUNTIME=tensorrt-rtx", f"BIN={Path(sys.executable).parent}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )


@rtx[0]
@rtx[1]
def test_make_build_engine_from_nothing_then_a_cache_hit(tmp_path):
    """A fresh clone's first `make build-engine`: no export, no quantized ONNX — it runs export, then the edge
    profile's INT4 quantization, then the engine. The second run finds every stage's fingerprint unchanged and
    rewrites nothing."""
    wd = tmp_path / "fresh"
    first = _make_build_engine(wd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "export: done" in first.stdout and "quantize int4-awq-b128-qdq: done" in first.stdout
    assert "r1-distill-tiny tensorrt-rtx" in first.stdout and "up to date" not in first.stdout
    layout = artifacts.ModelLayout(wd, "r1-distill-tiny")
    meta = EngineMetadata.load(layout.engine_dir("edge"))
    assert meta.onnx_variant == "int4-awq-b128-qdq"
    written = {p: p.stat().st_mtime_ns for p in wd.rglob("*") if p.is_file() and "models" not in p.parts}

    second = _make_build_engine(wd)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "export: up to date" in second.stdout and "quantize int4-awq-b128-qdq: up to date" in second.stdout
    assert "engine for deployment profile edge (int4-awq-b128-qdq, compute capability 8.9) up to date" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in wd.rglob("*") if p.is_file() and "models" not in p.parts} == written


@rtx[0]
@rtx[1]
def test_build_engine_reuses_the_recorded_export_options(tmp_path, r1):
    """A model exported with non-default options is a cache hit for `build-engine`, not a silent re-export."""
    wd = tmp_path / "w"
    res = r1("--workdir", str(wd), "export", "--model", "r1-distill-tiny", "--exporter", "legacy")
    assert res.returncode == 0, res.stderr
    onnx_file = artifacts.ModelLayout(wd, "r1-distill-tiny").onnx_path("fp32")
    before = onnx_file.stat().st_mtime_ns
    res = r1("--workdir", str(wd), "--json", "build-engine", "--model", "r1-distill-tiny", "--profile", "edge",
             "--precision", "fp32")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [(u["stage"], u["skipped"]) for u in out["upstream"]] == [("export", True)]
    assert onnx_file.stat().st_mtime_ns == before and not out["skipped"]


def test_no_prepare_keeps_the_engine_only_behaviour(tmp_path, r1):
    res = r1("--workdir", str(tmp_path), "build-engine", "--model", "r1-distill-tiny", "--profile", "edge", "--no-prepare")
    assert res.returncode == 2
    assert "has not been exported yet" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "r1-distill-tiny").exists()
