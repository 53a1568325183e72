"""Engine stage: quantized ONNX → TensorRT / TensorRT-RTX engine (`model.plan`) + `engine.json`.

    cfg = EngineConfig(model="r1-distill-tiny", profile=get_profile("edge"), workdir=Path("build"))
    plan = plan_build(cfg)         # everything decided, nothing imported: paths, shape profiles, options
    result = build_engine(cfg)     # parse → builder config → build → engine dir (atomic) + timing cache

The network is strongly typed: precision is what the quantize stage wrote into the ONNX variant the deployment
profile names (`artifacts.profile_onnx_variant`), never a builder flag. A decoder's graph is first rewritten for
serving (`serving_graph`: logits for the last position only, the KV cache IO in the compute dtype); TensorRT parses
the rewritten bytes, its external weights read from the variant's own directory. Output goes to
`<workdir>/<model>/engines/<deployment profile>/` (model.plan, engine.json, manifest.json); an unchanged rebuild
is skipped, `force=True` rebuilds (reusing the timing cache where the runtime has one).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import artifacts
from ..core.errors import BadInput, BrokenDependency, MissingDependency, StageFailed
from ..core.profiles import DeploymentProfile, Precision, Runtime, sm_name
from ..core.stage import StageOutput
from ..core.typed import to_data
from ..core.ui import status
from .metadata import (
    ENGINE_FILE,
    ENGINE_GRAPHS,
    METADATA_FILE,
    EngineGraph,
    EngineMetadata,
    TensorInfo,
    TimingCacheInfo,
)
from .runtimes import AMPERE_PLUS, TensorRTRuntime, load_runtime
from .shapes import ShapeProfile, onnx_input_dims, shape_profiles
from .trtexec import reproduce_command

STAGE = "engine"
GIB = 1 << 30


@dataclass
class EngineConfig:
    """Every engine build option in one place. `None` = take it from the deployment profile; after
    construction every field holds the value the build uses."""

    model: str
    profile: DeploymentProfile
    workdir: Path = Path("build")
    runtime: Runtime | None = None  # default: profile.runtime
    precision: Precision | None = None  # default: profile.precision → which ONNX variant is built
    optimization_level: int | None = None  # builder optimization level 0..5; default profile.builder
    workspace_gib: float | None = None  # workspace memory-pool limit; default profile.builder
    hardware_compatible: bool | None = None  # default profile.builder.hardware_compatible
    # serving: a decoder's graph rewritten for serving (logits at the last position, KV cache IO in the compute
    # dtype; exporter/engine/serving_graph.py); generic: the ONNX variant as it is. Default: serving for decoders.
    graph: str | None = None
    timing_cache: bool = True  # load/save <model>/timing-cache/<runtime>-<version>-<SMxx>.cache where supported
    force: bool = False
    verbose: bool = False  # show the runtime's own warnings

    def __post_init__(self) -> None:
        b = self.profile.builder
        self.workdir = Path(self.workdir)
        self.runtime = Runtime(self.runtime if self.runtime is not None else self.profile.runtime)
        self.precision = Precision(self.precision if self.precision is not None else self.profile.precision)
        self.optimization_level = b.optimization_level if self.optimization_level is None else self.optimization_level
        self.workspace_gib = b.workspace_gib if self.workspace_gib is None else self.workspace_gib
        self.hardware_compatible = b.hardware_compatible if self.hardware_compatible is None else self.hardware_compatible
        if not 0 <= self.optimization_level <= 5:
            raise BadInput(f"builder optimization level must be 0..5, got {self.optimization_level}")
        if not (math.isfinite(self.workspace_gib) and self.workspace_gib > 0):  # nan passes `<= 0`
            raise BadInput(f"--workspace-gib must be a number > 0, got {self.workspace_gib}")
        if self.graph is not None and self.graph not in ENGINE_GRAPHS:
            raise BadInput(f"engine graph {self.graph!r} is not one of {', '.join(ENGINE_GRAPHS)}")


@dataclass(frozen=True)
class BuildPlan:
    """What a build will do, decided from the config and the files on disk, without importing TensorRT."""

    model: str
    kind: str  # decoder | encoder
    deployment_profile: str
    runtime: Runtime
    precision: str
    onnx_variant: str
    onnx_path: Path
    onnx_files: list[Path]
    engine_dir: Path
    timing_cache_dir: Path
    gpu_product: str
    compute_capability: str  # the deployment profile's GPU
    shape_profiles: list[ShapeProfile]
    onnx_input_dtypes: dict[str, str]
    graph: EngineGraph  # what TensorRT is given: the serving rewrite or the generic graph (form, logits, KV dtype)
    workspace_bytes: int
    optimization_level: int
    hardware_compatible: bool
    use_timing_cache: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def engine_path(self) -> Path:
        return self.engine_dir / ENGINE_FILE

    def timing_cache_path(self, runtime_version: str, compute_capabilities: list[str]) -> Path:
        gpus = "-".join(sm_name(cc) for cc in compute_capabilities)
        return self.timing_cache_dir / f"{self.runtime.value}-{runtime_version}-{gpus}.cache"

    def fingerprint_config(self, compute_capabilities: list[str]) -> dict:
        return {
            "runtime": self.runtime.value,
            "precision": self.precision,
            "onnx_variant": self.onnx_variant,
            "graph": {"form": self.graph.form, "kv_dtype": self.graph.kv_dtype, "version": self.graph.version},
            "strongly_typed": True,
            "compute_capabilities": compute_capabilities,
            "hardware_compatible": self.hardware_compatible,
            "shape_profiles": to_data(self.shape_profiles),
            "workspace_bytes": self.workspace_bytes,
            "optimization_level": self.optimization_level,
        }


@dataclass
class UpstreamStage:
    """A stage the engine was built from, when `build-engine` ran it first (exporter.engine.prepare)."""

    stage: str  # "export" | "quantize <variant>"
    skipped: bool  # True: up to date, nothing rewritten (a cache hit)
    path: Path
    seconds: float


@dataclass
class EngineResult:
    model: str
    deployment_profile: str
    runtime: Runtime
    runtime_version: str
    engine_path: Path
    metadata_path: Path
    skipped: bool
    seconds: float  # whole stage, this run
    build_seconds: float  # parse + build of the engine on disk (from engine.json when skipped)
    engine_bytes: int
    precision: str
    onnx_variant: str
    compute_capabilities: list[str]
    shape_profiles: list[str]
    max_batch_size: int
    timing_cache: TimingCacheInfo
    command: list[str]
    graph: EngineGraph = field(default_factory=EngineGraph)  # what TensorRT was given (engine.json's `graph`)
    graph_command: list[str] = field(default_factory=list)  # the step before `command` (a serving graph)
    warnings: list[str] = field(default_factory=list)
    upstream: list[UpstreamStage] = field(default_factory=list)  # export / quantize run first (--prepare)


def _max_position_embeddings(layout: artifacts.ModelLayout) -> int | None:
    try:
        return int(json.loads((layout.tokenizer_dir / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_KV_TYPES = {"float16": "fp16", "float": "fp32"}


def _engine_graph(cfg: EngineConfig, kind: str, onnx_dtypes: dict[str, str]) -> EngineGraph:
    """What TensorRT will be given, decided without rewriting anything (the rewrite runs in `build_engine`)."""
    from .serving_graph import SERVING_GRAPH_VERSION

    if kind != "decoder":
        if cfg.graph == "serving":
            raise BadInput(f"--engine-graph serving rewrites a decoder's logits and KV cache; {cfg.model} is an {kind}")
        return EngineGraph("generic", "", "")
    if (cfg.graph or "serving") == "serving":
        return EngineGraph("serving", "last", Precision(cfg.precision).engine_kv_dtype, "", SERVING_GRAPH_VERSION)
    past = next((t for n, t in onnx_dtypes.items() if n.startswith("past_key_values.")), "")
    return EngineGraph("generic", "all", _KV_TYPES.get(past, past))


def plan_build(cfg: EngineConfig) -> BuildPlan:
    """Resolve inputs, shape profiles and options; BadInput when an input is missing or unusable."""
    profile = cfg.profile
    layout = artifacts.ModelLayout.for_model(cfg.workdir, cfg.model)
    report = artifacts.read_export_report(layout)
    q = profile.quantization
    if cfg.precision is Precision.INT4 and q.format != "qdq":
        raise BadInput(
            f"deployment profile {profile.name!r} quantizes to format {q.format!r}; TensorRT parses only the standard "
            f"QDQ form (quantization.format: qdq)"
        )
    variant = artifacts.onnx_variant(cfg.precision, q.method, q.block_size, q.format)
    onnx_path = layout.onnx_path(variant)
    if not onnx_path.is_file():
        hint = (
            f"run `r1deploy export --model {cfg.model}` first" if variant == "fp32"
            else f"run `r1deploy quantize --model {cfg.model} --profile {profile.name}` first"
        )
        raise BadInput(f"no {variant} ONNX for {layout.model} at {onnx_path}; {hint}")
    dims, dtypes = onnx_input_dims(onnx_path)
    kind = report.get("kind", "decoder")
    graph = _engine_graph(cfg, kind, dtypes)
    max_pos = _max_position_embeddings(layout)
    warnings = []
    if kind == "decoder" and max_pos and profile.max_sequence_len > max_pos:
        warnings.append(
            f"profile {profile.name!r} allows {profile.max_sequence_len} positions but {layout.model} was trained for "
            f"{max_pos} (max_position_embeddings); the engine accepts the longer shapes"
        )
    if kind == "encoder" and max_pos and profile.max_input_len > max_pos:
        warnings.append(f"sequence capped at max_position_embeddings={max_pos} (profile max_input_len {profile.max_input_len})")
    return BuildPlan(
        model=layout.model,
        kind=kind,
        deployment_profile=profile.name,
        runtime=cfg.runtime,
        precision=cfg.precision.value,
        onnx_variant=variant,
        onnx_path=onnx_path,
        onnx_files=artifacts.onnx_files(onnx_path),
        engine_dir=layout.engine_dir(profile.name),
        timing_cache_dir=layout.timing_cache_dir,
        gpu_product=profile.gpu.product,
        compute_capability=profile.gpu.compute_capability,
        shape_profiles=shape_profiles(kind, dims, profile, max_pos),
        onnx_input_dtypes=dtypes,
        graph=graph,
        workspace_bytes=int(cfg.workspace_gib * GIB),
        optimization_level=cfg.optimization_level,
        hardware_compatible=cfg.hardware_compatible,
        use_timing_cache=cfg.timing_cache,
        warnings=warnings,
    )


def graph_command(plan: BuildPlan) -> list[str]:
    """The step before `trtexec_command` for a serving graph: write it beside the ONNX variant, where its external
    weights resolve (neither trtexec nor tensorrt_rtx can rewrite a graph); [] for the generic graph."""
    if plan.graph.form != "serving":
        return []
    from .serving_graph import reproduce_command as serving_command

    return serving_command(plan.onnx_path, plan.graph.kv_dtype)


def trtexec_command(plan: BuildPlan, rt: TensorRTRuntime | None = None) -> list[str]:
    """The equivalent trtexec / tensorrt_rtx command line (works without the runtime installed). For a serving
    graph it reads the file `graph_command` writes."""
    if rt is None:
        try:
            rt = load_runtime(plan.runtime)
        except (MissingDependency, BrokenDependency):  # the line is still useful without a loadable runtime
            rt = None
    if rt is not None:
        targets, version = rt.target_compute_capabilities(plan.compute_capability, plan.hardware_compatible), rt.version
    else:
        targets, version = [plan.compute_capability], "unknown"
    # Only full TensorRT keeps a timing cache (TensorRT-RTX's calls are no-ops).
    use_cache = plan.use_timing_cache and plan.runtime is Runtime.TENSORRT
    cache = plan.timing_cache_path(version, targets) if use_cache else None
    onnx_path = plan.onnx_path
    if plan.graph.form == "serving":
        from .serving_graph import serving_path

        onnx_path = serving_path(plan.onnx_path)
    return reproduce_command(
        runtime=plan.runtime, onnx_path=onnx_path, engine_path=plan.engine_path,
        shape_profiles=plan.shape_profiles, workspace_bytes=plan.workspace_bytes,
        optimization_level=plan.optimization_level, compute_capabilities=targets,
        hardware_compatible=plan.hardware_compatible, timing_cache_path=cache,
    )


def _result_from_metadata(meta: EngineMetadata, plan: BuildPlan, skipped: bool, started: float) -> EngineResult:
    return EngineResult(
        model=meta.model, deployment_profile=meta.deployment_profile, runtime=meta.runtime,
        runtime_version=meta.runtime_version, engine_path=plan.engine_path,
        metadata_path=plan.engine_dir / METADATA_FILE, skipped=skipped, seconds=time.perf_counter() - started,
        build_seconds=meta.build_seconds, engine_bytes=meta.engine_bytes, precision=meta.precision,
        onnx_variant=meta.onnx_variant, compute_capabilities=meta.compute_capabilities,
        shape_profiles=[p.name for p in meta.shape_profiles], max_batch_size=meta.max_batch_size,
        timing_cache=meta.timing_cache, command=meta.reproduce, graph=meta.graph,
        graph_command=meta.reproduce_graph, warnings=meta.warnings,
    )


def _tensor_infos(rt: TensorRTRuntime, network, outputs: bool) -> list[TensorInfo]:
    n = network.num_outputs if outputs else network.num_inputs
    get = network.get_output if outputs else network.get_input
    return [TensorInfo(t.name, rt.dtype_name(t.dtype), [int(d) for d in t.shape]) for t in (get(i) for i in range(n))]


def build_engine(cfg: EngineConfig, rt: TensorRTRuntime | None = None) -> EngineResult:
    """Build (or skip, when up to date) the engine for `cfg.model` on `cfg.profile`."""
    started = time.perf_counter()
    rt = rt or load_runtime(cfg.runtime)
    plan = plan_build(cfg)
    targets = rt.target_compute_capabilities(plan.compute_capability, plan.hardware_compatible)
    gpu_warning = None if plan.hardware_compatible else rt.check_build_gpu(plan.compute_capability)
    if gpu_warning:
        plan.warnings.append(gpu_warning)
    onnx_root = plan.onnx_path.parent
    inputs = artifacts.sha256_files(plan.onnx_files, root=onnx_root)
    output = StageOutput(STAGE, plan.engine_dir, inputs, plan.fingerprint_config(targets),
                         {**artifacts.tool_versions("r1deploy"), rt.spec.modules[0]: rt.version})
    if output.up_to_date(cfg.force):
        meta = EngineMetadata.load(plan.engine_dir / METADATA_FILE)
        return _result_from_metadata(meta, plan, skipped=True, started=started)

    logger = rt.logger(verbose=cfg.verbose)
    t0 = time.perf_counter()
    with status(f"building {rt.spec.display} engine for {plan.model} ({plan.onnx_variant}, profile {plan.deployment_profile})"):
        graph, served = plan.graph, None
        if graph.form == "serving":
            import onnx

            from .serving_graph import engine_graph

            served, graph = engine_graph(onnx.load(str(plan.onnx_path), load_external_data=False), graph.kv_dtype)
            served = served.SerializeToString()
        builder, network, _parser = rt.parse_onnx(plan.onnx_path, logger, served)
        del served
        config = builder.create_builder_config()
        config.set_memory_pool_limit(rt.trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        config.builder_optimization_level = plan.optimization_level
        hw_label = rt.configure_targets(config, targets, plan.hardware_compatible)

        cache_path: Path | None = None
        loaded = 0
        if not plan.use_timing_cache:
            cache_info_note = "disabled (--no-timing-cache)"
            supported = False
        elif rt.timing_cache_supported(config):
            cache_path = plan.timing_cache_path(rt.version, targets)
            loaded = rt.load_timing_cache(config, cache_path)
            supported, cache_info_note = True, ""
        else:
            supported = False
            cache_info_note = f"{rt.spec.display} {rt.version}: timing-cache calls are no-ops; no cache file is kept"

        network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for sp in plan.shape_profiles:
            missing = network_inputs - set(sp.inputs)
            if missing:
                raise StageFailed(f"shape profile {sp.name!r} does not cover network input(s) {', '.join(sorted(missing))}")
            op = builder.create_optimization_profile()
            for name, r in sp.inputs.items():
                op.set_shape(name, r.min, r.opt, r.max)
            if config.add_optimization_profile(op) < 0:
                detail = logger.errors[-1] if logger.errors else "invalid dimensions"
                raise StageFailed(f"shape profile {sp.name!r} rejected by {rt.spec.display}: {detail}")

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = logger.errors[-1] if logger.errors else "no error message"
            raise StageFailed(f"{rt.spec.display} engine build for {plan.model} failed: {detail}")
        saved = rt.save_timing_cache(config, cache_path) if cache_path is not None else 0
    build_seconds = time.perf_counter() - t0

    command = trtexec_command(plan, rt)
    with output.writing() as tmp:
        engine_file = tmp / ENGINE_FILE
        with open(engine_file, "wb") as fh:
            fh.write(memoryview(serialized))
        del serialized
        meta = EngineMetadata(
            model=plan.model,
            model_kind=plan.kind,
            deployment_profile=plan.deployment_profile,
            runtime=plan.runtime,
            runtime_version=rt.version,
            gpu_product=plan.gpu_product,
            compute_capabilities=targets,
            hardware_compatible=plan.hardware_compatible,
            hardware_compatibility=hw_label if hw_label == AMPERE_PLUS else "none",
            precision=plan.precision,
            onnx_variant=plan.onnx_variant,
            onnx_sha256=inputs[plan.onnx_path.name],
            engine_file=ENGINE_FILE,
            engine_sha256=artifacts.sha256_file(engine_file),
            engine_bytes=engine_file.stat().st_size,
            strongly_typed=True,
            max_batch_size=max(sp.max_batch_size for sp in plan.shape_profiles),
            shape_profiles=plan.shape_profiles,
            inputs=_tensor_infos(rt, network, outputs=False),
            outputs=_tensor_infos(rt, network, outputs=True),
            optimization_level=plan.optimization_level,
            workspace_bytes=plan.workspace_bytes,
            timing_cache=TimingCacheInfo(
                supported=supported, path=str(cache_path or ""), loaded_bytes=loaded, saved_bytes=saved,
                note=cache_info_note,
            ),
            build_seconds=round(build_seconds, 3),
            reproduce=command,
            graph=graph,
            reproduce_graph=graph_command(plan),
            warnings=plan.warnings,
        )
        meta.save(tmp / METADATA_FILE)
    return _result_from_metadata(meta, plan, skipped=False, started=started)
