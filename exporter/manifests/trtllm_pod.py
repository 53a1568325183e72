"""The overlay patch that makes a profile's pod serve TensorRT-LLM through Triton's tensorrtllm_backend
(exporter/trtllm.py): the TensorRT-LLM Triton image from the version table, the backend's multi-rank launch under
mpirun over the pod's GPUs, an engine-build init container running the build script `r1deploy repository
--runtime tensorrt-llm` wrote, HTTP probes (the image carries no r1deploy for the generate model's exec probe) and
a shared-memory volume sized for NCCL between the ranks. **Unverified: never applied to a cluster or run on a GPU.**"""

from __future__ import annotations

from ..core.profiles import DeploymentProfile
from ..trtllm import MODELS, NodePaths, TrtllmPlan, image, launch_argv
from . import objects
from .config import EXPLICIT_MODEL_CONTROL_PROFILES, ManifestsConfig

# Triton flags launch_argv sets per rank itself (ports, repository): dropped from the profile's flags for rank 0
_PER_RANK = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=", "--model-control-mode=",
             "--load-model=")
SHM_PER_GPU_GIB = 4  # NCCL's buffers between ranks go through /dev/shm; the python models' tensors too


def rank0_args(cfg: ManifestsConfig, profile: DeploymentProfile, exit_timeout_s: int) -> list[str]:
    args = [a for a in objects.triton_args(cfg, profile, exit_timeout_s) if not a.startswith(_PER_RANK)]
    if profile.name in EXPLICIT_MODEL_CONTROL_PROFILES:
        return ["--model-control-mode=explicit", *[f"--load-model={m}" for m in MODELS], *args]
    return ["--model-control-mode=none", *args]


def _probe(path: str, period: int, failures: int) -> dict:
    # `$patch: replace`: the base's exec probe (r1deploy health) must go, not be merged with an httpGet
    return {"$patch": "replace", **objects._http_probe(path, period, failures)}


def trtllm_deployment_patch(cfg: ManifestsConfig, profile: DeploymentProfile, p: TrtllmPlan, base: dict,
                            weights_gib: int) -> dict:
    """`base` (objects.deployment_patch for the profile) with the TensorRT-LLM pod's changes on top. Host memory:
    each rank stages only its 1/tp shard of the engine, so the weights count once (twice at the limit), not once
    per GPU as for r1deploy's per-GPU engine instances."""
    paths = NodePaths(cfg.model_dir, profile.name)
    pod = base["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    exit_timeout_s = pod["terminationGracePeriodSeconds"] - 30
    argv = launch_argv(p, paths.repository, (objects.GRPC, objects.HTTP, objects.METRICS),
                       rank0_args(cfg, profile, exit_timeout_s))
    triton.update({
        "image": image()["image"],
        "command": argv[:1],
        "args": argv[1:],
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", objects.PROBE_PERIOD_S, 6),
    })
    gpus = p.tp_size
    triton["resources"] = objects._resources(str(2 * gpus), str(4 * gpus), f"{8 * gpus + weights_gib}Gi",
                                             f"{16 * gpus + 2 * weights_gib}Gi", gpus=gpus)
    build = next(c for c in pod["initContainers"] if c["name"] == "engine-build")
    build.update({
        "image": image()["image"],
        "command": ["bash", f"{paths.repository}/tensorrt_llm/1/build_engine.sh"],
        "args": [],
        "env": build["env"] + [{"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "compute,utility"}],
    })
    # trtllm-build builds every rank's engine at once (--workers tp): one GPU per rank
    build["resources"] = objects._resources("8", "16", *_memory(build), gpus=p.tp_size)
    pod["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_PER_GPU_GIB * p.tp_size}Gi"}}]
    base["metadata"]["annotations"] = {"r1deploy.io/serving": f"tensorrt-llm tp={p.tp_size} {p.precision} (unverified)"}
    return base


def _memory(container: dict) -> tuple[str, str]:
    r = container["resources"]
    return r["requests"]["memory"], r["limits"]["memory"]
