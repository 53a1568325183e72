"""Kubernetes manifests: the committed k8s/ tree is exactly what `r1deploy manifests` renders, every overlay builds
with kustomize and passes every check, and each policy rule catches the violation it exists for."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from exporter.core.errors import StageFailed
from exporter.core.profiles import load_profiles
from exporter.manifests import ManifestsConfig, checks, render_manifests, render_tree
from exporter.manifests.config import DEFAULT_TENSORRT_VERSION, triton_image_for
from exporter.manifests.monitoring import (
    ADAPTER_RULES,
    QUEUE_TIME_METRIC,
    TRITON_QUEUE_TIME_METRIC,
    promql_metrics,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "k8s"
VENDORED_CRDS = REPO / "exporter" / "data" / "crds"


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    """Each committed overlay, built once with `kubectl kustomize`."""
    return {p.name: checks.kustomize_build(p) for p in sorted((COMMITTED / "overlays").iterdir())}


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod(objects: list[dict]) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]["spec"]


def _triton(objects: list[dict]) -> dict:
    return next(c for c in _pod(objects)["containers"] if c["name"] == "triton")


# --- the committed tree ------------------------------------------------------------------------------------


def test_committed_k8s_matches_regeneration(tmp_path):
    result = render_manifests(ManifestsConfig(out=tmp_path / "k8s"))
    fresh = {p.relative_to(tmp_path / "k8s").as_posix(): p.read_bytes() for p in (tmp_path / "k8s").rglob("*") if p.is_file()}
    committed = {p.relative_to(COMMITTED).as_posix(): p.read_bytes() for p in COMMITTED.rglob("*") if p.is_file()}
    assert sorted(fresh) == sorted(result.files)
    drift = sorted(set(fresh) ^ set(committed)) + sorted(k for k in set(fresh) & set(committed) if fresh[k] != committed[k])
    assert not drift, f"k8s/ drifted from the renderer in {drift}; regenerate with `r1deploy manifests` and commit"


def test_rendering_is_byte_for_byte_reproducible():
    assert render_tree(ManifestsConfig()) == render_tree(ManifestsConfig())


def test_every_profile_gets_an_overlay_including_user_profiles(tmp_path):
    extra = tmp_path / "profiles.yaml"
    extra.write_text(yaml.safe_dump({"staging": {**_profile_data("research"), "replicas": 1, "max_replicas": 3}}))
    profiles = load_profiles(extra)
    tree = render_tree(ManifestsConfig(profiles=profiles))
    overlays = {rel.split("/")[1] for rel in tree if rel.startswith("overlays/")}
    assert overlays == {"production", "research", "edge", "staging"}
    assert "overlays/staging/horizontalpodautoscaler.yaml" in tree  # it may scale (max_replicas > replicas)


def _profile_data(name: str) -> dict:
    from exporter.core.profiles import builtin_profile_data

    return builtin_profile_data()[name]


# --- every overlay builds and passes every check -----------------------------------------------------------


def test_all_overlays_build_and_pass_every_check():
    report = checks.check_tree(COMMITTED, schema_dir=VENDORED_CRDS)
    assert report.violations == []
    assert report.overlays_built == ["edge", "production", "research"]
    assert report.kubernetes_validated >= 3 * 8
    assert report.crd_validated == 3 * 2  # one ServiceMonitor and one PrometheusRule per overlay
    assert report.skipped == []


def test_crd_schemas_are_found_in_a_fresh_clone(monkeypatch):
    monkeypatch.delenv("R1DEPLOY_CRD_SCHEMAS", raising=False)
    found = checks.crd_schema_dir()
    assert found is not None, "CRD schemas missing: exporter/data/crds/monitoring.coreos.com must be shipped"
    assert (found / "monitoring.coreos.com" / "servicemonitor_v1.json").is_file()


def test_gpus_node_selection_and_tolerations_follow_the_profiles(built):
    profiles = load_profiles()
    for name, objects in built.items():
        profile, pod = profiles[name], _pod(objects)
        limits = _triton(objects)["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == str(profile.gpus_per_pod)
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": profile.gpu.product}
        taints = {t["key"] for t in pod["tolerations"]}
        assert "nvidia.com/gpu" in taints
        assert ("r1deploy.io/edge" in taints) == (name == "edge")
    assert [int(_triton(built[n])["resources"]["limits"]["nvidia.com/gpu"]) for n in ("production", "research", "edge")] == [8, 2, 2]


def test_triton_args_probes_and_model_control(built):
    for name, objects in built.items():
        triton = _triton(objects)
        args = triton["args"]
        assert "--strict-readiness=true" in args and "--allow-metrics=true" in args
        assert any(a.startswith("--exit-timeout-secs=") for a in args)
        # an LLM's probes ask its generate model (Triton's /v2/health stays green when the model process is dead)
        for kind in ("readinessProbe", "livenessProbe"):
            assert triton[kind]["exec"]["command"][:4] == ["python3", "-m", "exporter.cli", "health"], kind
            assert "--model=generate" in triton[kind]["exec"]["command"]
        assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        explicit = "--model-control-mode=explicit" in args
        assert explicit == (name == "research")
        assert any(a.startswith("--load-model=") for a in args) == explicit
        assert triton["image"] == triton_image_for(DEFAULT_TENSORRT_VERSION)
    startup = _triton(built["production"])["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30 * 60
    research = _triton(built["research"])["args"]
    assert "--load-model=llm" in research and "--load-model=generate" in research
    assert "--model-repository=/models/r1-distill-tiny/model_repository/research" in research


def test_engine_build_installs_the_plan_where_the_repository_runs_it(built, tmp_path):
    """Issue 21 item 3: on a TensorRT-RTX profile the generate model runs the plan in-process, from
    generate/1/model.plan (exporter/repository/writer.py), so the engine-build init container installs it there;
    elsewhere into the `llm` model Triton's TensorRT backend loads. The manifests' rule is the repository stage's."""
    from exporter.repository import RepositoryConfig

    profiles = load_profiles()
    for name, objects in built.items():
        [init] = _pod(objects)["initContainers"]
        engine_model = [a for a in init["args"] if a.startswith("--engine-model=")]
        in_generate = RepositoryConfig(profile=profiles[name]).plan_in_generate
        assert in_generate == (name == "edge")
        assert engine_model == [f"--engine-model={'generate' if in_generate else 'llm'}"], name
        assert init["command"] == ["python3", "-m", "exporter.manifests.node_engine"]
    # a profile loading its models explicitly loads no `llm` where there is none (research, made TensorRT-RTX)
    extra = tmp_path / "profiles.yaml"
    extra.write_text(yaml.safe_dump({"research": {"runtime": "tensorrt-rtx", "gpu": _profile_data("edge")["gpu"]}}))
    tree = render_tree(ManifestsConfig(profiles=load_profiles(extra)))
    patch = yaml.safe_load(tree["overlays/research/deployment-patch.yaml"])["spec"]["template"]["spec"]
    args = patch["containers"][0]["args"]
    assert [a for a in args if a.startswith("--load-model=")] == ["--load-model=generate"]
    assert "--engine-model=generate" in patch["initContainers"][0]["args"]


def test_model_names_match_the_repository_stage():
    from exporter.manifests.config import REPOSITORY_MODELS
    from exporter.repository import writer

    assert REPOSITORY_MODELS["decoder"] == (writer.LLM, writer.GENERATE)
    assert REPOSITORY_MODELS["encoder"] == (writer.ENCODER, writer.TOKENIZER, writer.EMBED)
    assert writer.VERSION == "1"  # node_engine's default --version-dir
    assert ManifestsConfig(model="minilm").served_models == ("encoder", "tokenizer", "embed")


def test_production_scales_research_and_edge_do_not(built):
    kinds = {name: {o["kind"] for o in objects} for name, objects in built.items()}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds["production"]
    for name in ("research", "edge"):
        assert not {"HorizontalPodAutoscaler", "PodDisruptionBudget"} & kinds[name]
    hpa = _one(built["production"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == QUEUE_TIME_METRIC
    assert "podAntiAffinity" in _pod(built["production"])["affinity"]
    for name in ("production", "research", "edge"):
        assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Service", "ConfigMap"} <= kinds[name]


def test_edge_uses_local_storage_and_the_int4_profile(built):
    pvc = _one(built["edge"], "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "local-storage"
    assert _one(built["edge"], "StorageClass")["provisioner"] == "kubernetes.io/no-provisioner"
    profile_cm = next(o for o in built["edge"] if o["kind"] == "ConfigMap" and "profiles.yaml" in o.get("data", {}))
    assert yaml.safe_load(profile_cm["data"]["profiles.yaml"])["edge"]["precision"] == "int4"
    assert _one(built["production"], "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_profile_configmap_round_trips_through_load_profiles(built, tmp_path):
    for name, objects in built.items():
        cm = next(o for o in objects if o["kind"] == "ConfigMap" and "profiles.yaml" in o.get("data", {}))
        path = tmp_path / f"{name}.yaml"
        path.write_text(cm["data"]["profiles.yaml"])
        assert load_profiles(path)[name] == load_profiles()[name]


def test_engine_build_init_container_and_labels(built):
    for name, objects in built.items():
        pod = _pod(objects)
        init = {c["name"]: c for c in pod["initContainers"]}
        assert init["engine-build"]["command"] == ["python3", "-m", "exporter.manifests.node_engine"]
        assert {"name": "R1DEPLOY_PROFILE", "value": name} in init["engine-build"]["env"]
        labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert labels["r1deploy.io/profile"] == name and labels["app.kubernetes.io/part-of"] == "r1deploy"


def test_s3_storage_syncs_with_secret_reference_only(tmp_path):
    out = tmp_path / "k8s"
    render_manifests(ManifestsConfig(out=out, storage="s3", storage_uri="s3://models/r1"))
    for overlay in ("production", "research", "edge"):
        objects = checks.kustomize_build(out / "overlays" / overlay)
        init = _pod(objects)["initContainers"]
        # the overlay patch names engine-build; the sync must still run first
        assert [c["name"] for c in init] == ["storage-sync", "engine-build"]
        assert init[0]["envFrom"] == [{"secretRef": {"name": "r1deploy-storage-credentials"}}]
        assert checks.check_objects(objects) == []


def test_dashboard_and_adapter_rule_read_only_triton_metrics():
    # decoders scale on the generate model's own queue (its scheduler queues inside the model), encoders on Triton's
    assert promql_metrics(ADAPTER_RULES[QUEUE_TIME_METRIC]["metricsQuery"]) == {
        "r1deploy_generate_queue_duration_us", "r1deploy_generate_requests_admitted"}
    assert promql_metrics(ADAPTER_RULES[TRITON_QUEUE_TIME_METRIC]["metricsQuery"]) == {
        "nv_inference_queue_duration_us", "nv_inference_request_success"}
    rules = yaml.safe_load((COMMITTED / "extras" / "prometheus-adapter-rules.yaml").read_text())
    assert sorted(r["name"]["as"] for r in rules["rules"]) == sorted([QUEUE_TIME_METRIC, TRITON_QUEUE_TIME_METRIC])
    deploy_doc = (REPO / "docs" / "deploy.md").read_text()
    assert QUEUE_TIME_METRIC in deploy_doc and "kubectl apply -k k8s/overlays/production" in deploy_doc


# --- negative tests: each rule catches its violation -------------------------------------------------------


def _break(objects: list[dict], kind: str, mutate) -> list[dict]:
    copied = copy.deepcopy(objects)
    mutate(next(o for o in copied if o["kind"] == kind))
    return copied


def _container(obj: dict, name: str = "triton") -> dict:
    return next(c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _no_run_as_non_root(d: dict) -> None:
    d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")
    _container(d)["securityContext"].pop("runAsNonRoot")


def _secret(objects: list[dict]) -> list[dict]:
    return objects + [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"key": "x"}}]


VIOLATIONS = {
    "privileged": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["securityContext"].update(privileged=True)),
        "container triton: privileged: true is not allowed (PSS restricted)",
    ),
    "privilege-escalation": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["securityContext"].update(allowPrivilegeEscalation=True)),
        "container triton: allowPrivilegeEscalation must be false (PSS restricted)",
    ),
    "capabilities": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["securityContext"].pop("capabilities")),
        "container triton: capabilities must drop ALL (PSS restricted)",
    ),
    "run-as-non-root": (
        lambda o: _break(o, "Deployment", _no_run_as_non_root),
        "container triton: runAsNonRoot must be true (PSS restricted)",
    ),
    "run-as-root": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["securityContext"].update(runAsUser=0)),
        "container triton: runAsUser must not be 0 (PSS restricted)",
    ),
    "seccomp": (
        lambda o: _break(o, "Deployment", lambda d: (
            d["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile"),
            _container(d)["securityContext"].pop("seccompProfile"),
        )),
        "container triton: seccompProfile.type must be RuntimeDefault or Localhost (PSS restricted)",
    ),
    "read-only-root": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False)),
        "container triton: readOnlyRootFilesystem must be true",
    ),
    "host-path": (
        lambda o: _break(o, "Deployment", lambda d: d["spec"]["template"]["spec"]["volumes"].append(
            {"name": "host", "hostPath": {"path": "/var/lib/models"}})),
        "volume host: hostPath volumes are not allowed (PSS restricted)",
    ),
    "host-network": (
        lambda o: _break(o, "Deployment", lambda d: d["spec"]["template"]["spec"].update(hostNetwork=True)),
        "hostNetwork: true is not allowed (PSS restricted)",
    ),
    "token": (
        lambda o: _break(o, "Deployment", lambda d: d["spec"]["template"]["spec"].pop("automountServiceAccountToken")),
        "automountServiceAccountToken must be false",
    ),
    "inline-secret-env": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})),
        "container triton: env AWS_SECRET_ACCESS_KEY holds an inline secret",
    ),
    "inline-secret-object": (_secret, "Secret/creds: Secret with inline data"),
    "bad-quantity": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["resources"]["limits"].update({"nvidia.com/gpu": "one"})),
        "resources.limits.nvidia.com/gpu: 'one' is not a valid quantity",
    ),
    "bad-memory": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["resources"]["requests"].update(memory="16GB")),
        "resources.requests.memory: '16GB' is not a valid quantity",
    ),
    "fractional-gpu": (
        lambda o: _break(o, "Deployment", lambda d: _container(d)["resources"]["limits"].update({"nvidia.com/gpu": "0.5"})),
        "extended resource '0.5' must be a whole number",
    ),
    "pdb-both": (
        lambda o: _break(o, "PodDisruptionBudget", lambda d: d["spec"].update(maxUnavailable=1)),
        "PodDisruptionBudget/r1-distill-tiny-triton: PodDisruptionBudget sets both minAvailable and maxUnavailable",
    ),
    "no-probes": (
        lambda o: _break(o, "Deployment", lambda d: _container(d).pop("readinessProbe")),
        "container triton: no readinessProbe",
    ),
    "no-liveness": (
        lambda o: _break(o, "Deployment", lambda d: _container(d).pop("livenessProbe")),
        "container triton: no livenessProbe",
    ),
    "no-resources": (
        lambda o: _break(o, "Deployment", lambda d: _container(d).pop("resources")),
        "container triton: no resources.limits.memory",
    ),
    "init-no-resources": (
        lambda o: _break(o, "Deployment", lambda d: d["spec"]["template"]["spec"]["initContainers"][0].pop("resources")),
        "init container engine-build: no resources.requests.cpu",
    ),
    "hpa-metric": (
        lambda o: _break(o, "HorizontalPodAutoscaler", lambda d: d["spec"]["metrics"][0]["pods"]["metric"].update(
            name="vllm_queue_time_seconds")),
        "HPA metric vllm_queue_time_seconds is not a metric Triton exports",
    ),
    "alert-metric": (
        lambda o: _break(o, "PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(
            expr='rate(container_cpu_usage_seconds_total{namespace="x"}[5m]) > 1')),
        "rule TritonQueueTimeHigh reads container_cpu_usage_seconds_total, which Triton does not export",
    ),
    "api-version": (
        lambda o: _break(o, "Deployment", lambda d: d.update(apiVersion="extensions/v1beta1")),
        "Deployment/r1-distill-tiny-triton: apiVersion extensions/v1beta1 is not allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_each_violation_is_caught(built, case):
    breaker, expected = VIOLATIONS[case]
    assert checks.check_objects(built["production"]) == []
    messages = [str(v) for v in checks.check_objects(breaker(built["production"]))]
    assert any(expected in m for m in messages), f"{expected!r} not in {messages}"


def test_kubernetes_validate_strict_catches_unknown_fields(built):
    broken = _break(built["production"], "Deployment", lambda d: _container(d).update(gpus=8))
    count, violations = checks.validate_builtin(broken)
    assert any("Additional properties are not allowed ('gpus'" in str(v) for v in violations), violations
    assert count == len([o for o in broken if not o["apiVersion"].startswith("monitoring.coreos.com")]) - 1


def test_crd_schemas_catch_bad_monitoring_objects_and_accept_go_regex(built):
    objects = built["production"]
    assert checks.validate_crds(objects, VENDORED_CRDS) == (2, [])
    bad_interval = _break(objects, "ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"))
    assert any("does not match" in str(v) for v in checks.validate_crds(bad_interval, VENDORED_CRDS)[1])
    # The schema's Go pattern `^(?i)(abort|warn)?$` is honoured: "WARN" passes, "bogus" fails.
    ok = _break(objects, "PrometheusRule", lambda d: d["spec"]["groups"][0].update(partial_response_strategy="WARN"))
    assert checks.validate_crds(ok, VENDORED_CRDS) == (2, [])
    bad = _break(objects, "PrometheusRule", lambda d: d["spec"]["groups"][0].update(partial_response_strategy="bogus"))
    assert any("partial_response_strategy" in str(v) for v in checks.validate_crds(bad, VENDORED_CRDS)[1])


@pytest.mark.parametrize("value", ["1", "500m", "1.5Gi", "2e3", "16Gi", ".5", "+1k", 8])
def test_valid_quantities(value):
    assert checks._is_quantity(value)


@pytest.mark.parametrize("value", ["one", "1.5.5", "Gi", "1gi", "16GB", "", True, "1 Gi"])
def test_invalid_quantities(value):
    assert not checks._is_quantity(value)


# --- the engine-build init container's decision ------------------------------------------------------------


def _engine_meta(**overrides):
    from exporter.core.typed import from_data
    from exporter.engine.metadata import EngineMetadata

    data = {
        "model": "r1-distill-tiny", "model_kind": "decoder", "deployment_profile": "production",
        "runtime": "tensorrt", "runtime_version": "10.11.0.33", "gpu_product": "NVIDIA-A100-SXM4-80GB",
        "compute_capabilities": ["8.0"], "hardware_compatible": False, "hardware_compatibility": "none",
        "precision": "fp16", "onnx_variant": "fp16", "onnx_sha256": "0", "engine_file": "model.plan",
        "engine_sha256": "0", "engine_bytes": 1, "strongly_typed": True, "max_batch_size": 64,
        "shape_profiles": [], "inputs": [], "outputs": [], "optimization_level": 3, "workspace_bytes": 1,
        "timing_cache": {"supported": False}, "build_seconds": 1.0, "reproduce": [],
    }
    return from_data(EngineMetadata, {**data, **overrides})


def test_node_engine_decides_when_to_rebuild():
    from exporter.core.profiles import normalize_cc
    from exporter.manifests.node_engine import decide

    production = load_profiles()["production"]
    assert decide(_engine_meta(), production, "8.0", "10.11.0.33")[0] is False
    assert decide(None, production, "8.0", "10.11.0.33") == (True, "no cached engine")
    rebuild, why = decide(_engine_meta(), production, "8.0", "10.13.0.35")
    assert rebuild and "10.13.0.35" in why
    rebuild, why = decide(_engine_meta(compute_capabilities=["8.9"]), production, "8.0", "10.11.0.33")
    assert rebuild and "compute capability" in why
    with pytest.raises(StageFailed, match="node GPU has compute capability 8.9"):
        decide(_engine_meta(), production, "8.9", "10.11.0.33")
    assert normalize_cc("SM89") == normalize_cc("8.9") == "8.9"


def test_node_engine_installs_the_plan_once(tmp_path):
    from exporter.manifests.node_engine import install_plan

    engine = tmp_path / "engines" / "production"
    engine.mkdir(parents=True)
    (engine / "model.plan").write_bytes(b"plan")
    (engine / "engine.json").write_text("{}")
    target = tmp_path / "model_repository" / "r1-distill-tiny" / "1"
    assert install_plan(engine, target) is True
    assert (target / "model.plan").read_bytes() == b"plan"
    assert install_plan(engine, target) is False


def test_node_engine_lock_failure_is_said_not_ignored(tmp_path, monkeypatch, capsys):
    """A filesystem without file locks cannot be made here, so flock is made to fail as on one (ENOLCK): the build
    goes on (every build writes atomically) but the init container's log says replicas may both build. Any
    other lock error stops it."""
    import errno
    import fcntl

    from exporter.core.errors import StageFailed
    from exporter.manifests import node_engine

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with node_engine._lock(tmp_path / ".edge.lock"):
        pass
    warning = json.loads(capsys.readouterr().err)
    assert warning["action"] == "warning" and "No locks available" in warning["why"] and "may each build" in warning["why"]

    def broken(fh, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(StageFailed, match="cannot lock .*Input/output error"), node_engine._lock(tmp_path / ".edge.lock"):
        pass


# --- the CLI -----------------------------------------------------------------------------------------------


def test_cli_renders_checks_and_prints_json(r1, tmp_path):
    proc = r1("--json", "manifests", "--out", str(tmp_path / "k8s"), "--check", env={"R1DEPLOY_CRD_SCHEMAS": str(VENDORED_CRDS)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["overlays"] == ["edge", "production", "research"]
    assert data["check"]["violations"] == [] and data["check"]["crd_validated"] == 6


def test_cli_bad_input_is_one_line_exit_2(r1, tmp_path):
    proc = r1("manifests", "--out", str(tmp_path / "k8s"), "--storage", "s3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --storage s3 needs --storage-uri s3://BUCKET/PREFIX"
    proc = r1("manifests", "--out", str(tmp_path / "k8s"), "--storage-size", "lots")
    assert proc.returncode == 2 and "lots" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_refuses_to_replace_a_foreign_directory(r1, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = r1("manifests", "--out", str(tmp_path))
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_check_failure_exits_1_naming_the_first_violation(monkeypatch, tmp_path, capsys):
    from exporter import cli
    from exporter.manifests import objects

    real = objects.pod_disruption_budget

    def both(cfg, profile):
        pdb = real(cfg, profile)
        pdb["spec"]["maxUnavailable"] = 1
        return pdb

    monkeypatch.setattr(objects, "pod_disruption_budget", both)
    monkeypatch.setenv("R1DEPLOY_CRD_SCHEMAS", str(VENDORED_CRDS))
    with pytest.raises(SystemExit) as exc:
        cli.main(["manifests", "--out", str(tmp_path / "k8s"), "--check"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 manifest check(s) failed; first: overlays/production: PodDisruptionBudget/")
    assert "sets both minAvailable and maxUnavailable" in err


def test_missing_kubectl_is_one_line(monkeypatch, tmp_path):
    from exporter.core.errors import MissingDependency

    monkeypatch.setattr(checks.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependency, match="kubectl not found"):
        checks.kubectl_binary()


def test_env_var_overrides_schema_dir(monkeypatch, tmp_path):
    (tmp_path / "monitoring.coreos.com").mkdir()
    monkeypatch.setenv("R1DEPLOY_CRD_SCHEMAS", str(tmp_path))
    assert checks.crd_schema_dir() == tmp_path
