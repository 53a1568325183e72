"""One function per Kubernetes kind, each returning a plain dict. The base objects are profile-neutral; the
`*_patch` functions return the strategic-merge patches an overlay applies for one deployment profile."""

from __future__ import annotations

import math
from typing import Optional

from ..core.profiles import DeploymentProfile
from ..core.typed import to_data
from ..core.versions import load_versions
from ..images import HOME
from .config import (
    EXPLICIT_MODEL_CONTROL_PROFILES,
    EXTRA_TAINTS,
    STARTUP_BUDGET_MIN,
    STORAGE_IMAGES,
    ManifestsConfig,
    Storage,
)
from .monitoring import queue_time_metric, queue_time_target_us

UID = load_versions().uid  # the non-root user both r1deploy images create (k8s/images/); ≥ 10000 for checkov CKV_K8S_40
MODELS_MOUNT = "/models"  # the claim holds r1deploy's workdir: <model>/engines/<profile>/, <model>/model_repository/<profile>/
PROFILE_MOUNT = "/etc/r1deploy"
HTTP, GRPC, METRICS = 8000, 8001, 8002
OPENAI = 9000  # the OpenAI-compatible gateway beside Triton (decoder models only)
API_KEYS_MOUNT = "/etc/r1deploy-api-keys"  # not under PROFILE_MOUNT: a configMap volume is read-only
PROBE_PERIOD_S = 10


def repository_path(cfg: ManifestsConfig, profile_name: str) -> str:
    """Where `r1deploy repository --profile P` writes by default, inside the workdir on the claim."""
    return f"{MODELS_MOUNT}/{cfg.model_dir}/model_repository/{profile_name}"


def selector_labels(cfg: ManifestsConfig) -> dict:
    return {"app.kubernetes.io/name": "triton", "app.kubernetes.io/instance": cfg.app}


def names(cfg: ManifestsConfig) -> dict[str, str]:
    app = cfg.app
    return {
        "deployment": f"{app}-triton",
        "service": f"{app}-triton",
        "serviceaccount": f"{app}-triton",
        "pvc": f"{app}-model-repository",
        "networkpolicy": f"{app}-triton",
        "servicemonitor": f"{app}-triton",
        "dashboard": f"{app}-triton-dashboard",
        "prometheusrule": f"{app}-triton",
        "hpa": f"{app}-triton",
        "pdb": f"{app}-triton",
        "profile": f"{app}-r1deploy-profile",
        # created by the operator, never by r1deploy (docs/serving.md): key `keys`, one API key per line
        "api_keys": f"{app}-openai-api-keys",
    }


def _container_security() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpu: str, cpu_limit: str, memory: str, memory_limit: str, gpus: int = 0) -> dict:
    requests, limits = {"cpu": cpu, "memory": memory}, {"cpu": cpu_limit, "memory": memory_limit}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _http_probe(path: str, period: int, failures: int, initial: int = 0, port: str = "http") -> dict:
    probe = {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }
    if initial:
        probe["initialDelaySeconds"] = initial
    return probe


def _model_health_probe(period: int, failures: int) -> dict:
    """The generate model's own health (exporter/health.py, `r1deploy health`): Triton's /v2/health endpoints stay
    green when a python-backend model's process is dead or stopped, so the probe asks the model itself — its
    process, scheduler loop and sender must answer. Liveness failing restarts the Triton container (what
    `r1deploy serve` does outside Kubernetes)."""
    return {
        "exec": {"command": ["python3", "-m", "exporter.cli", "health", f"--triton=localhost:{GRPC}", "--model=generate",
                             "--timeout=3"]},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def namespace(name: str) -> dict:
    # The namespace enforces Pod Security Standards "restricted": the API server itself rejects a pod that slips.
    pss = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": pss}}


def service_account(cfg: ManifestsConfig) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": names(cfg)["serviceaccount"]},
        "automountServiceAccountToken": False,
    }


def has_gateway(cfg: ManifestsConfig) -> bool:
    """Only an LLM (a `generate` model) gets the OpenAI gateway; an embedding model has nothing to chat with."""
    return cfg.kind == "decoder"


def service(cfg: ManifestsConfig) -> dict:
    ports = [("http", HTTP), ("grpc", GRPC), ("metrics", METRICS)] + ([("openai", OPENAI)] if has_gateway(cfg) else [])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": names(cfg)["service"]},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(cfg),
            "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in ports],
        },
    }


def persistent_volume_claim(cfg: ManifestsConfig) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": names(cfg)["pvc"]},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cfg.storage_size}}},
    }


def pvc_patch(cfg: ManifestsConfig, *, access_mode: str, storage_class: Optional[str] = None) -> dict:
    spec: dict = {"accessModes": [access_mode]}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": names(cfg)["pvc"]}, "spec": spec}


def local_storage_class() -> dict:
    # Local PVs are created by the cluster admin on each edge node (docs/deploy.md); binding waits for the pod so
    # the claim lands on the node the scheduler picked for the GPUs.
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": "local-storage"},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain",
    }


def network_policy(cfg: ManifestsConfig) -> dict:
    """Inference ports (Triton's and the OpenAI gateway's) from any pod in the cluster, Triton's metrics only from
    the `monitoring` namespace (the gateway's /metrics shares its API port)."""
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    inference = [{"port": HTTP, "protocol": "TCP"}, {"port": GRPC, "protocol": "TCP"}]
    if has_gateway(cfg):
        inference.append({"port": OPENAI, "protocol": "TCP"})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": names(cfg)["networkpolicy"]},
        "spec": {
            "podSelector": {"matchLabels": selector_labels(cfg)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"namespaceSelector": {}}], "ports": inference},
                {"from": [monitoring], "ports": [{"port": METRICS, "protocol": "TCP"}]},
            ],
        },
    }


def _storage_init_container(cfg: ManifestsConfig) -> dict:
    """Copies the bucket (an r1deploy workdir) onto the claim; credentials only from a Secret."""
    if cfg.storage is Storage.S3:
        argv = ["aws", "s3", "sync", "--no-progress", "$(STORAGE_URI)", MODELS_MOUNT]
        home = {"name": "HOME", "value": "/tmp"}
    else:
        argv = ["gcloud", "storage", "rsync", "--recursive", "$(STORAGE_URI)", MODELS_MOUNT]
        home = {"name": "CLOUDSDK_CONFIG", "value": "/tmp/gcloud"}
    return {
        "name": "storage-sync",
        "image": cfg.storage_image or STORAGE_IMAGES[cfg.storage.value],
        "imagePullPolicy": "Always",
        "command": argv,
        "env": [{"name": "STORAGE_URI", "value": cfg.storage_uri}, home],
        "envFrom": [{"secretRef": {"name": cfg.storage_secret}}],
        "resources": _resources("500m", "2", "1Gi", "4Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "model-repository", "mountPath": MODELS_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _engine_build_args(cfg: ManifestsConfig, engine_model: str) -> list[str]:
    """node_engine's arguments: `engine_model` is the Triton model whose version directory gets the plan."""
    return [
        f"--model={cfg.model_dir}",
        "--profile=$(R1DEPLOY_PROFILE)",
        f"--profiles={PROFILE_MOUNT}/profiles.yaml",
        f"--workdir={MODELS_MOUNT}",
        f"--model-repository={repository_path(cfg, '$(R1DEPLOY_PROFILE)')}",
        f"--engine-model={engine_model}",
    ]


def _engine_init_container(cfg: ManifestsConfig) -> dict:
    """Rebuilds the engine on this node when the cached one was built for another GPU or TensorRT version."""
    return {
        "name": "engine-build",
        "image": cfg.engine_build_image,
        "imagePullPolicy": "Always",
        "command": ["python3", "-m", "exporter.manifests.node_engine"],
        "args": _engine_build_args(cfg, cfg.engine_model),
        "env": [
            {"name": "R1DEPLOY_PROFILE", "value": "unset"},
            {"name": "HOME", "value": "/tmp"},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "compute,utility"},
        ],
        "resources": _resources("4", "8", "16Gi", "32Gi", gpus=1),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "model-repository", "mountPath": MODELS_MOUNT},
            {"name": "r1deploy-profile", "mountPath": PROFILE_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _gateway_container(cfg: ManifestsConfig) -> dict:
    """The OpenAI-compatible gateway: the Triton image (which carries r1deploy and what the gateway imports),
    Triton over gRPC on localhost, the model repository read for names, tokenizer and limits, API keys from a
    Secret mounted as a file (never an env value)."""
    return {
        "name": "openai-gateway",
        "image": cfg.triton_image,
        "imagePullPolicy": "Always",
        "command": ["python3", "-m", "exporter.cli"],
        "args": [
            f"--profiles={PROFILE_MOUNT}/profiles.yaml",
            "gateway",
            f"--triton=localhost:{GRPC}",
            f"--repository={repository_path(cfg, '$(R1DEPLOY_PROFILE)')}",
            "--host=0.0.0.0",
            f"--port={OPENAI}",
            f"--api-key-file={API_KEYS_MOUNT}/keys",
            f"--served-model-name={cfg.model_dir}",
            "--profile=$(R1DEPLOY_PROFILE)",
        ],
        "env": [{"name": "R1DEPLOY_PROFILE", "value": "unset"}, {"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "openai", "containerPort": OPENAI, "protocol": "TCP"}],
        # ready only when Triton and its models are (the gateway asks Triton); alive as long as it answers
        "readinessProbe": _http_probe("/health", 5, 3, port="openai"),
        "livenessProbe": _http_probe("/health/live", PROBE_PERIOD_S, 6, port="openai"),
        "resources": _resources("1", "2", "1Gi", "2Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "model-repository", "mountPath": MODELS_MOUNT, "readOnly": True},
            {"name": "r1deploy-profile", "mountPath": PROFILE_MOUNT, "readOnly": True},
            {"name": "openai-api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def deployment(cfg: ManifestsConfig) -> dict:
    n = names(cfg)
    init = ([_storage_init_container(cfg)] if cfg.storage is not Storage.PVC else []) + [_engine_init_container(cfg)]
    triton = {
        "name": "triton",
        "image": cfg.triton_image,
        # a tag can be moved: Always re-resolves it (layers stay cached on the node); with a digest it is a no-op
        "imagePullPolicy": "Always",
        "command": ["tritonserver"],
        "args": [f"--model-repository={repository_path(cfg, '$(R1DEPLOY_PROFILE)')}"],  # the overlay sets them all

        "env": [{"name": "HOME", "value": HOME}, {"name": "R1DEPLOY_PROFILE", "value": "unset"}],
        "ports": [
            {"name": "http", "containerPort": HTTP, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS, "protocol": "TCP"},
        ],
        # an LLM is probed through its generate model (Triton's own endpoints miss a dead model process)
        "readinessProbe": _model_health_probe(5, 1) if has_gateway(cfg) else _http_probe("/v2/health/ready", 5, 3),
        "livenessProbe": (_model_health_probe(PROBE_PERIOD_S, 3) if has_gateway(cfg)
                          else _http_probe("/v2/health/live", PROBE_PERIOD_S, 6)),
        "startupProbe": _http_probe("/v2/health/ready", PROBE_PERIOD_S, 180),
        "resources": _resources("4", "8", "16Gi", "32Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "model-repository", "mountPath": MODELS_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": f"{HOME}/.cache"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    volumes = [
        {"name": "model-repository", "persistentVolumeClaim": {"claimName": n["pvc"]}},
        {"name": "r1deploy-profile", "configMap": {"name": n["profile"]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": "4Gi"}},
        # The python backend (generate, tokenizer) exchanges tensors through shared memory.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]
    containers = [triton]
    if has_gateway(cfg):
        containers.append(_gateway_container(cfg))
        # not optional: a gateway without its keys would serve without authentication
        volumes.append({"name": "openai-api-keys", "secret": {"secretName": n["api_keys"], "defaultMode": 0o440}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": n["deployment"]},
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(cfg)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": selector_labels(cfg)},
                "spec": {
                    "serviceAccountName": n["serviceaccount"],
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": init,
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }


def http_thread_count(profile: DeploymentProfile) -> int:
    """Triton's HTTP frontend holds a thread per in-flight request to a decoupled model: enough for every running
    sequence of the pod's generate instances and as many again waiting (gRPC streams hold none)."""
    return max(16, 2 * profile.max_batch_size * max(1, profile.gpus_per_pod))


def triton_args(cfg: ManifestsConfig, profile: DeploymentProfile, exit_timeout_s: int) -> list[str]:
    explicit = profile.name in EXPLICIT_MODEL_CONTROL_PROFILES
    args = [
        f"--model-repository={repository_path(cfg, profile.name)}",
        f"--model-control-mode={'explicit' if explicit else 'none'}",
    ]
    if explicit:
        args += [f"--load-model={m}" for m in cfg.served_models_for(profile)]
    args += [
        "--strict-readiness=true",
        f"--http-port={HTTP}",
        # one HTTP thread is held by each in-flight /generate request to the decoupled generate model
        f"--http-thread-count={http_thread_count(profile)}",
        f"--grpc-port={GRPC}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=true",
        "--allow-cpu-metrics=true",
        f"--metrics-port={METRICS}",
        "--metrics-interval-ms=2000",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--log-verbose=0",
    ]
    return args


def deployment_patch(cfg: ManifestsConfig, profile: DeploymentProfile, memory: Optional[dict] = None) -> dict:
    """What a profile changes in the base Deployment: GPUs, node placement, Triton's flags, probe budget, and the
    host memory `exporter.plan.memory_requests` sizes from the model's weights ({container: (request, limit)})."""
    n = names(cfg)
    gpus = profile.gpus_per_pod
    ws = int(profile.builder.workspace_gib)
    memory = memory or {"triton": (f"{16 * gpus}Gi", f"{32 * gpus}Gi"), "engine-build": (f"{ws + 8}Gi", f"{2 * ws + 16}Gi")}
    startup_min = STARTUP_BUDGET_MIN.get(profile.name, max(STARTUP_BUDGET_MIN.values()))
    exit_timeout_s = 60 if profile.name == "edge" else 120
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    tolerations += [{"key": k, "operator": "Exists", "effect": "NoSchedule"} for k in EXTRA_TAINTS.get(profile.name, ())]
    pod: dict = {
        "nodeSelector": {"nvidia.com/gpu.product": profile.gpu.product},
        "tolerations": tolerations,
        "terminationGracePeriodSeconds": exit_timeout_s + 30,
        "containers": [
            {
                "name": "triton",
                "env": [{"name": "R1DEPLOY_PROFILE", "value": profile.name}],
                "args": triton_args(cfg, profile, exit_timeout_s),
                "resources": _resources(str(2 * gpus), str(4 * gpus), *memory["triton"], gpus=gpus),
                "startupProbe": _http_probe(
                    "/v2/health/ready", PROBE_PERIOD_S, math.ceil(startup_min * 60 / PROBE_PERIOD_S)
                ),
            }
        ] + ([{"name": "openai-gateway", "env": [{"name": "R1DEPLOY_PROFILE", "value": profile.name}]}]
             if has_gateway(cfg) else []),
        "initContainers": [
            {
                "name": "engine-build",
                "env": [{"name": "R1DEPLOY_PROFILE", "value": profile.name}],
                "resources": _resources("4", "8", *memory["engine-build"], gpus=1),
            }
        ],
    }
    if cfg.engine_model_for(profile) != cfg.engine_model:
        # the generate model runs the plan in-process (TensorRT-RTX): the init container installs it beside
        # generate's model.py, where the repository's `engine_file` names it (a patched list is replaced whole)
        pod["initContainers"][0]["args"] = _engine_build_args(cfg, cfg.engine_model_for(profile))
    if cfg.storage is not Storage.PVC:
        # A strategic-merge patch moves the containers it names to the front: name the sync too, so it still
        # runs before the engine check.
        pod["initContainers"].insert(0, {"name": "storage-sync"})
    if profile.replicas > 1 or profile.max_replicas > 1:
        # One replica per node: a node failure takes out at most one, and 8-GPU pods could not share one anyway.
        pod["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": selector_labels(cfg)}, "topologyKey": "kubernetes.io/hostname"}
                ]
            }
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": n["deployment"]},
        "spec": {"replicas": profile.replicas, "template": {"spec": pod}},
    }


def horizontal_pod_autoscaler(cfg: ManifestsConfig, profile: DeploymentProfile) -> dict:
    n = names(cfg)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": n["hpa"]},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": n["deployment"]},
            "minReplicas": profile.replicas,
            "maxReplicas": profile.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": queue_time_metric(cfg.kind)},
                        "target": {"type": "AverageValue", "averageValue": str(queue_time_target_us(profile))},
                    },
                }
            ],
            # New replicas take minutes to load the model: scale up one pod at a time, scale down slowly.
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 60,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 900,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}],
                },
            },
        },
    }


def pod_disruption_budget(cfg: ManifestsConfig, profile: DeploymentProfile) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": names(cfg)["pdb"]},
        "spec": {
            "minAvailable": max(1, profile.replicas - 1),
            "selector": {"matchLabels": selector_labels(cfg)},
        },
    }


def profile_configmap(cfg: ManifestsConfig, profile: DeploymentProfile, capacity: Optional[dict] = None) -> dict:
    """The deployment profile the engine-build init container rebuilds with (user profiles included), and the
    GPU memory plan the overlay was sized with (`capacity.json`: the generate scheduler's limits among it)."""
    import json

    import yaml

    data = {k: v for k, v in to_data(profile).items() if k != "name"}
    text = yaml.safe_dump({profile.name: data}, sort_keys=True, default_flow_style=False)
    files = {"profiles.yaml": text}
    if capacity is not None:
        files["capacity.json"] = json.dumps(capacity, indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names(cfg)["profile"]},
        "data": files,
    }
