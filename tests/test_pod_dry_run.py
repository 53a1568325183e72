"""Pod dry run: for each committed overlay, the Deployment kustomize renders is run here the way the kubelet would
run it — the init container's command and args, then the Triton container's — with `$(VAR)` expanded from the
container's env, `/models` and `/etc/r1deploy` remapped to a local directory (the profile file is the overlay's own
ConfigMap), the ports remapped to free local ports, and the CPU Triton (nvidia-pytriton's 2.51) in place of the GPU
image, until the readiness probe's path answers. A typo in Triton's flags or in the init container's command is
caught here, before a cluster sees it.

Stand-ins, because there is no GPU here: `nvidia-smi` is a two-line script printing the profile's compute
capability; the repository Triton serves is the profile's python_ort (CPU) variant at the path the manifests name
(the GPU variant needs the TensorRT backend). Full TensorRT is not installable here, so the production and research
init containers stop, as designed, at "TensorRT is not installed" (exit 2, one line); edge's TensorRT-RTX is real
and rebuilds the engine on this "node". Every Triton flag the overlays pass exists in Triton 2.51 (the image runs
2.59), so none is dropped."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from exporter.manifests import checks

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "k8s" / "overlays"
CC = {"edge": "8.9", "production": "8.0", "research": "8.0"}
STARTUP_DEADLINE_S = 300  # how long to wait for readiness before giving up (a hang guard, not a speed check)

pytestmark = pytest.mark.triton


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def _remap(value: str, root: Path) -> str:
    """A mount path at the start of an argument or of an option's value moves under `root`."""
    return re.sub(r"(^|=)(/models|/etc/r1deploy)(?=/|$)", lambda m: f"{m.group(1)}{root}{m.group(2)}", value)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A local stand-in for the model-repository volume: an r1deploy workdir with the tiny model exported and
    quantized for edge, and each profile's CPU repository where the manifests look for it."""
    from exporter.core.profiles import ServingVariant, load_profiles
    from exporter.export import ExportConfig, export_model
    from exporter.repository import RepositoryConfig, write_repository
    from quantize import QuantizeConfig, quantize_model

    pytest.importorskip("pytriton", reason="the CPU Triton comes from nvidia-pytriton (r1deploy[serve])")
    root = tmp_path_factory.mktemp("node")
    models = root / "models"
    export_model(ExportConfig(model="r1-distill-tiny", workdir=models))
    profiles = load_profiles()
    quantize_model(QuantizeConfig(model="r1-distill-tiny", workdir=models, profile=profiles["edge"]))
    for name, profile in profiles.items():
        write_repository(RepositoryConfig(model="r1-distill-tiny", profile=profile, workdir=models,
                                          variant=ServingVariant.PYTHON_ORT,
                                          out=models / "r1-distill-tiny" / "model_repository" / name))
    (root / "bin").mkdir()
    return root


def _pod(overlay: str) -> tuple[dict, dict]:
    objects = checks.kustomize_build(OVERLAYS / overlay)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    configmap = next(o for o in objects if o["kind"] == "ConfigMap" and "profiles.yaml" in o.get("data", {}))
    return deployment["spec"]["template"]["spec"], configmap


def _container_env(container: dict, root: Path) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env["HOME"] = str(root / "home")
    return env


@pytest.mark.parametrize("overlay", sorted(p.name for p in OVERLAYS.iterdir()))
def test_overlay_pod_starts_here(overlay, node, tmp_path):
    from exporter.serve import ServerConfig, TritonServer, free_ports

    spec, configmap = _pod(overlay)
    (node / "etc" / "r1deploy").mkdir(parents=True, exist_ok=True)
    (node / "etc" / "r1deploy" / "profiles.yaml").write_text(configmap["data"]["profiles.yaml"])
    profile = yaml.safe_load(configmap["data"]["profiles.yaml"])
    assert list(profile) == [overlay]
    smi = node / "bin" / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {CC[overlay]}\n")
    smi.chmod(0o755)
    (node / "home").mkdir(exist_ok=True)
    path = os.pathsep.join([str(node / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")])

    # 1. the init container (pvc storage: only engine-build)
    [init] = spec["initContainers"]
    env = _container_env(init, node)
    argv = [_remap(_expand(a, env), node) for a in init["command"] + init["args"]]
    assert argv[:3] == ["python3", "-m", "exporter.manifests.node_engine"]
    argv[0] = sys.executable  # the image's python3 is this interpreter here
    res = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, **env, "PATH": path, "PYTHONPATH": str(REPO)})
    if overlay == "edge":
        assert res.returncode == 0, res.stdout + res.stderr
        assert '"action": "rebuilt"' in res.stdout or '"action": "cached"' in res.stdout
        # the generate model runs a TensorRT-RTX plan in-process: the init container installs it beside generate
        placed = node / "models" / "r1-distill-tiny" / "model_repository" / "edge" / "generate" / "1" / "model.plan"
        assert placed.is_file() and placed.stat().st_size > 0
    else:
        # full TensorRT cannot be installed here: the init script gets as far as asking for it
        assert res.returncode == 2, res.stdout + res.stderr
        assert "pip install 'r1deploy[gpu]'" in res.stderr and res.stderr.count("\n") == 1
        assert "unrecognized arguments" not in res.stderr

    # 2. the Triton container: its command and args, remapped, on the CPU Triton
    # the pod's other container is the OpenAI gateway (tests/test_gateway.py runs its arguments)
    triton = next(c for c in spec["containers"] if c.get("command") == ["tritonserver"])
    env = _container_env(triton, node)
    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3, "127.0.0.1"), strict=True))
    args = []
    for a in [_remap(_expand(x, env), node) for x in triton["args"]]:
        for name in ports:
            a = re.sub(rf"^--{name}-port=\d+$", f"--{name}-port={ports[name]}", a)
        args.append(a)
    assert triton["command"] == ["tritonserver"]
    repo = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
    assert Path(repo).is_dir(), f"{repo}: the overlay's repository path is not where the repository stage writes"
    # the CPU bundle's binary, backend/cache dirs and library path (what `r1deploy serve` adds), loopback only
    cpu_argv, cpu_env = TritonServer(ServerConfig(model_repository=Path(repo))).command()
    bundle = [a for a in cpu_argv[1:] if a.startswith(("--backend-directory=", "--cache-directory="))]
    local = [f"--{name}-address=127.0.0.1" for name in ports]
    log = open(tmp_path / "tritonserver.log", "wb")
    proc = subprocess.Popen([cpu_argv[0], *args, *bundle, *local], stdout=log, stderr=subprocess.STDOUT,
                            env={**cpu_env, **env}, start_new_session=True)
    probe = triton["startupProbe"]["httpGet"]["path"]
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}{probe}", timeout=2) as r:
                    ready = r.status == 200
            except (urllib.error.URLError, OSError):
                pass
            if ready:
                break
            time.sleep(0.5)
        out = (tmp_path / "tritonserver.log").read_text(errors="replace")
        assert ready, f"{overlay}: {probe} never answered 200 (exit {proc.poll()}):\n{out[-3000:]}"
        assert "unrecognized option" not in out.lower()
        # readiness and liveness ask the generate model itself (`r1deploy health`, exporter/health.py): run the
        # exec probes as the kubelet would, against this server
        for kind in ("readinessProbe", "livenessProbe"):
            command = triton[kind]["exec"]["command"]
            assert command[:4] == ["python3", "-m", "exporter.cli", "health"], command
            argv = [sys.executable, *command[1:]]
            argv = [re.sub(r"^--triton=localhost:\d+$", f"--triton=127.0.0.1:{ports['grpc']}", a) for a in argv]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
            assert res.returncode == 0, f"{overlay} {kind}: {res.stdout}{res.stderr}"
            assert "generate at 127.0.0.1" in res.stdout and "ok" in res.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        # the whole group: a python-backend stub outlives a server that was killed (seen orphaned here when a
        # server's SIGTERM exit outlasted the wait)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
