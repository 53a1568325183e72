"""`write_repository`: one model + one deployment profile → a Triton model repository directory."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Union

from .. import artifacts
from ..errors import BadInput
from ..profiles import DeploymentProfile, Runtime, ServingVariant, get_profile
from ..sources import model_dir_name
from . import configs
from .configs import Batching, Placement
from .tensors import TRITON_TO_NUMPY, ModelIO, engine_io, onnx_io

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

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if isinstance(self.profile, str):
            self.profile = get_profile(self.profile)
        self.variant = ServingVariant(self.variant or self.profile.serving_variant)
        if self.device is None:
            self.device = "cpu" if self.variant is ServingVariant.PYTHON_ORT else "gpu"
        if self.device not in ("gpu", "cpu"):
            raise BadInput(f"device must be gpu or cpu, not {self.device!r}")
        if self.variant is ServingVariant.TENSORRT_PLAN and self.device == "cpu":
            raise BadInput("the tensorrt_plan variant runs only on GPUs; use --variant onnxruntime_onnx or python_ort for CPU")
        if self.variant is ServingVariant.PYTHON_ORT and self.device == "gpu":
            raise BadInput("the python_ort variant runs ONNX Runtime on the CPU; use --variant onnxruntime_onnx for GPUs")
        if self.engine_call is None:
            self.engine_call = "inprocess" if self.variant is ServingVariant.PYTHON_ORT else "bls"
        if self.engine_call not in ENGINE_CALLS:
            raise BadInput(f"engine_call must be bls or inprocess, not {self.engine_call!r}")
        if self.engine_call == "inprocess" and self.variant is not ServingVariant.PYTHON_ORT:
            raise BadInput(f"engine_call inprocess runs the ONNX file in the generate model; the {self.variant.value} variant needs bls")


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


def default_out(workdir: Path, model: str, profile: str) -> Path:
    return Path(workdir) / model_dir_name(model) / "model_repository" / profile


def python_model_source(name: str) -> str:
    return resources.files(__package__).joinpath("python_models", f"{name}.py").read_text()


@dataclass
class _Plan:
    """Everything decided before a file is written."""

    layout: artifacts.ModelLayout
    report: dict
    kind: str
    onnx_variant: str
    onnx_files: list[Path]
    engine_files: list[Path]
    io: ModelIO
    batching: Batching
    notes: list[str]
    missing: list[str]
    capacity: Optional[object] = None  # exporter.plan.CapacityPlan for a GPU decoder repository


def _plan(cfg: RepositoryConfig) -> _Plan:
    profile: DeploymentProfile = cfg.profile
    layout = artifacts.ModelLayout(cfg.workdir, model_dir_name(cfg.model))
    report = artifacts.read_export_report(layout)
    kind = report.get("kind", "decoder")
    notes: list[str] = []
    missing: list[str] = []
    engine_files: list[Path] = []
    engine_max_batch: Optional[int] = None
    engine_model = LLM if kind == "decoder" else ENCODER
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
            from ..versions import engine_version_problem

            problem = engine_version_problem(meta)  # against the images' version table (data/versions.yaml)
            if problem:
                notes.append(problem)
            if meta.runtime is Runtime.TENSORRT_RTX:
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
            missing.append(f"{engine_model}/{VERSION}/model.plan")
    onnx_files: list[Path] = []
    if meta is not None:
        # the engine is what runs: its own IO, built from its own ONNX variant
        onnx_variant = meta.onnx_variant
        io = engine_io(meta, f"engines/{profile.name}/engine.json")
    else:
        wanted = cfg.onnx_variant or artifacts.profile_onnx_variant(profile)
        onnx_variant = wanted
        if not layout.onnx_path(wanted).is_file():
            if cfg.onnx_variant:
                raise BadInput(f"no {wanted} ONNX for {layout.model} at {layout.onnx_path(wanted)}")
            onnx_variant = "fp32"
            notes.insert(0,
                f"profile {profile.name!r} deploys the {wanted} ONNX, which is not built yet "
                f"(`r1deploy quantize --model {layout.model} --profile {profile.name}`); using fp32"
            )
        onnx_path = layout.onnx_path(onnx_variant)
        onnx_files = sorted(p for p in onnx_path.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
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
        capacity = plan_for_variant(layout.tokenizer_dir / "config.json", profile, onnx_variant, kv_dtype)
        if capacity.planned_batch < max_batch:
            notes.append(f"max_batch_size {capacity.planned_batch}: the GPU memory plan fits no more sequences of "
                         f"{profile.max_sequence_len} tokens (profile asks {max_batch}; `r1deploy plan`)")
            max_batch = capacity.planned_batch
    if engine_max_batch is not None and engine_max_batch < max_batch:
        notes.append(f"max_batch_size {engine_max_batch}: the engine's shape profiles hold no more (profile asks {max_batch})")
        max_batch = engine_max_batch
    preferred = [b for b in profile.preferred_batch_sizes if b <= max_batch]
    batching = Batching(max_batch, preferred, profile.max_queue_delay_us)
    return _Plan(layout, report, kind, onnx_variant, onnx_files, engine_files, io, batching, notes, missing, capacity)


def _tokenizer_config(layout: artifacts.ModelLayout) -> dict:
    def read(name: str) -> dict:
        try:
            return json.loads((layout.tokenizer_dir / name).read_text())
        except (OSError, ValueError):
            return {}

    return {"generation": read("generation_config.json"), "model": read("config.json"), "tokenizer": read("tokenizer_config.json")}


def _eos_ids(layout: artifacts.ModelLayout) -> list[int]:
    cfgs = _tokenizer_config(layout)
    eos = cfgs["generation"].get("eos_token_id", cfgs["model"].get("eos_token_id"))
    if eos is None:
        return []
    return sorted(eos) if isinstance(eos, list) else [int(eos)]


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
        int(profile.builder.workspace_gib * (1 << 30)),
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


def _decoder_models(w: _Writer, cfg: RepositoryConfig, plan: _Plan) -> None:
    profile: DeploymentProfile = cfg.profile
    _engine_model(w, cfg, plan, LLM)
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
        "eos_token_ids": _eos_ids(plan.layout),
        "max_input_len": str(profile.max_input_len),
        "max_output_len": str(profile.max_output_len),
        "max_sequence_len": str(profile.max_sequence_len),
        "default_max_tokens": str(min(64, profile.max_output_len)),
        "tokenizer": "tokenizer",
        "serving_variant": cfg.variant.value,
        "onnx_variant": plan.onnx_variant,
    }
    if cfg.engine_call == "inprocess":
        params.update({"engine_onnx": f"{LLM}/{VERSION}/model.onnx", "intra_op_num_threads": "1"})
    placed = w.config(configs.generate_model(GENERATE, params), "entry")
    w.file(placed, "model.py", text=python_model_source("generate"))
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
