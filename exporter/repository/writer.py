"""`write_repository`: one model + one deployment profile → a Triton model repository directory."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Union

from ..core import artifacts
from ..core.errors import BadInput
from ..core.profiles import (
    DeploymentProfile,
    Precision,
    Runtime,
    ServingVariant,
    check_profile_name,
    get_profile,
)
from . import configs
from .configs import Batching, Placement
from .tensors import TRITON_TO_NUMPY, ModelIO, engine_io, onnx_io, serving_graph_io

# Model names inside a repository. `generate` and `embed` are the entry points clients call.
GENERATE, LLM = "generate", "llm"
EMBED, TOKENIZER, ENCODER = "embed", "tokenizer", "encoder"
VERSION = "1"
ENGINE_CALLS = ("bls", "inprocess")


@dataclass
class RepositoryConfig:
    model: str = "r1-distill-tiny"
    profile: Union[DeploymentProfile, str] = "edge"
    workdir: Path = Path("build")
    out: Optional[Path] = None  # default <workdir>/<model>/model_repository/<profile>/
    variant: Optional[ServingVariant] = None  # default: the profile's serving_variant
    device: Optional[str] = None  # gpu | cpu; default gpu for tensorrt_plan / onnxruntime_onnx, cpu for python_ort
    engine_call: Optional[str] = None  # bls | inprocess (python_ort only); default inprocess for python_ort
    onnx_variant: Optional[str] = None  # default: the profile's (fp16, int4-awq-b128-qdq…), else fp32 with a note
    # generic: the graph torch exports (concatenated KV cache); fused: `export --graph fused` (GroupQueryAttention
    # over an in-place KV buffer; python_ort only — the generate model runs it in-process, kv_shared.py)
    graph: str = "generic"
    # the generate model's scheduler; defaults from the profile (see `scheduler_params`)
    max_rows: Optional[int] = None  # sequences decoded together; default the profile's max_batch_size
    kv_budget_tokens: Optional[int] = None  # KV positions running sequences may reserve; default max_rows × max_sequence_len
    max_queue: Optional[int] = None  # waiting requests before "server busy"; default 8 × max_rows
    stream_interval_steps: int = 1  # a stream's tokens leave every this many scheduler steps
    # ONNX Runtime intra-op threads of an engine the generate model runs in-process (CPU); 0: every core; None:
    # from the model's size (`intra_op_threads_for`)
    intra_op_threads: Optional[int] = None
    # KV positions of prompt prefixes the scheduler keeps for reuse (llm_scheduler.PrefixCache); 0: no reuse
    prefix_cache_tokens: int = 0
    # INT4 qdq weights run by ONNX Runtime (python_ort): activations fp32 (the weights-only model the quantize stage
    # measured and gated) or int8 (ORT's MatMulNBits default: faster, not what was measured)
    int4_activations: str = "fp32"

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if isinstance(self.profile, str):
            self.profile = get_profile(self.profile)
        self.variant = ServingVariant(self.variant or self.profile.serving_variant)
        if self.device is None:
            self.device = "cpu" if self.variant is ServingVariant.PYTHON_ORT else "gpu"
        if self.int4_activations not in ("fp32", "int8"):
            raise BadInput(f"int4 activations must be fp32 or int8, not {self.int4_activations!r}")
        if self.device not in ("gpu", "cpu"):
            raise BadInput(f"device must be gpu or cpu, not {self.device!r}")
        if self.variant is ServingVariant.TENSORRT_PLAN and self.device == "cpu":
            raise BadInput("the tensorrt_plan variant runs only on GPUs; use --variant onnxruntime_onnx or python_ort for CPU")
        if self.variant is ServingVariant.PYTHON_ORT and self.device == "gpu":
            raise BadInput("the python_ort variant runs ONNX Runtime on the CPU; use --variant onnxruntime_onnx for GPUs")
        rtx_plan = self.variant is ServingVariant.TENSORRT_PLAN and self.profile.runtime is Runtime.TENSORRT_RTX
        if self.engine_call is None:
            # a TensorRT-RTX plan loads in no Triton backend (stock Triton's TensorRT backend links full TensorRT):
            # the generate model runs it in-process (docs/engines.md, "The edge engine")
            self.engine_call = "inprocess" if self.variant is ServingVariant.PYTHON_ORT or rtx_plan else "bls"
        if self.engine_call not in ENGINE_CALLS:
            raise BadInput(f"engine_call must be bls or inprocess, not {self.engine_call!r}")
        if self.engine_call == "inprocess" and self.variant is ServingVariant.ONNXRUNTIME:
            raise BadInput("engine_call inprocess runs the ONNX file (python_ort) or the TensorRT plan (tensorrt_plan) "
                           f"in the generate model; the {self.variant.value} variant needs bls")
        if rtx_plan and self.engine_call == "bls":
            raise BadInput(f"profile {self.profile.name!r} builds TensorRT-RTX plans, which Triton's TensorRT backend "
                           "(full TensorRT) cannot load: the generate model runs them in-process (engine_call inprocess)")
        if self.graph not in ("generic", "fused"):
            raise BadInput(f"graph must be generic or fused, not {self.graph!r}")
        if self.graph == "fused" and (self.variant is not ServingVariant.PYTHON_ORT or self.engine_call != "inprocess"):
            raise BadInput("the fused graph is served in-process by the generate model: use --variant python_ort "
                           "(engine_call inprocess); TensorRT and ONNX Runtime backends take the generic graph")
        if self.onnx_variant and self.onnx_variant.endswith("-fused") and self.graph != "fused":
            raise BadInput(f"{self.onnx_variant} is a fused graph: pass --graph fused")
        for name in ("max_rows", "kv_budget_tokens", "max_queue"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1)):
                raise BadInput(f"{name} must be an integer ≥ {0 if name == 'max_queue' else 1}, not {value!r}")
        if isinstance(self.stream_interval_steps, bool) or not isinstance(self.stream_interval_steps, int) or self.stream_interval_steps < 1:
            raise BadInput(f"stream_interval_steps must be an integer ≥ 1, not {self.stream_interval_steps!r}")
        if self.intra_op_threads is not None and (isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0):
            raise BadInput(f"intra_op_threads must be an integer ≥ 0 (0: every core), not {self.intra_op_threads!r}")
        if self.onnx_variant is not None:
            artifacts.check_name(self.onnx_variant, "ONNX variant")
        check_profile_name(self.profile.name)

    @property
    def plan_in_generate(self) -> bool:
        """A decoder's TensorRT plan lies beside the generate model, which runs it (TensorRTRunner), and no `llm`
        model is written (what a Triton TensorRT backend would load)."""
        return self.variant is ServingVariant.TENSORRT_PLAN and self.engine_call == "inprocess"


@dataclass
class PlacedModel:
    name: str
    role: str  # entry | engine | tokenizer
    runs_on: str  # platform or backend
    max_batch_size: int
    config_path: Path
    files: list[str] = field(default_factory=list)  # relative to the repository root


@dataclass
class RepositoryResult:
    model: str
    kind: str  # decoder | encoder
    profile: str
    variant: ServingVariant
    device: str
    engine_call: str
    out: Path
    entry_model: str  # generate | embed
    onnx_variant: str
    io_source: str  # what the engine model's inputs/outputs were read from
    max_batch_size: int
    models: list[PlacedModel]
    missing: list[str] = field(default_factory=list)  # binaries to place before the repository can be served
    notes: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | incomplete (written, but `missing` names what it still needs to be served)

    def __post_init__(self) -> None:
        self.status = "incomplete" if self.missing else "ok"


def runtime_name(runtime: Runtime) -> str:
    """The generate model's `engine_runtime` for a profile's engine runtime (engine_runtimes.load_runner)."""
    return {Runtime.TENSORRT: "tensorrt", Runtime.TENSORRT_RTX: "tensorrt_rtx"}[Runtime(runtime)]


def default_out(workdir: Path, model: str, profile: str) -> Path:
    return Path(workdir) / artifacts.model_dir_name(model) / "model_repository" / profile


def python_model_source(name: str) -> str:
    return resources.files(__package__).joinpath("python_models", f"{name}.py").read_text()


# The modules the generate model imports, copied beside its model.py (the python backend puts the version
# directory on sys.path).
GENERATE_MODULES = ("llm_scheduler", "kv_memory", "kv_padded", "kv_shared", "engine_runtimes", "guided")


def scheduler_params(cfg: RepositoryConfig, engine_max_batch: int, capacity=None) -> dict:
    """The generate model's scheduler limits: the running batch (rows), the KV budget its sequences may reserve
    (prompt + max_tokens each, reserved at admission so that nobody is evicted), the queue before "busy". For a GPU
    decoder the capacity plan (exporter.plan: what fits one GPU after the weights) bounds rows and budget."""
    profile: DeploymentProfile = cfg.profile
    planned = {}
    if capacity is not None:
        from ..plan import scheduler_limits

        planned = scheduler_limits(capacity)
    rows = cfg.max_rows or min(profile.max_batch_size, planned.get("max_rows", profile.max_batch_size))
    budget = cfg.kv_budget_tokens or min(rows * profile.max_sequence_len,
                                         planned.get("kv_budget_tokens", rows * profile.max_sequence_len))
    if budget < profile.max_sequence_len:
        raise BadInput(f"kv_budget_tokens {budget} holds less than one sequence of {profile.max_sequence_len} tokens")
    params = {
        "max_rows": rows,
        "kv_budget_tokens": budget,
        "max_queue": cfg.max_queue if cfg.max_queue is not None else 8 * rows,
        "max_prefill_tokens": max(profile.max_input_len, 2048),
        "stream_interval_steps": cfg.stream_interval_steps,
        "engine_max_batch": engine_max_batch,
    }
    if cfg.prefix_cache_tokens:
        params["prefix_cache_tokens"] = cfg.prefix_cache_tokens
    return params


@dataclass
class _Plan:
    """Everything decided before a file is written."""

    layout: artifacts.ModelLayout
    report: dict
    kind: str
    onnx_variant: str
    onnx_files: list[Path]
    engine_files: list[Path]
    trt_profiles: int  # the engine's shape profiles (from engine.json, else as the engine stage would build them)
    io: ModelIO
    batching: Batching
    notes: list[str]
    missing: list[str]
    capacity: Optional[object] = None  # exporter.plan.CapacityPlan for a GPU decoder repository


def _plan(cfg: RepositoryConfig) -> _Plan:
    profile: DeploymentProfile = cfg.profile
    layout = artifacts.ModelLayout.for_model(cfg.workdir, cfg.model)
    fused = cfg.graph == "fused"
    report = artifacts.read_export_report(layout, "fp32-fused" if fused else "fp32")
    kind = report.get("kind", "decoder")
    notes: list[str] = []
    missing: list[str] = []
    engine_files: list[Path] = []
    engine_max_batch: Optional[int] = None
    engine_model = LLM if kind == "decoder" else ENCODER
    in_generate = cfg.plan_in_generate and kind == "decoder"  # an encoder's plan stays a Triton model
    meta = None
    if cfg.variant is ServingVariant.TENSORRT_PLAN:
        from ..engine import ENGINE_FILE, METADATA_FILE, EngineMetadata, ensure_compatible

        engine_dir = layout.engine_dir(profile.name)
        if (engine_dir / METADATA_FILE).is_file():
            meta = EngineMetadata.load(engine_dir / METADATA_FILE)
            ensure_compatible(meta, profile)
            if meta.model_kind != kind:
                raise BadInput(f"engine at {engine_dir} is a {meta.model_kind} engine but {layout.model} is a {kind}")
            if not (engine_dir / ENGINE_FILE).is_file():
                raise BadInput(f"{engine_dir / METADATA_FILE} exists but {ENGINE_FILE} does not; rebuild the engine")
            engine_files = [engine_dir / ENGINE_FILE]
            engine_max_batch = meta.max_batch_size
            from ..core.versions import engine_version_problem

            problem = engine_version_problem(meta)  # against the images' version table (data/versions.yaml)
            if problem:
                notes.append(problem)
            if meta.runtime is Runtime.TENSORRT_RTX and not in_generate:
                # Unverified here (no GPU): said so that nobody ships this repository expecting it to load.
                notes.append(
                    "model.plan is a TensorRT-RTX engine: Triton's stock TensorRT backend links full TensorRT and "
                    "cannot deserialize it — serve it with a Triton whose TensorRT backend is built against "
                    "TensorRT-RTX, or give this profile `runtime: tensorrt` (full TensorRT also targets RTX GPUs) and rebuild"
                )
        else:
            notes.append(
                f"no engine for profile {profile.name!r} at {engine_dir}: config written from the ONNX; "
                f"build it (`r1deploy build-engine --model {layout.model} --profile {profile.name}`) and rerun"
            )
            missing.append(f"{GENERATE if in_generate else engine_model}/{VERSION}/model.plan")
        if in_generate:
            notes.append(f"the generate model runs model.plan in-process ({runtime_name(profile.runtime)}, one "
                         "instance per GPU): unverified, no GPU has loaded it")
    onnx_files: list[Path] = []
    if meta is not None:
        # the engine is what runs: its own IO, built from its own ONNX variant
        onnx_variant = meta.onnx_variant
        io = engine_io(meta, f"engines/{profile.name}/engine.json")
    else:
        suffix = "-fused" if fused else ""
        wanted = cfg.onnx_variant or artifacts.profile_onnx_variant(profile) + suffix
        onnx_variant = wanted
        if not layout.onnx_path(wanted).is_file():
            if cfg.onnx_variant:
                raise BadInput(f"no {wanted} ONNX for {layout.model} at {layout.onnx_path(wanted)}")
            onnx_variant = "fp32" + suffix
            notes.insert(0,
                f"profile {profile.name!r} deploys the {wanted} ONNX, which is not built yet "
                f"(`r1deploy quantize --model {layout.model} --profile {profile.name}`); using fp32"
            )
        onnx_path = layout.onnx_path(onnx_variant)
        onnx_files = artifacts.onnx_files(onnx_path)
        if cfg.variant is ServingVariant.TENSORRT_PLAN and kind == "decoder":
            # no engine yet: the IO of the engine `build-engine` will build from this variant — its serving graph
            # (logits at the last position, the cache in the compute dtype), not the ONNX file's own IO
            kv = Precision(onnx_variant.split("-")[0]).engine_kv_dtype
            io = serving_graph_io(onnx_path, kv, f"the serving graph of onnx/{onnx_variant}/model.onnx (build-engine's)")
        else:
            io = onnx_io(onnx_path, f"onnx/{onnx_variant}/model.onnx")
    names_in = [t.name for t in io.inputs]
    names_out = [t.name for t in io.outputs]
    if names_in != report["input_names"] or names_out != report["output_names"]:
        raise BadInput(
            f"{io.source} has inputs {names_in} / outputs {names_out}, not the exported {report['input_names']} / "
            f"{report['output_names']}; rebuild it from this export"
        )
    max_batch = profile.max_batch_size
    capacity = None
    if kind == "decoder" and cfg.device == "gpu":
        # GPU memory plan (exporter.plan): refuses a repository whose model cannot run one sequence on the profile's
        # GPU; caps the batch at what fits. `scheduler_limits(capacity)` is the generate scheduler's rows / KV budget.
        from ..plan import plan_for_variant

        kv_dtype = {"TYPE_FP16": "fp16"}.get(io.input("past_key_values.0.key").data_type, "fp32")
        if fused:
            graph = "fused"
        elif cfg.variant is ServingVariant.TENSORRT_PLAN:  # the engine's graph (engine.json), else build-engine's default
            graph = meta.graph.form if meta is not None else "serving"
        else:  # ONNX Runtime runs the variant as it is
            graph = "generic"
        capacity = plan_for_variant(layout.tokenizer_dir / "config.json", profile, onnx_variant, kv_dtype, graph)
        if capacity.planned_batch < max_batch:
            notes.append(f"max_batch_size {capacity.planned_batch}: the GPU memory plan fits no more sequences of "
                         f"{profile.max_sequence_len} tokens (profile asks {max_batch}; `r1deploy plan`)")
            max_batch = capacity.planned_batch
    if engine_max_batch is not None and engine_max_batch < max_batch:
        notes.append(f"max_batch_size {engine_max_batch}: the engine's shape profiles hold no more (profile asks {max_batch})")
        max_batch = engine_max_batch
    preferred = [b for b in profile.preferred_batch_sizes if b <= max_batch]
    batching = Batching(max_batch, preferred, profile.max_queue_delay_us)
    if meta is not None:
        trt_profiles = len(meta.shape_profiles)
    else:
        from ..engine.shapes import axis_ranges

        trt_profiles = len(axis_ranges(kind, profile))
    return _Plan(layout, report, kind, onnx_variant, onnx_files, engine_files, trt_profiles, io, batching, notes, missing, capacity)


# Tokenizer files the served models load (tokenizers' Tokenizer.from_file / transformers' AutoTokenizer): without
# one of them the repository is written but cannot be served.
TOKENIZER_MODEL_FILES = ("tokenizer.json", "vocab.txt")
MODEL_DIRS = (GENERATE, LLM, EMBED, TOKENIZER, ENCODER)
_HEADER = "# Generated by `r1deploy repository"


def _written_by_r1deploy(entry: Path) -> bool:
    """A model directory this command writes: one of its names, holding a config.pbtxt with its header."""
    if entry.name not in MODEL_DIRS or not entry.is_dir() or entry.is_symlink():
        return False
    try:
        with open(entry / "config.pbtxt", encoding="utf-8") as fh:
            return fh.read(len(_HEADER)) == _HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _tokenizer_config(layout: artifacts.ModelLayout) -> dict:
    def read(name: str) -> dict:
        path = layout.tokenizer_dir / name
        if not path.is_file():
            return {}
        # present but unreadable is bad input: a generate model without its eos token would run every request
        # to max_tokens, an encoder without its pad id would pad with the wrong token
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read {path}: {' '.join(str(exc).split())[:120]}; fix the checkpoint's {name} and rerun `r1deploy export --force`") from None
        if not isinstance(data, dict):
            raise BadInput(f"{path} must hold a JSON object, not a {type(data).__name__}; fix the checkpoint's {name} and rerun `r1deploy export --force`")
        return data

    return {"generation": read("generation_config.json"), "model": read("config.json"), "tokenizer": read("tokenizer_config.json")}


def eos_token_ids(layout: artifacts.ModelLayout) -> list[int]:
    cfgs = _tokenizer_config(layout)
    eos = cfgs["generation"].get("eos_token_id", cfgs["model"].get("eos_token_id"))
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BadInput(f"eos_token_id {eos!r} in {layout.tokenizer_dir} must be a token id or a list of token ids")
    return sorted(ids)


class _Writer:
    def __init__(self, root: Path, header: list[str]):
        self.root, self.header = root, header
        self.models: list[PlacedModel] = []

    def config(self, config, role: str, comments: list[str] = ()) -> PlacedModel:
        path = self.root / config.name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / VERSION).mkdir(exist_ok=True)
        path.write_text(configs.render(config, self.header + list(comments)))
        runs_on = config.platform or config.backend
        placed = PlacedModel(config.name, role, runs_on, config.max_batch_size, path, [f"{config.name}/config.pbtxt"])
        self.models.append(placed)
        return placed

    def file(self, placed: PlacedModel, name: str, src: Optional[Path] = None, text: Optional[str] = None) -> None:
        dest = self.root / placed.name / VERSION / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            dest.write_text(text)
        else:
            shutil.copyfile(src, dest)
        placed.files.append(f"{placed.name}/{VERSION}/{name}")

    def tokenizer(self, placed: PlacedModel, tokenizer_dir: Path) -> None:
        for name in artifacts.TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                self.file(placed, f"tokenizer/{name}", tokenizer_dir / name)


def _engine_model(w: _Writer, cfg: RepositoryConfig, plan: _Plan, name: str) -> PlacedModel:
    profile: DeploymentProfile = cfg.profile
    variant = cfg.variant.value
    placement = Placement("gpu", gpus=profile.gpus_per_pod) if cfg.device == "gpu" else Placement("cpu")
    config = configs.engine_model(
        name, variant, plan.io, plan.kind, plan.batching, placement, getattr(profile.precision, "value", profile.precision),
        int(profile.builder.workspace_gib * (1 << 30)), tuple(str(i) for i in range(plan.trt_profiles)),
        cfg.int4_activations,
    )
    placed = w.config(config, "engine", [f"inputs/outputs from {plan.io.source}"])
    if variant == "tensorrt_plan":
        for f in plan.engine_files:
            w.file(placed, "model.plan", f)
    else:
        if variant == "python_ort":
            w.file(placed, "model.py", text=python_model_source("ort_model"))
        for f in plan.onnx_files:
            w.file(placed, f.name, f)
    return placed


# A decode step of a model this size on a CPU is long enough to split across cores: measured on 2 cores
# (docs/benchmarks.md, issue 10), a 122 M-parameter Qwen2 (490 MB fp32) served 2.0× the tokens/s with every core
# as with one; the 0.6 M-parameter tiny model (2.4 MB) gained nothing measurable, and its streams lost to the
# server's own threads. Between the two, where the step is a few ms, one thread leaves a core to Triton.
EVERY_CORE_FROM_BYTES = 64 << 20


def intra_op_threads_for(cfg: RepositoryConfig, onnx_files: list[Path]) -> int:
    """The intra-op threads of the in-process engine: the config's, else every core (0) for a model whose ONNX
    files hold ≥ 64 MiB, else 1."""
    if cfg.intra_op_threads is not None:
        return cfg.intra_op_threads
    return 0 if sum(f.stat().st_size for f in onnx_files) >= EVERY_CORE_FROM_BYTES else 1


def _decoder_models(w: _Writer, cfg: RepositoryConfig, plan: _Plan) -> None:
    profile: DeploymentProfile = cfg.profile
    fused = cfg.graph == "fused"
    in_generate = cfg.plan_in_generate
    if not fused and not in_generate:
        _engine_model(w, cfg, plan, LLM)
    # the fused graph takes a scalar and per-row length inputs that are no Triton batch: it is no Triton model of
    # its own, its files lie beside the generate model that runs them
    cache = plan.report["cache"]
    slots = []
    for i in range(cache["num_layers"]):
        for kv, shape in (("key", cache["key_shape"]), ("value", cache["value_shape"])):
            slots.append({"past": f"past_key_values.{i}.{kv}", "present": f"present.{i}.{kv}", "heads": shape[0], "dim": shape[1]})
    kv_type = plan.io.input(slots[0]["past"]).data_type
    if kv_type not in TRITON_TO_NUMPY:
        raise BadInput(f"KV cache type {kv_type} is not supported by the generate model")
    params = {
        "engine_model": LLM,
        "engine_call": cfg.engine_call,
        "kv_cache": {"slots": slots, "dtype": TRITON_TO_NUMPY[kv_type], "logits": "logits"},
        "eos_token_ids": eos_token_ids(plan.layout),
        "scheduler": scheduler_params(cfg, plan.batching.max_batch_size, plan.capacity),
        "max_input_len": str(profile.max_input_len),
        "max_output_len": str(profile.max_output_len),
        "max_sequence_len": str(profile.max_sequence_len),
        "default_max_tokens": str(min(64, profile.max_output_len)),
        "tokenizer": "tokenizer",
        "serving_variant": cfg.variant.value,
        "onnx_variant": plan.onnx_variant,
    }
    placement = Placement("cpu")
    if in_generate:
        # the plan beside the generate model, where the engine-build init container installs it too
        # (exporter/manifests: `node_engine --engine-model generate`); no `llm` model, nothing to call by BLS
        params.update({"engine_runtime": runtime_name(profile.runtime), "engine_file": f"{GENERATE}/{VERSION}/model.plan"})
        del params["engine_model"]
        placement = Placement("gpu", gpus=profile.gpus_per_pod)
    elif cfg.engine_call == "inprocess":
        params.update({"engine_runtime": "onnxruntime", "engine_file": f"{LLM}/{VERSION}/model.onnx",
                       "intra_op_num_threads": str(intra_op_threads_for(cfg, plan.onnx_files)),
                       "ort_int4_activations": cfg.int4_activations})
    if fused:
        params.update({"kv_layout": "shared", "engine_file": f"{GENERATE}/{VERSION}/engine/model.onnx"})
        del params["engine_model"]
    if placement.kind == "cpu" and cfg.device == "gpu" and cfg.engine_call == "bls" and not fused:
        # One scheduler loop blocks on each engine call, so a single loop keeps one GPU busy at a time: a GPU pod
        # whose engine model is reached through BLS runs one loop per GPU (each with one GPU's share of the plan:
        # the limits above are per GPU), and Triton hands each loop's calls to a free engine instance. UNVERIFIED.
        placement = Placement("cpu", cpu_instances=profile.gpus_per_pod)
    placed = w.config(configs.generate_model(GENERATE, params, placement), "entry")
    if in_generate:
        for f in plan.engine_files:
            w.file(placed, "model.plan", f)
    if fused:
        for f in plan.onnx_files:
            w.file(placed, f"engine/{f.name}", f)
    w.file(placed, "model.py", text=python_model_source("generate"))
    for module in GENERATE_MODULES:
        w.file(placed, f"{module}.py", text=python_model_source(module))
    w.tokenizer(placed, plan.layout.tokenizer_dir)


def _encoder_models(w: _Writer, cfg: RepositoryConfig, plan: _Plan) -> None:
    profile: DeploymentProfile = cfg.profile
    _engine_model(w, cfg, plan, ENCODER)
    token_inputs = list(plan.io.inputs)
    cfgs = _tokenizer_config(plan.layout)
    max_length = profile.max_input_len
    max_pos = cfgs["model"].get("max_position_embeddings")
    if isinstance(max_pos, int):
        max_length = min(max_length, max_pos)
    pad = cfgs["model"].get("pad_token_id") or 0
    tok = w.config(
        configs.tokenizer_model(TOKENIZER, token_inputs, plan.batching,
                                {"tokenizer": "tokenizer", "max_length": str(max_length), "pad_token_id": str(pad)}),
        "tokenizer",
    )
    w.file(tok, "model.py", text=python_model_source("tokenizer"))
    w.tokenizer(tok, plan.layout.tokenizer_dir)
    dims = plan.io.output("embeddings").shape
    if len(dims) != 2 or dims[1] < 1:
        raise BadInput(f"encoder output 'embeddings' has shape {list(dims)}; expected [batch, dim]")
    embed = w.config(
        configs.embed_ensemble(EMBED, TOKENIZER, ENCODER, [t.name for t in token_inputs], dims[1], plan.batching), "entry"
    )
    # An ensemble still needs a version directory; an empty file keeps it in git.
    w.file(embed, ".gitkeep", text="")


def write_repository(cfg: RepositoryConfig) -> RepositoryResult:
    """Write the repository for `cfg.model` under `cfg.profile`, replacing `cfg.out` as a whole (atomically)."""
    profile: DeploymentProfile = cfg.profile
    plan = _plan(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg.workdir, cfg.model, profile.name)
    header = [
        f"Generated by `r1deploy repository --model {plan.layout.model} --profile {profile.name} "
        f"--variant {cfg.variant.value}`; regenerate rather than edit."
    ]
    if not plan.layout.tokenizer_dir.is_dir():
        raise BadInput(f"no tokenizer for {plan.layout.model} at {plan.layout.tokenizer_dir}; rerun `r1deploy export`")
    if not any((plan.layout.tokenizer_dir / f).is_file() for f in TOKENIZER_MODEL_FILES):
        raise BadInput(
            f"the checkpoint of {plan.layout.model} has no tokenizer ({' or '.join(TOKENIZER_MODEL_FILES)}): the "
            f"repository's {'generate' if plan.kind == 'decoder' else 'tokenizer'} model could not load; add the "
            "tokenizer files to the checkpoint and rerun `r1deploy export --force`"
        )
    artifacts.check_replaceable(out, _written_by_r1deploy)
    with artifacts.atomic_dir(out) as tmp:
        w = _Writer(tmp, header)
        if plan.kind == "decoder":
            _decoder_models(w, cfg, plan)
        elif plan.kind == "encoder":
            _encoder_models(w, cfg, plan)
        else:
            raise BadInput(f"unknown model kind {plan.kind!r}")
        for placed in w.models:
            # every written config must parse back: catch a broken message before a server does
            configs.parse(placed.config_path.read_text(), str(placed.config_path))
            placed.config_path = out / placed.config_path.relative_to(tmp)
    return RepositoryResult(
        model=plan.layout.model, kind=plan.kind, profile=profile.name, variant=cfg.variant, device=cfg.device,
        engine_call=cfg.engine_call, out=out, entry_model=GENERATE if plan.kind == "decoder" else EMBED,
        onnx_variant=plan.onnx_variant, io_source=plan.io.source, max_batch_size=plan.batching.max_batch_size,
        models=sorted(w.models, key=lambda m: m.name), missing=plan.missing, notes=plan.notes,
    )
