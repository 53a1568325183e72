"""Typed inputs and outputs of the manifests stage, and the few tables of facts it needs (image tags, sizing)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..core.artifacts import check_name
from ..core.errors import BadInput
from ..core.profiles import DeploymentProfile, Runtime, ServingVariant
from ..core.versions import image_tag, load_versions

# Triton release whose container ships each TensorRT major.minor: from the one version table
# (exporter/data/versions.yaml). An engine only loads in the TensorRT it was built with, so the image tag follows
# the engine's TensorRT version.
_VERSIONS = load_versions()
TRITON_RELEASE_FOR_TENSORRT: dict[str, str] = {r.tensorrt_major_minor: r.release for r in _VERSIONS.releases.values()}
DEFAULT_TENSORRT_VERSION = _VERSIONS.release().tensorrt_major_minor
# Where `make image` pushes r1deploy's two images (k8s/images/). `.invalid` never resolves: a cluster that was not
# told the real registry fails to pull instead of pulling someone else's image.
DEFAULT_IMAGE_REPOSITORY = "registry.invalid/r1deploy"
STORAGE_IMAGES = {"s3": "amazon/aws-cli:2.17.0", "gcs": "google/cloud-sdk:489.0.0-slim"}

# Worst-case model load time per profile (Triton loading every model, 8 GPUs for production); the startupProbe
# allows at least this long before liveness takes over. Profiles not listed get the production figure.
STARTUP_BUDGET_MIN: dict[str, int] = {"production": 30, "research": 30, "edge": 15}
# Extra node taints a profile's pods tolerate, beyond the GPU operator's `nvidia.com/gpu` taint.
EXTRA_TAINTS: dict[str, tuple[str, ...]] = {"edge": ("r1deploy.io/edge",)}
# Profiles whose model repository sits on node-local disks (a `local-storage` StorageClass and local PVs).
LOCAL_STORAGE_PROFILES = frozenset({"edge"})
# Profiles that load models explicitly (--model-control-mode=explicit, variants side by side); others load all
# models at start-up and never change them (--model-control-mode=none).
EXPLICIT_MODEL_CONTROL_PROFILES = frozenset({"research"})

# Triton model names the repository stage writes (exporter.repository.writer: LLM, GENERATE / ENCODER, TOKENIZER,
# EMBED), engine model first; copied here so rendering manifests does not import the repository stage.
REPOSITORY_MODELS: dict[str, tuple[str, ...]] = {
    "decoder": ("llm", "generate"),
    "encoder": ("encoder", "tokenizer", "embed"),
}
GENERATE_MODEL = "generate"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Kubernetes resource.Quantity: a signed decimal with an optional binary-SI, decimal-SI or exponent suffix.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")


class Storage(str, enum.Enum):
    PVC = "pvc"  # the model repository lives on a PersistentVolumeClaim (edge: a local PV)
    S3 = "s3"  # an init container syncs s3://… onto the claim before Triton starts
    GCS = "gcs"  # same, from gs://…


def release_for(tensorrt_version: str) -> str:
    return _VERSIONS.release_for_tensorrt(tensorrt_version).release


def image_ref(repository: str, name: str, tag: str, digest: Optional[str] = None) -> str:
    """`<repository>/<name>@sha256:…` when the digest is known (recommended: what runs is what was tested), else
    `<repository>/<name>:<tag>`."""
    return f"{repository}/{name}@{digest}" if digest else f"{repository}/{name}:{tag}"


def triton_image_for(tensorrt_version: str, repository: str = DEFAULT_IMAGE_REPOSITORY) -> str:
    """r1deploy's Triton image (k8s/images/triton) built on the Triton release that ships this TensorRT."""
    return image_ref(repository, "triton", image_tag(release_for(tensorrt_version), _VERSIONS))


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def k8s_name(text: str) -> str:
    """A model name or checkpoint path → a DNS-1123 label usable in object names."""
    slug = re.sub(r"[^a-z0-9-]+", "-", Path(text).name.lower()).strip("-")
    return slug[:40].strip("-") or "model"


@dataclass(frozen=True)
class ManifestsConfig:
    model: str = "r1-distill-tiny"
    out: Path = Path("k8s")
    profiles: dict[str, DeploymentProfile] = field(default_factory=dict)  # empty → built-in profiles
    tensorrt_version: str = DEFAULT_TENSORRT_VERSION
    image: Optional[str] = None  # full Triton image reference (overrides the repository/tag/digest below)
    r1deploy_image: Optional[str] = None  # full engine-build image reference (same)
    image_repository: str = DEFAULT_IMAGE_REPOSITORY  # where `make image` pushed k8s/images/{triton,engine-build}
    image_tag: Optional[str] = None  # default: <r1deploy version>-<Triton release of tensorrt_version>
    triton_digest: Optional[str] = None  # sha256:… of the pushed triton image (recommended over the tag)
    engine_build_digest: Optional[str] = None  # sha256:… of the pushed engine-build image
    storage: Storage = Storage.PVC
    storage_uri: Optional[str] = None  # s3://bucket/prefix or gs://bucket/prefix: an r1deploy workdir
    storage_secret: str = "r1deploy-storage-credentials"
    storage_image: Optional[str] = None
    storage_size: str = "200Gi"
    model_kind: Optional[str] = None  # decoder | encoder; None → from the preset name
    load_models: tuple[str, ...] = ()  # extra models research loads side by side (explicit model control)
    # What serves a decoder (exporter.trtllm.ServingRuntime): auto = TensorRT-LLM where the plan needs more than
    # one GPU of a TensorRT profile, r1deploy's own generate model elsewhere
    runtime: str = "auto"

    def __post_init__(self) -> None:
        storage = Storage(self.storage)
        object.__setattr__(self, "storage", storage)
        if storage is not Storage.PVC:
            scheme = "s3://" if storage is Storage.S3 else "gs://"
            if not (self.storage_uri or "").startswith(scheme):
                raise BadInput(f"--storage {storage.value} needs --storage-uri {scheme}BUCKET/PREFIX")
        elif self.storage_uri:
            raise BadInput("--storage-uri needs --storage s3 or --storage gcs")
        if not QUANTITY.fullmatch(self.storage_size):
            raise BadInput(f"--storage-size {self.storage_size!r} is not a Kubernetes quantity (e.g. 200Gi)")
        if self.model_kind not in (None, "decoder", "encoder"):
            raise BadInput(f"model kind {self.model_kind!r} is not one of decoder, encoder")
        if not _DNS_LABEL.fullmatch(self.storage_secret):
            raise BadInput(f"--storage-secret {self.storage_secret!r} is not a valid Secret name")
        for model in self.load_models:
            # each becomes a --load-model argument and a directory name in the repository
            check_name(model, "--load-model")
        for name in self.profiles:
            if not _DNS_LABEL.fullmatch(name) or len(name) > 40:
                raise BadInput(f"profile {name!r} cannot name a Kubernetes overlay (lowercase letters, digits, '-')")
        if self.runtime not in ("auto", "r1deploy", "tensorrt-llm"):
            raise BadInput(f"--runtime {self.runtime!r} is not one of auto, r1deploy, tensorrt-llm")
        release_for(self.tensorrt_version)  # BadInput early for an unknown version
        for what, digest in (("--triton-digest", self.triton_digest), ("--engine-build-digest", self.engine_build_digest)):
            if digest is not None and not _DIGEST.fullmatch(digest):
                raise BadInput(f"{what} {digest!r} is not an image digest (sha256: and 64 hex digits)")
        if not re.fullmatch(r"[a-z0-9]+([._:/-][a-z0-9]+)*", self.image_repository):
            raise BadInput(f"--image-repository {self.image_repository!r} is not a registry/namespace path")

    @property
    def tag(self) -> str:
        return self.image_tag or image_tag(release_for(self.tensorrt_version), _VERSIONS)

    @property
    def triton_image(self) -> str:
        return self.image or image_ref(self.image_repository, "triton", self.tag, self.triton_digest)

    @property
    def engine_build_image(self) -> str:
        return self.r1deploy_image or image_ref(self.image_repository, "engine-build", self.tag, self.engine_build_digest)

    @property
    def kind(self) -> str:
        if self.model_kind:
            return self.model_kind
        return "encoder" if Path(self.model).name.lower() in ("minilm", "all-minilm-l6-v2") else "decoder"

    @property
    def app(self) -> str:
        return k8s_name(self.model)

    @property
    def model_dir(self) -> str:
        """The model's directory name in r1deploy's workdir (`<workdir>/<model>/…`)."""
        return Path(self.model).name

    @property
    def engine_model(self) -> str:
        """The Triton model that holds the engine (names from exporter.repository.writer: llm / encoder)."""
        return REPOSITORY_MODELS[self.kind][0]

    @property
    def served_models(self) -> tuple[str, ...]:
        """The Triton models of the repository stage's layout, in load order (dependencies first)."""
        core = REPOSITORY_MODELS[self.kind]
        return core + tuple(m for m in self.load_models if m not in core)

    def plan_in_generate(self, profile: DeploymentProfile) -> bool:
        """A decoder on a profile that serves TensorRT-RTX plans: the generate model runs the plan in-process and the
        repository has no `llm` model (the repository stage's rule, RepositoryConfig.plan_in_generate: stock
        Triton's TensorRT backend links full TensorRT and cannot load a TensorRT-RTX plan)."""
        return (self.kind == "decoder" and profile.runtime is Runtime.TENSORRT_RTX
                and profile.serving_variant is ServingVariant.TENSORRT_PLAN)

    def engine_model_for(self, profile: DeploymentProfile) -> str:
        """The Triton model whose version directory holds the plan the engine-build init container installs."""
        return GENERATE_MODEL if self.plan_in_generate(profile) else self.engine_model

    def served_models_for(self, profile: DeploymentProfile) -> tuple[str, ...]:
        """`served_models` as the profile's repository has them (no `llm` where generate runs the plan)."""
        models = self.served_models
        return tuple(m for m in models if m != self.engine_model) if self.plan_in_generate(profile) else models


@dataclass
class CheckReport:
    overlays_built: list[str] = field(default_factory=list)
    objects_checked: int = 0
    kubernetes_validated: int = 0
    crd_validated: int = 0
    crd_schema_dir: Optional[str] = None
    violations: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class ManifestsResult:
    out: Path
    model: str
    triton_image: str
    overlays: list[str]
    files: list[str]
    check: Optional[CheckReport] = None
