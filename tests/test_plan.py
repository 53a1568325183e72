"""`r1deploy plan`: sizes from config.json alone, checked against the real ONNX files r1deploy writes for the tiny
presets (FP32 export, FP16 and INT4 from the quantize stage), against the published sizes of the R1 family, and
the fit / refusal logic the repository and manifests stages rely on."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest

from exporter.core import artifacts
from exporter.core.errors import BadInput
from exporter.core.profiles import Precision, QuantSpec, get_profile, load_profiles
from exporter.plan import (
    GIB,
    ORT_CPU_SESSION_BYTES,
    REAL_FAMILY,
    PlanConfig,
    cpu_session_memory,
    ensure_deployable,
    load_shape,
    plan_capacity,
    scheduler_limits,
    weight_bytes,
)

# The sizes DeepSeek publishes for each checkpoint (model cards), in billions of parameters.
PUBLISHED_B = {
    "r1-distill-qwen-1.5b": 1.78, "r1-distill-qwen-7b": 7.62, "r1-distill-qwen-14b": 14.8,
    "r1-distill-qwen-32b": 32.8, "r1-distill-llama-8b": 8.03, "r1-distill-llama-70b": 70.6, "deepseek-r1": 671,
}


def _initializer_bytes(onnx_path) -> int:
    """Bytes of every initializer of an ONNX model (external data included), INT4/UINT4 at two per byte."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            total += (n + 1) // 2
        else:
            total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


@pytest.mark.parametrize("model", sorted(PUBLISHED_B))
def test_parameter_counts_match_the_published_sizes(model):
    shape = load_shape(model)
    assert shape.parameters / 1e9 == pytest.approx(PUBLISHED_B[model], rel=0.006)


@pytest.fixture(scope="module", params=["r1-distill-tiny", "r1-moe-tiny"])
def tiny_variants(request, exported, session_workdir):
    """A tiny preset exported (FP32) and quantized to FP16 and INT4 (AWQ, block 128, QDQ) by the real stages,
    without a profile's mixed precision (which would keep layers FP32 at the gate's choice)."""
    from quantize import QuantizeConfig, quantize_model

    model = request.param
    exported(model)
    q = {"fp32": artifacts.ModelLayout(session_workdir, model).onnx_path("fp32")}
    for precision in ("fp16", "int4"):
        r = quantize_model(QuantizeConfig(model=model, workdir=session_workdir, precision=precision, method="awq",
                                          block_size=128, format="qdq", symmetric=True))
        q[precision] = r.onnx_path
    return model, session_workdir, q


def test_weight_bytes_reproduce_the_real_onnx_files(tiny_variants):
    model, workdir, paths = tiny_variants
    shape = load_shape(model, workdir)
    assert shape.source.endswith("config.json")  # the built checkpoint's own config, not the declared one
    for precision, path in paths.items():
        planned = weight_bytes(shape, precision, QuantSpec(method="awq", block_size=128, format="qdq")).total
        real = _initializer_bytes(path)
        assert planned == pytest.approx(real, rel=0.01), f"{model} {precision}: plan {planned} B vs ONNX {real} B"


def test_kv_bytes_per_token_match_the_exported_cache(tiny_variants):
    """GQA: 2 · layers · kv_heads · head_dim; MLA: the compressed latent transformers caches (kv_lora_rank +
    qk_rope_head_dim per layer) — both read back from the export's own cache layout."""
    model, workdir, _ = tiny_variants
    report = json.loads((artifacts.ModelLayout(workdir, model).onnx_dir("fp32") / artifacts.EXPORT_REPORT).read_text())
    cache = report["cache"]
    per_layer = int(np.prod(cache["key_shape"])) + int(np.prod(cache["value_shape"]))
    assert load_shape(model, workdir).kv_elements_per_token() == cache["num_layers"] * per_layer


def test_cpu_session_plan_counts_the_served_engines_kv_buffers_and_mapped_embedding(exported_fused, session_workdir):
    """The CPU plan's KV is exactly the buffers the served engine (kv_shared.SharedKVEngine over the fused graph)
    allocates; its weights are the fused graph's initializers less the mapped embedding and rotary tables (a tied table is
    stored twice by the fused graph: the Gather's, mapped, and the LM head's transposed copy, resident) — the RSS
    side is measured by benchmarks/plan_vs_session.py, not here (no memory bound in a test)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "exporter" / "repository" / "python_models"))
    from kv_shared import SharedKVEngine

    r = exported_fused("r1-distill-tiny")
    shape = load_shape("r1-distill-tiny", session_workdir)
    engine = SharedKVEngine.from_path(r.onnx_path, 3, 200, threads=1)
    m = cpu_session_memory(shape, "fp32", rows=3, capacity=engine.capacity, prefill_tokens=64)
    assert m.kv_cache == sum(b.nbytes for b in engine.buffers.values())
    table = 4 * shape.vocab_size * shape.hidden_size
    model = onnx.load(str(r.onnx_path), load_external_data=False)
    # the rotary cos / sin tables are gathered by position like the embedding: mapped, not resident
    rotary = sum(4 * int(np.prod(t.dims)) for t in model.graph.initializer if t.name in ("cos_cache", "sin_cache"))
    assert rotary > 0
    expected = _initializer_bytes(r.onnx_path) - table - rotary
    assert m.weights == pytest.approx(expected, rel=0.01)
    assert m.total == m.weights + m.kv_cache + m.prefill + ORT_CPU_SESSION_BYTES
    longer = cpu_session_memory(shape, "fp32", rows=3, capacity=engine.capacity, prefill_tokens=128)
    assert longer.prefill > m.prefill and longer.kv_cache == m.kv_cache


def test_deepseek_r1_caches_the_mla_latent_not_full_heads():
    shape = load_shape("deepseek-r1")
    assert shape.kv_elements_per_token() == 61 * (512 + 64)
    full_heads = 2 * 61 * 128 * (128 + 64)
    assert full_heads / shape.kv_elements_per_token() > 40


def test_int4_accounting_counts_codes_scales_and_zero_points():
    shape = load_shape("r1-distill-qwen-7b")
    sym = weight_bytes(shape, "int4", QuantSpec(block_size=128, symmetric=True, method="rtn"))
    asym = weight_bytes(shape, "int4", QuantSpec(block_size=128, symmetric=False, method="rtn"))
    b32 = weight_bytes(shape, "int4", QuantSpec(block_size=32, symmetric=True, method="rtn"))
    assert sym.codes * 2 == sym.quantized_params and sym.zero_points == 0
    assert sym.scales == 4 * sym.quantized_params // 128
    assert asym.zero_points == pytest.approx(sym.quantized_params / 128 / 2, rel=1e-6)
    assert b32.scales == 4 * sym.scales
    assert sym.total < weight_bytes(shape, "fp16").total < weight_bytes(shape, "fp32").total


def test_fit_batch_and_kv_budget_follow_the_memory_left():
    production = get_profile("production")
    small = plan_capacity(PlanConfig(load_shape("r1-distill-qwen-1.5b"), production, Precision.FP16))
    assert small.fits and small.planned_batch == production.max_batch_size
    assert small.kv_budget_tokens == production.max_batch_size * production.max_sequence_len
    big = plan_capacity(PlanConfig(load_shape("r1-distill-qwen-14b"), production, Precision.FP16))
    assert not big.fits and 0 < big.planned_batch < production.max_batch_size
    left = big.gpu_memory_bytes - (big.memory_at_limits.total - big.memory_at_limits.kv_cache)
    assert big.planned_batch == left // (big.kv_bytes_per_token * big.max_sequence_len)
    assert scheduler_limits(big) == {"max_rows": big.planned_batch, "kv_budget_tokens": big.kv_budget_tokens}
    # the engines' serving graph keeps an FP16 cache for an FP16 model; an FP32 one (--kv-dtype fp32) doubles the KV
    # per token and so (about) halves the batch that fits
    assert big.kv_dtype == "fp16"
    fp32_kv = plan_capacity(PlanConfig(load_shape("r1-distill-qwen-14b"), production, Precision.FP16, kv_dtype="fp32"))
    assert fp32_kv.kv_bytes_per_token == 2 * big.kv_bytes_per_token
    assert big.planned_batch >= 2 * fp32_kv.planned_batch - 1


def test_serving_memory_counts_one_prefill_and_the_build_counts_the_workspace():
    """Serving = weights + KV + one max prefill's activations and logits + runtime; the builder workspace belongs to
    the engine build, which must fit the GPU on its own. The engines' serving graph and the fused graph hold the last
    position's logits; the generic graph every prompt position's."""
    production = get_profile("production")
    shape = load_shape("r1-distill-qwen-7b")
    p = plan_capacity(PlanConfig(shape, production, Precision.FP16))
    m = p.memory_at_limits
    assert m.total == m.weights + m.kv_cache + m.logits + m.activations + m.runtime
    assert m.build == m.weights + m.workspace + m.runtime and m.workspace == 16 * GIB
    assert (p.graph, m.logits) == ("serving", 4 * shape.vocab_size)  # the last position only
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    assert m.activations == 2 * production.max_input_len * (3 * h + 2 * q + 2 * kv + 3 * i)  # FP16, no scores
    generic = plan_capacity(PlanConfig(shape, production, Precision.FP16, kv_dtype="fp16", graph="generic"))
    assert generic.memory_at_limits.logits == 4 * production.max_input_len * shape.vocab_size  # every position
    fused = plan_capacity(PlanConfig(shape, production, Precision.FP16, graph="fused"))
    assert fused.memory_at_limits.logits == 4 * shape.vocab_size
    assert fused.memory_at_limits.activations == m.activations  # no S × S attention matrix in either
    # a bigger workspace changes the build, not what serving holds …
    bigger = dataclasses.replace(production, builder=dataclasses.replace(production.builder, workspace_gib=40))
    q40 = plan_capacity(PlanConfig(shape, bigger, Precision.FP16, kv_dtype="fp16"))
    assert q40.max_concurrent_sequences == p.max_concurrent_sequences and q40.memory_at_limits.total == m.total
    # … until the build no longer fits the GPU: then nothing can be served from it
    huge = dataclasses.replace(production, builder=dataclasses.replace(production.builder, workspace_gib=70))
    none = plan_capacity(PlanConfig(shape, huge, Precision.FP16, kv_dtype="fp16"))
    assert none.planned_batch == 0 and not none.fits and "engine build needs" in none.refusal()
    with pytest.raises(BadInput, match="graph"):
        PlanConfig(shape, production, Precision.FP16, graph="traced")


@pytest.mark.parametrize("graph,precision,kv", [
    ("serving", "fp16", "fp16"), ("serving", "int4", "fp16"), ("serving", "fp32", "fp32"),
    ("generic", "fp16", "fp32"), ("generic", "int4", "fp32"), ("fused", "fp16", "fp16"), ("fused", "int4", "fp32"),
])
def test_kv_dtype_defaults_to_the_served_graphs_cache_io(graph, precision, kv):
    """What each graph's cache IO is when nothing overrides it: the engines' serving graph stores the cache in the
    compute dtype (FP16 for fp16 and int4: exporter/engine/serving_graph.py), the generic graph as exported and
    quantized keeps FP32 IO, the fused graph's fp16 variant has an FP16 cache. `kv_dtype` overrides it."""
    shape, edge = load_shape("r1-distill-qwen-7b"), get_profile("edge")
    p = plan_capacity(PlanConfig(shape, edge, Precision(precision), graph=graph))
    assert p.kv_dtype == kv and p.kv_bytes_per_token == shape.kv_elements_per_token() * {"fp16": 2, "fp32": 4}[kv]
    other = {"fp16": "fp32", "fp32": "fp16"}[kv]
    assert plan_capacity(PlanConfig(shape, edge, Precision(precision), other, graph)).kv_dtype == other


def test_a_model_that_cannot_fit_is_refused_with_the_numbers_and_what_would_fit():
    plan = plan_capacity(PlanConfig(load_shape("r1-distill-llama-70b"), get_profile("production"), Precision.FP16))
    assert plan.planned_batch == 0 and plan.gpus_per_replica >= 2
    assert "production/int4" in " ".join(plan.alternatives)
    with pytest.raises(BadInput) as err:
        ensure_deployable(plan)
    msg = err.value.message
    assert "131.4 GiB" in msg and "cannot split a model across GPUs" in msg and "production/int4" in msg


def test_full_r1_fits_no_profile():
    shape = load_shape("deepseek-r1")
    for profile in load_profiles().values():
        for precision in (Precision.FP16, Precision.INT4):
            p = plan_capacity(PlanConfig(shape, profile, precision))
            assert p.planned_batch == 0 and p.alternatives == []


def test_decode_bound_falls_with_weight_bytes_and_rises_with_batch():
    edge = get_profile("edge")
    shape = load_shape("r1-distill-llama-8b")
    int4 = plan_capacity(PlanConfig(shape, edge, Precision.INT4))
    # at batch 1 the bound is bandwidth / (every weight but the embedding table + one embedding row + the KV of
    # one sequence at the mean decode context)
    embedding = int4.weights.by_role["embedding"]
    ctx = edge.max_input_len + edge.max_output_len // 2
    step = int4.weights.total - embedding + embedding / shape.vocab_size + int4.kv_bytes_per_token * ctx
    bound = edge.gpu.memory_bandwidth_gb_s * 1e9 / step
    assert int4.decode_tokens_per_s_batch1 == pytest.approx(bound, rel=1e-3)
    assert int4.decode_tokens_per_s_planned > int4.decode_tokens_per_s_batch1
    fp16 = plan_capacity(PlanConfig(shape, get_profile("research"), Precision.FP16))
    int4_r = plan_capacity(PlanConfig(shape, get_profile("research"), Precision.INT4))
    assert int4_r.decode_tokens_per_s_batch1 > fp16.decode_tokens_per_s_batch1


def test_moe_decode_reads_only_the_routed_experts():
    shape = load_shape("deepseek-r1")
    production = get_profile("production")
    # a hypothetical GPU big enough for the INT4 weights, to get a bound at all
    huge = dataclasses.replace(production, gpu=dataclasses.replace(production.gpu, memory_gib=1024))
    p = plan_capacity(PlanConfig(shape, huge, Precision.INT4))
    total_read_bound = huge.gpu.memory_bandwidth_gb_s * 1e9 / p.weights.total
    assert p.decode_tokens_per_s_batch1 > 5 * total_read_bound  # 8 of 256 experts per token


def test_config_json_of_a_checkpoint_dir_and_bad_configs(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(BadInput, match="model_type 'bert' cannot be planned"):
        load_shape(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(BadInput, match="vocab_size must be a positive integer"):
        load_shape(d)
    with pytest.raises(BadInput, match="no config.json"):
        load_shape(tmp_path / "absent")


def test_cli_json_every_profile_and_one_line_errors(r1):
    res = r1("--json", "plan", "--model", "r1-distill-qwen-32b", "--precision", "all")
    assert res.returncode == 0, res.stderr
    plans = json.loads(res.stdout)["plans"]
    assert {(p["profile"], p["precision"]) for p in plans} == {
        (pr, pc) for pr in ("production", "research", "edge") for pc in ("fp16", "int4")}
    fp16_prod = next(p for p in plans if (p["profile"], p["precision"]) == ("production", "fp16"))
    # 61 GiB of FP16 weights on an 80 GiB A100: a reduced batch (the workspace is the build's, not serving's) …
    assert 0 < fp16_prod["planned_batch"] < 64 and fp16_prod["weights"]["total"] > 60 * GIB
    edge_fp16 = next(p for p in plans if (p["profile"], p["precision"]) == ("edge", "fp16"))
    assert edge_fp16["planned_batch"] == 0
    assert (fp16_prod["graph"], fp16_prod["kv_dtype"], fp16_prod["memory_at_limits"]["logits"]) == (
        "serving", "fp16", 4 * 152064)
    # … which the generic graph (an FP32 cache, logits at every prompt position: 2.3 GiB) more than halves
    generic = r1("--json", "plan", "--model", "r1-distill-qwen-32b", "--profile", "production", "--graph", "generic")
    assert generic.returncode == 0, generic.stderr
    g = json.loads(generic.stdout)["plans"][0]
    assert g["kv_dtype"] == "fp32" and 2 * g["planned_batch"] <= fp16_prod["planned_batch"]
    bad = r1("plan", "--model", "no-such-model")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_cli_human_table_names_every_real_model(r1):
    res = r1("plan", env={"COLUMNS": "160"})
    assert res.returncode == 0, res.stderr
    for model in REAL_FAMILY:
        assert model in res.stdout
    assert "cannot split a model across GPUs" in res.stdout


# --- the plan in the repository and manifests stages ---------------------------------------------------------


def _profiles_file(tmp_path, **edge_overrides) -> str:
    import yaml

    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"small-gpu": {**_edge_data(), **edge_overrides}}))
    return str(path)


def _edge_data() -> dict:
    from exporter.core.profiles import builtin_profile_data

    return builtin_profile_data()["edge"]


def test_repository_caps_the_batch_at_what_fits_and_refuses_what_cannot(tmp_path, exported, session_workdir, r1):
    """A GPU repository of the real tiny export on a profile whose GPU is made small enough (through the
    workspace the profile allows) for exactly two sequences, then for none."""
    from exporter.core.profiles import load_profiles
    from exporter.repository import RepositoryConfig, write_repository

    exported("r1-distill-tiny")
    base = load_profiles()["edge"]
    shape = load_shape("r1-distill-tiny", session_workdir)
    probe = plan_capacity(PlanConfig(shape, base, Precision.FP32))
    m = probe.memory_at_limits
    # The serving memory (not the builder workspace, which the build uses before serving) decides the batch:
    # a longer prompt limit grows the prefill's activations until 2.5 sequences' KV are left.
    # GPU = runtime + weights + logits (the last position's: the engine's serving graph) + a·I (activations, linear
    # in I) + 2.5 · kv_token · (I + O)
    a = m.activations / base.max_input_len
    kv_tok, out_len = probe.kv_bytes_per_token, base.max_output_len
    fixed = m.runtime + m.weights + m.logits
    max_input = int((base.gpu.memory_gib * GIB - fixed - 2.5 * kv_tok * out_len) / (a + 2.5 * kv_tok))
    small = dataclasses.replace(base, name="small-gpu", max_input_len=max_input)
    r = write_repository(RepositoryConfig(model="r1-distill-tiny", profile=small, workdir=session_workdir,
                                          onnx_variant="fp32", out=tmp_path / "repo"))
    assert r.max_batch_size == 2 and any("GPU memory plan" in n for n in r.notes)
    # an edge-based (TensorRT-RTX) profile: the generate model runs the plan, its scheduler holds the cap
    from exporter.repository import parse

    gen = parse((tmp_path / "repo" / "generate" / "config.pbtxt").read_text(), "generate")
    sched = json.loads(gen.parameters["scheduler"].string_value)
    assert sched["engine_max_batch"] == 2 and sched["max_rows"] == 2

    res = r1("--workdir", str(session_workdir), "--profiles", _profiles_file(tmp_path, builder={"workspace_gib": 23.5}),
             "repository", "--model", "r1-distill-tiny", "--profile", "small-gpu", "--out", str(tmp_path / "none"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "does not fit profile 'small-gpu'" in res.stderr and "workspace 23.5 GiB" in res.stderr
    assert not (tmp_path / "none").exists()


def test_manifests_refuse_a_model_that_fits_no_gpu_and_size_memory_from_the_weights(tmp_path, r1):
    out = tmp_path / "k8s"
    # r1deploy's own engines (one GPU each) cannot hold 70B FP16: refused with what would fit; the default runtime
    # (auto) deploys it through TensorRT-LLM instead (tests/test_trtllm.py)
    res = r1("manifests", "--model", "r1-distill-llama-70b", "--profile", "production", "--runtime", "r1deploy",
             "--out", str(out))
    assert res.returncode == 2 and "does not fit profile 'production'" in res.stderr and "production/int4" in res.stderr
    assert not out.exists()

    int4 = tmp_path / "int4.yaml"
    int4.write_text("production: {precision: int4}\n")
    res = r1("--profiles", str(int4), "manifests", "--model", "r1-distill-llama-70b", "--profile", "production",
             "--out", str(out))
    assert res.returncode == 0, res.stderr
    import yaml

    patch = yaml.safe_load((out / "overlays" / "production" / "deployment-patch.yaml").read_text())
    pod = patch["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    weights_gib = math.ceil(plan_capacity(PlanConfig(load_shape("r1-distill-llama-70b"), get_profile("production"),
                                                     Precision.INT4)).weights.total / GIB)
    assert triton["resources"]["requests"]["memory"] == f"{8 * 8 + weights_gib}Gi"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["production"]
    # the plan the overlay was sized with travels in its profile ConfigMap (mounted in the pod at /etc/r1deploy)
    cm = yaml.safe_load((out / "overlays" / "production" / "profile-configmap.yaml").read_text())
    capacity = json.loads(cm["data"]["capacity.json"])
    int4_profile = load_profiles(int4)["production"]
    expected = plan_capacity(PlanConfig(load_shape("r1-distill-llama-70b"), int4_profile))
    assert capacity["scheduler"] == scheduler_limits(expected) and capacity["scheduler"]["max_rows"] == 22
