"""TensorRT-LLM through Triton's tensorrtllm_backend: what serves a model the plan says needs more than one GPU
on the production and research profiles (tensor parallelism over the pod's GPUs, in-flight batching, paged KV).

**Unverified: no part of this has run.** No GPU, no TensorRT-LLM and no TensorRT-LLM Triton image exist where
r1deploy is developed. What is checked here (tests/test_trtllm.py) is the shape of what r1deploy writes against
the backend's and the builder's published sources: every parameter the backend's templates mark mandatory is set,
each config.pbtxt parses as a Triton ModelConfig, the trtllm-build command parses against trtllm-build's argument
list, the pod renders and passes the manifest checks.

r1deploy writes (`r1deploy repository --runtime tensorrt-llm`):

    preprocessing/config.pbtxt        the backend's models, in its documented all_models/inflight_batcher_llm
    tensorrt_llm/config.pbtxt         layout, every config built as a ModelConfig protobuf from the catalogue
    postprocessing/config.pbtxt       data/tensorrtllm/backend_templates.json (extracted from the backend's
    ensemble/config.pbtxt             templates at a pinned commit, SOURCE.md), never by filling `${…}` text
    tensorrt_llm_bls/config.pbtxt     the decoupled text_input → text_output entry the gateway serves
    tensorrt_llm_bls/1/tokenizer/     the tokenizer the gateway reads (when the model's export has one)
    tensorrt_llm/1/build_engine.sh    checkpoint conversion + trtllm-build + the backend's model.py files, run
    tensorrt_llm/1/build.json         on the node by the pod's engine-build init container

The backend's python models (preprocessing, postprocessing, tensorrt_llm_bls model.py) are not copied into
r1deploy: build_engine.sh copies them from the TensorRT-LLM Triton image (`/app/all_models/inflight_batcher_llm`,
where the image's Dockerfile puts them — unverified on a real image)."""

from __future__ import annotations

import enum
import json
import shlex
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from .core.errors import BadInput
from .core.profiles import DeploymentProfile, Precision, Runtime

UNVERIFIED = "unverified: written from the backend's and trtllm-build's published sources; never run on a GPU"
MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
ENTRY = "tensorrt_llm_bls"  # decoupled, text_input/text_output: what the gateway serves (ensemble is not decoupled)
MODELS_MOUNT = "/models"  # where the pods mount r1deploy's workdir (exporter.manifests.objects.MODELS_MOUNT)
ALL_MODELS_IN_IMAGE = "/app/all_models/inflight_batcher_llm"
EXAMPLES_IN_IMAGE = "/app/tensorrt_llm/examples"
# Hugging Face architectures → TensorRT-LLM's example directory that converts them.
CONVERTERS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen"}


class ServingRuntime(str, enum.Enum):
    """What serves a decoder: r1deploy's own generate model, TensorRT-LLM's backend, or the plan decides
    (TensorRT-LLM where the model needs more than one GPU and the profile's runtime is TensorRT)."""

    AUTO = "auto"
    R1DEPLOY = "r1deploy"
    TENSORRT_LLM = "tensorrt-llm"


def _data(name: str) -> dict:
    return json.loads(resources.files("exporter").joinpath(f"data/tensorrtllm/{name}").read_text())


@cache
def templates() -> dict:
    return _data("backend_templates.json")


@cache
def build_arguments() -> dict:
    return _data("trtllm_build_args.json")


@cache
def image() -> dict:
    raw = yaml.safe_load(resources.files("exporter").joinpath("data/versions.yaml").read_text())
    return raw["tensorrtllm"]


@dataclass(frozen=True)
class TrtllmPlan:
    """The engine TensorRT-LLM builds for one (model, profile): one model per pod, tensor parallel over its GPUs."""

    model: str
    profile: str
    architecture: str
    precision: str  # fp16 | int4 (INT4 AWQ weight-only)
    tp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    awq_block_size: int
    plan_gpus: int  # what `r1deploy plan` says an even split needs
    max_queue_delay_us: int
    max_queue_size: int


def uses_trtllm(runtime: ServingRuntime | str, profile: DeploymentProfile, plan_gpus: int) -> bool:
    runtime = ServingRuntime(runtime)
    if runtime is ServingRuntime.TENSORRT_LLM:
        return True
    return runtime is ServingRuntime.AUTO and plan_gpus > 1 and profile.runtime is Runtime.TENSORRT


def chosen_for(runtime: ServingRuntime | str, model: str, profile: DeploymentProfile, workdir: Path):
    """The model's shape when `runtime` on `profile` means TensorRT-LLM's repository — `tensorrt-llm`, or `auto` on a
    TensorRT profile where the capacity plan needs more than one GPU — else None (r1deploy's generate repository).
    `auto` on a model whose shape cannot be read is r1deploy's (its repository stage says what is wrong)."""
    from .plan import PlanConfig, load_shape, plan_capacity

    runtime = ServingRuntime(runtime)
    if runtime is ServingRuntime.R1DEPLOY or (runtime is ServingRuntime.AUTO and profile.runtime is not Runtime.TENSORRT):
        return None
    try:
        shape = load_shape(model, workdir)
    except BadInput:
        if runtime is ServingRuntime.TENSORRT_LLM:
            raise
        return None
    return shape if uses_trtllm(runtime, profile, plan_capacity(PlanConfig(shape, profile)).gpus_per_replica) else None


def write_for_model(shape, model: str, profile: DeploymentProfile, workdir: Path,
                    out: Optional[Path] = None) -> TrtllmRepositoryResult:
    """`write_trtllm_repository` for a model of the workdir: its default repository directory, and its tokenizer and
    end tokens when it has been exported (the gateway's limits), none otherwise."""
    from .core.artifacts import ModelLayout
    from .repository import default_out, eos_token_ids

    layout = ModelLayout.for_model(workdir, model)
    exported = layout.tokenizer_dir.is_dir()
    return write_trtllm_repository(shape, profile, out or default_out(workdir, model, profile.name), layout.model,
                                   tokenizer_dir=layout.tokenizer_dir if exported else None,
                                   eos_token_ids=eos_token_ids(layout) if exported else [])


def plan_trtllm(shape, profile: DeploymentProfile, precision: Optional[Precision] = None) -> TrtllmPlan:
    """BadInput when the profile cannot run it: not a TensorRT profile, an architecture TensorRT-LLM's converters
    here do not cover, more GPUs needed than the pod has, heads that do not split evenly."""
    from .plan import PlanConfig, plan_capacity

    precision = Precision(precision or profile.precision)
    if profile.runtime is not Runtime.TENSORRT:
        raise BadInput(f"profile {profile.name!r} runs {profile.runtime.value}; TensorRT-LLM serves TensorRT profiles "
                       f"(production, research)")
    if precision is Precision.FP32:
        raise BadInput("TensorRT-LLM serves fp16 or int4 (AWQ) here, not fp32")
    if shape.architecture not in CONVERTERS:
        raise BadInput(f"{shape.name}: architecture {shape.architecture} has no TensorRT-LLM converter here "
                       f"(supported: {', '.join(sorted(CONVERTERS))})")
    # TensorRT-LLM keeps the KV cache in the model's dtype (FP16), not the FP32 cache of r1deploy's ONNX graphs
    plan = plan_capacity(PlanConfig(shape, profile, precision, kv_dtype="fp16"))
    # One model per pod over all its GPUs: the pod shape the profiles were sized for (8× NVLink, 2× PCIe), the
    # lowest per-token latency (the ITL target) and the most KV memory for the in-flight batcher.
    tp = profile.gpus_per_pod
    if plan.gpus_per_replica > tp:
        raise BadInput(f"{shape.name} ({precision.value}) needs {plan.gpus_per_replica} GPUs of profile "
                       f"{profile.name!r}; its pods have {tp}")
    if shape.num_heads % tp or (shape.num_kv_heads % tp and tp % shape.num_kv_heads):
        raise BadInput(f"{shape.name}: {shape.num_heads} attention / {shape.num_kv_heads} KV heads do not split over "
                       f"tensor parallelism {tp}")
    return TrtllmPlan(
        model=shape.name, profile=profile.name, architecture=shape.architecture, precision=precision.value,
        tp_size=tp, max_batch_size=profile.max_batch_size, max_input_len=profile.max_input_len,
        max_seq_len=profile.max_sequence_len,
        # without chunked context a whole prompt is one step's tokens: at least the longest input
        max_num_tokens=max(8192, profile.max_input_len), awq_block_size=profile.quantization.block_size,
        plan_gpus=plan.gpus_per_replica, max_queue_delay_us=profile.max_queue_delay_us,
        max_queue_size=8 * profile.max_batch_size,
    )


@dataclass(frozen=True)
class NodePaths:
    """Where things are on the pod (the claim mounted at /models holds r1deploy's workdir)."""

    model_dir: str  # the model's directory name in the workdir
    profile: str

    @property
    def root(self) -> str:
        return f"{MODELS_MOUNT}/{self.model_dir}"

    @property
    def hf_checkpoint(self) -> str:  # the Hugging Face checkpoint, copied onto the claim by the operator
        return f"{self.root}/hf"

    @property
    def trtllm_checkpoint(self) -> str:
        return f"{self.root}/engines/{self.profile}/tensorrt_llm_checkpoint"

    @property
    def engine_dir(self) -> str:
        return f"{self.root}/engines/{self.profile}/tensorrt_llm"

    @property
    def repository(self) -> str:
        return f"{self.root}/model_repository/{self.profile}"

    @property
    def tokenizer_dir(self) -> str:
        return f"{self.repository}/{ENTRY}/1/tokenizer"


def convert_argv(p: TrtllmPlan, paths: NodePaths, examples: str = EXAMPLES_IN_IMAGE) -> list[str]:
    """TensorRT-LLM's checkpoint conversion: FP16 through the architecture's convert_checkpoint.py, INT4 AWQ
    through examples/quantization/quantize.py (ModelOpt), both split for `tp_size` ranks."""
    if p.precision == Precision.INT4.value:
        return ["python3", f"{examples}/quantization/quantize.py", "--model_dir", paths.hf_checkpoint,
                "--output_dir", paths.trtllm_checkpoint, "--dtype", "float16", "--qformat", "int4_awq",
                "--awq_block_size", str(p.awq_block_size), "--calib_size", "512", "--tp_size", str(p.tp_size)]
    return ["python3", f"{examples}/models/core/{CONVERTERS[p.architecture]}/convert_checkpoint.py",
            "--model_dir", paths.hf_checkpoint, "--output_dir", paths.trtllm_checkpoint, "--dtype", "float16",
            "--tp_size", str(p.tp_size)]


def build_argv(p: TrtllmPlan, paths: NodePaths) -> list[str]:
    """trtllm-build for the plan: the profile's limits, paged KV (the backend's in-flight batcher needs it),
    plugins at the checkpoint's dtype, one build worker per rank."""
    return [
        "trtllm-build", "--checkpoint_dir", paths.trtllm_checkpoint, "--output_dir", paths.engine_dir,
        "--max_batch_size", str(p.max_batch_size), "--max_input_len", str(p.max_input_len),
        "--max_seq_len", str(p.max_seq_len), "--max_num_tokens", str(p.max_num_tokens), "--max_beam_width", "1",
        "--kv_cache_type", "paged", "--gpt_attention_plugin", "auto", "--gemm_plugin", "auto",
        "--use_paged_context_fmha", "enable", "--workers", str(p.tp_size),
    ]


def launch_argv(p: TrtllmPlan, repository: str, ports: tuple[int, int, int], extra: list[str] = ()) -> list[str]:
    """The backend's multi-rank launch in leader mode, as its scripts/launch_triton_server.py builds it (one
    tritonserver per rank under mpirun, ranks ≥ 1 loading only tensorrt_llm, a shared-memory prefix per rank) —
    written out here because that script starts mpirun in the background and exits, which would end the pod."""
    grpc, http, metrics = ports
    argv = ["mpirun", "--allow-run-as-root"]
    for rank in range(p.tp_size):
        argv += ["-n", "1", "tritonserver", f"--model-repository={repository}",
                 f"--grpc-port={grpc}", f"--http-port={http}", f"--metrics-port={metrics}"]
        argv += list(extra) if rank == 0 else ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        argv += ["--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank < p.tp_size - 1:
            argv.append(":")
    return argv


def _values(p: TrtllmPlan, paths: NodePaths) -> dict[str, str]:
    """The backend's template variables r1deploy sets (every mandatory one; optional ones only where r1deploy has
    a reason — the rest keep the backend's defaults)."""
    return {
        "triton_backend": "tensorrtllm",  # the C++ backend (the python runtime is the other choice)
        "triton_max_batch_size": str(p.max_batch_size),
        "decoupled_mode": "true",  # streaming: the gateway streams every request
        "max_queue_delay_microseconds": str(p.max_queue_delay_us),
        "max_queue_size": str(p.max_queue_size),
        "engine_dir": paths.engine_dir,
        "batching_strategy": "inflight_fused_batching",
        "encoder_input_features_data_type": "TYPE_FP16",  # unused by decoder-only models; the docs' non-mllama value
        "logits_datatype": "TYPE_FP32",
        "max_beam_width": "1",
        "tokenizer_dir": paths.tokenizer_dir,
        "preprocessing_instance_count": "1",
        "postprocessing_instance_count": "1",
        # the docs: with the BLS entry, one instance per request the engine batches, so requests run concurrently
        "bls_instance_count": str(p.max_batch_size),
        "tensorrt_llm_model_name": "tensorrt_llm",
        "accumulate_tokens": "false",  # stream token deltas, as the gateway expects
        "exclude_input_in_output": "true",
        "kv_cache_free_gpu_mem_fraction": "0.9",
    }


def _set_path(config: mc.ModelConfig, path: str, value: str) -> None:
    """Set one template location (backend_templates.json `locations`) on a typed config."""
    if path.startswith("tensor["):
        name = path[len("tensor["):path.index("]")]
        for t in list(config.input) + list(config.output):
            if t.name == name:
                t.data_type = mc.DataType.Value(value)
        return
    if path == "instance_group.count":
        for g in config.instance_group:
            g.count = int(value)
        return
    *parents, leaf = path.split(".")
    msg = config
    for part in parents:
        msg = getattr(msg, part)
    field = msg.DESCRIPTOR.fields_by_name[leaf]
    if hasattr(getattr(msg, leaf), "append"):  # a repeated field
        del getattr(msg, leaf)[:]
        getattr(msg, leaf).append(int(value))
    elif field.type == field.TYPE_BOOL:
        setattr(msg, leaf, value == "true")
    elif field.type == field.TYPE_STRING:
        setattr(msg, leaf, value)
    else:
        setattr(msg, leaf, int(value))


def model_config(name: str, p: TrtllmPlan, paths: NodePaths, limits: Optional[dict[str, str]] = None) -> mc.ModelConfig:
    """One of the backend's models as a typed ModelConfig: the template's tensors and structure (the catalogue),
    the plan's values at the template's locations, and the template's parameters r1deploy sets."""
    entry = templates()["models"][name]
    values = _values(p, paths)
    config = json_format.ParseDict(entry["skeleton"], mc.ModelConfig())
    config.name = name
    for t in entry["input"]:
        config.input.append(json_format.ParseDict({k: ({"shape": v} if k == "reshape" else v) for k, v in t.items()},
                                                  mc.ModelInput()))
    for t in entry["output"]:
        config.output.append(json_format.ParseDict(t, mc.ModelOutput()))
    for var, paths_of in entry["locations"].items():
        if var not in values:
            raise BadInput(f"{name}: template variable {var} has no value (update exporter/trtllm.py)")
        for path in paths_of:
            _set_path(config, path, values[var])
    for key, var in entry["parameters"].items():
        if var in values:
            config.parameters[key].string_value = values[var]
        elif "/" in var or var in ("no", "yes"):  # a literal in the template (not a variable): keep it
            config.parameters[key].string_value = var
    for step in entry.get("steps", []):
        config.ensemble_scheduling.step.append(json_format.ParseDict(step, mc.ModelEnsembling.Step()))
    for key, value in (limits or {}).items():
        config.parameters[key].string_value = value
    return config


def gateway_limits(p: TrtllmPlan, eos_token_ids: list[int]) -> dict[str, str]:
    """The parameters r1deploy's gateway reads from its entry model (exporter/gateway/models.py)."""
    return {
        "max_input_len": str(p.max_input_len), "max_output_len": str(p.max_seq_len - p.max_input_len),
        "max_sequence_len": str(p.max_seq_len), "eos_token_ids": json.dumps(eos_token_ids),
        "r1deploy_status": UNVERIFIED,
    }


def build_script(p: TrtllmPlan, paths: NodePaths) -> str:
    """What the engine-build init container runs on the node: the backend's model.py files into the repository,
    then — unless the engine of this exact build spec is there — conversion and trtllm-build."""
    spec = f"{paths.engine_dir}/r1deploy-build.json"
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by r1deploy for {p.model} on profile {p.profile}: TensorRT-LLM tp={p.tp_size}, {p.precision}.",
        f"# {UNVERIFIED}.",
        "set -euo pipefail",
        f'ALL_MODELS="${{TRTLLM_ALL_MODELS:-{ALL_MODELS_IN_IMAGE}}}"',
        f"for model in preprocessing postprocessing {ENTRY}; do",
        f'  cp -r "$ALL_MODELS/$model/1/." {shlex.quote(paths.repository)}/"$model"/1/',
        "done",
        f'if [ -f {shlex.quote(spec)} ] && cmp -s {shlex.quote(spec)} "$(dirname "$0")/build.json"; then',
        '  echo "engine up to date"; exit 0',
        "fi",
        f"test -d {shlex.quote(paths.hf_checkpoint)} || {{ echo \"no Hugging Face checkpoint at "
        f"{paths.hf_checkpoint}\" >&2; exit 1; }}",
        shlex.join(convert_argv(p, paths)),
        shlex.join(build_argv(p, paths)),
        f'cp "$(dirname "$0")/build.json" {shlex.quote(spec)}',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class TrtllmRepositoryResult:
    out: Path
    plan: TrtllmPlan
    models: list[str]
    entry_model: str
    build_script: Path
    missing: list[str] = field(default_factory=list)
    status: str = "unverified"  # nothing of this path has run on a GPU


_HEADER = "# Written by r1deploy: tensorrtllm_backend's "


def _owned(entry: Path) -> bool:
    """A model directory r1deploy wrote: one of the backend's models with this module's header, or r1deploy's own
    repository's (switching a profile's runtime replaces it); anything else is the user's, never deleted."""
    from .repository.writer import _written_by_r1deploy

    if entry.name in MODELS and entry.is_dir() and not entry.is_symlink():
        try:
            with open(entry / "config.pbtxt", encoding="utf-8") as fh:
                return fh.read(len(_HEADER)) == _HEADER
        except (OSError, UnicodeDecodeError):
            return False
    return _written_by_r1deploy(entry)


def write_trtllm_repository(shape, profile: DeploymentProfile, out: Path, model_dir: str,
                            tokenizer_dir: Optional[Path] = None, eos_token_ids: Optional[list[int]] = None,
                            precision: Optional[Precision] = None) -> TrtllmRepositoryResult:
    from .core.artifacts import atomic_dir, check_replaceable
    from .repository.configs import render

    p = plan_trtllm(shape, profile, precision)
    paths = NodePaths(model_dir, profile.name)
    missing: list[str] = []
    check_replaceable(Path(out), _owned)
    with atomic_dir(Path(out)) as tmp:
        for name in MODELS:
            limits = gateway_limits(p, eos_token_ids or []) if name == ENTRY else None
            (tmp / name / "1").mkdir(parents=True)
            comments = [f"{_HEADER[2:]}{name} model for {p.model} on profile "
                        f"{p.profile} (TensorRT-LLM tp={p.tp_size}, {p.precision}).", UNVERIFIED + "."]
            (tmp / name / "config.pbtxt").write_text(render(model_config(name, p, paths, limits), comments))
        version = tmp / "tensorrt_llm" / "1"
        (version / "build.json").write_text(json.dumps(asdict(p), indent=1, sort_keys=True) + "\n")
        script = version / "build_engine.sh"
        script.write_text(build_script(p, paths))
        script.chmod(0o755)
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            import shutil

            shutil.copytree(tokenizer_dir, tmp / ENTRY / "1" / "tokenizer")
        else:
            missing.append(f"{ENTRY}/1/tokenizer (the model's tokenizer files: `r1deploy export` writes them)")
        missing.append(f"{paths.hf_checkpoint} on the claim (the Hugging Face checkpoint build_engine.sh converts)")
    out = Path(out)
    return TrtllmRepositoryResult(out=out, plan=p, models=list(MODELS), entry_model=ENTRY,
                                  build_script=out / "tensorrt_llm" / "1" / "build_engine.sh", missing=missing)
