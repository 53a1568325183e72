"""`render_manifests`: the kustomize tree (base + one overlay per deployment profile) from typed objects, dumped
as deterministic YAML and written atomically."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from ..core.artifacts import atomic_dir
from ..core.errors import BadInput
from ..core.profiles import DeploymentProfile, load_profiles
from . import monitoring, objects
from .config import LOCAL_STORAGE_PROFILES, ManifestsConfig, ManifestsResult

KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
OWNED_ENTRIES = {"base", "overlays", "extras", "images"}  # what `out` may contain before it is replaced


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(obj: dict, header: str = "") -> str:
    """Sorted keys, block style, no line wrapping: the same dict always gives the same bytes."""
    body = yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16)
    return (f"# {header}\n" if header else "") + body


def namespace_for(profile: DeploymentProfile) -> str:
    return f"r1deploy-{profile.name}"


def base_files(cfg: ManifestsConfig) -> dict[str, dict]:
    n = objects.names(cfg)
    files = {
        "serviceaccount.yaml": objects.service_account(cfg),
        "service.yaml": objects.service(cfg),
        "persistentvolumeclaim.yaml": objects.persistent_volume_claim(cfg),
        "deployment.yaml": objects.deployment(cfg),
        "networkpolicy.yaml": objects.network_policy(cfg),
        "servicemonitor.yaml": monitoring.service_monitor(n["servicemonitor"], objects.selector_labels(cfg), objects.has_gateway(cfg)),
        "dashboard-configmap.yaml": monitoring.dashboard_configmap(n["dashboard"], f"r1deploy {cfg.app} Triton"),
    }
    files["kustomization.yaml"] = {
        "apiVersion": KUSTOMIZE_API,
        "kind": "Kustomization",
        "resources": sorted(files),
        "labels": [
            {
                "pairs": {
                    **objects.selector_labels(cfg),
                    "app.kubernetes.io/part-of": "r1deploy",
                    "app.kubernetes.io/component": "inference-server",
                },
                "includeTemplates": True,
            }
        ],
    }
    return files


def _plan(cfg: ManifestsConfig, profile: DeploymentProfile):
    """The GPU memory plan of a decoder on this profile (None for encoders) and, when TensorRT-LLM serves it
    (`--runtime tensorrt-llm`, or `auto` and the model needs more than one GPU of a TensorRT profile), its
    TensorRT-LLM plan. BadInput (exit 2, with the numbers) when neither can run it, so no overlay is written that
    could never start."""
    if cfg.kind != "decoder":
        return None, None
    from ..plan import PlanConfig, ensure_deployable, load_shape, plan_capacity
    from ..trtllm import plan_trtllm, uses_trtllm

    shape = load_shape(cfg.model)
    plan = plan_capacity(PlanConfig(shape, profile))
    if uses_trtllm(cfg.runtime, profile, plan.gpus_per_replica):
        return plan, plan_trtllm(shape, profile)
    ensure_deployable(plan)
    return plan, None


def _capacity_summary(plan) -> dict:
    """What the overlay was sized with, in its profile ConfigMap: the generate scheduler's limits
    (`exporter.plan.scheduler_limits`) and the figures behind them."""
    from ..plan import scheduler_limits

    return {
        "model": plan.model, "precision": plan.precision, "gpu": plan.gpu, "weights_bytes": plan.weights.total,
        "kv_bytes_per_token": plan.kv_bytes_per_token, "max_sequence_len": plan.max_sequence_len,
        "scheduler": scheduler_limits(plan),
        "decode_tokens_per_s_bound": plan.decode_tokens_per_s_planned,
    }


def overlay_files(cfg: ManifestsConfig, profile: DeploymentProfile) -> dict[str, dict]:
    from ..plan import memory_requests

    plan, trt = _plan(cfg, profile)
    ns = namespace_for(profile)
    n = objects.names(cfg)
    capacity = _capacity_summary(plan) if plan else None
    if trt is not None:
        capacity = {**capacity, "tensorrt_llm": dataclasses.asdict(trt)}
    resources = {
        "namespace.yaml": objects.namespace(ns),
        "profile-configmap.yaml": objects.profile_configmap(cfg, profile, capacity),
        "prometheusrule.yaml": monitoring.prometheus_rule(n["prometheusrule"], profile, ns, cfg.kind),
    }
    if profile.max_replicas > profile.replicas:
        resources["horizontalpodautoscaler.yaml"] = objects.horizontal_pod_autoscaler(cfg, profile)
    if profile.replicas > 1:  # a PDB on a single replica would block every node drain
        resources["poddisruptionbudget.yaml"] = objects.pod_disruption_budget(cfg, profile)
    local = profile.name in LOCAL_STORAGE_PROFILES
    if local:
        resources["storageclass.yaml"] = objects.local_storage_class()
    memory = memory_requests(plan, profile) if plan else None
    patch = objects.deployment_patch(cfg, profile, memory)
    if trt is not None:
        from .trtllm_pod import trtllm_deployment_patch

        patch = trtllm_deployment_patch(cfg, profile, trt, patch, math.ceil(plan.weights.total / 2**30))
    patches = {"deployment-patch.yaml": patch}
    if local:
        patches["pvc-patch.yaml"] = objects.pvc_patch(cfg, access_mode="ReadWriteOnce", storage_class="local-storage")
    elif profile.max_replicas > 1:  # every replica, on its own node, mounts the same repository
        patches["pvc-patch.yaml"] = objects.pvc_patch(cfg, access_mode="ReadWriteMany")
    kustomization = {
        "apiVersion": KUSTOMIZE_API,
        "kind": "Kustomization",
        "namespace": ns,
        "resources": ["../../base", *sorted(resources)],
        "patches": [{"path": p} for p in sorted(patches)],
        "labels": [{"pairs": {"r1deploy.io/profile": profile.name}, "includeTemplates": True}],
    }
    return {**resources, **patches, "kustomization.yaml": kustomization}


def extras_files() -> dict[str, dict]:
    return {"prometheus-adapter-rules.yaml": monitoring.adapter_config()}


def render_tree(cfg: ManifestsConfig) -> dict[str, str]:
    """Relative path → file text for the whole tree (no I/O)."""
    profiles = cfg.profiles or load_profiles()
    header = f"Generated by `r1deploy manifests --model {cfg.model}`; edit the profiles, not this file."
    tree: dict[str, str] = {}
    for name, obj in base_files(cfg).items():
        tree[f"base/{name}"] = dump_yaml(obj, header)
    for pname in sorted(profiles):
        for name, obj in overlay_files(cfg, profiles[pname]).items():
            tree[f"overlays/{pname}/{name}"] = dump_yaml(obj, header)
    for name, obj in extras_files().items():
        tree[f"extras/{name}"] = dump_yaml(obj, header + " Goes into prometheus-adapter's config (docs/deploy.md).")
    from ..images import image_files

    tree.update(image_files())  # the images the pods run, from the same version table and UID (exporter/images.py)
    return dict(sorted(tree.items()))


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED_ENTRIES)
        if foreign:
            raise BadInput(f"refusing to replace {out}: it holds {', '.join(foreign)}, which r1deploy did not write")


def render_manifests(cfg: ManifestsConfig) -> ManifestsResult:
    profiles = cfg.profiles or load_profiles()
    if not cfg.profiles:
        cfg = dataclasses.replace(cfg, profiles=profiles)
    tree = render_tree(cfg)
    out = Path(cfg.out)
    _check_replaceable(out)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the tree is meant to be shared and committed
        for rel, text in tree.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return ManifestsResult(
        out=out,
        model=cfg.model,
        triton_image=cfg.triton_image,
        overlays=sorted(profiles),
        files=list(tree),
    )
