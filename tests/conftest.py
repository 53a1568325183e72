"""Shared fixtures. Exports are done once per test session and shared (read-only) by every test module."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
R1DEPLOY = Path(sys.executable).parent / "r1deploy"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def session_workdir(tmp_path_factory) -> Path:
    """One working directory for the whole session: stages run once and later tests reuse them."""
    return tmp_path_factory.mktemp("workdir")


@pytest.fixture(scope="session")
def exported(session_workdir):
    """`exported("r1-distill-tiny")` → ExportResult, exporting at most once per session."""
    from exporter.export import ExportConfig, export_model

    cache: dict = {}

    def get(model: str):
        if model not in cache:
            cache[model] = export_model(ExportConfig(model=model, workdir=session_workdir))
        return cache[model]

    return get


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console script, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(R1DEPLOY), *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout, env=full_env
    )


@pytest.fixture
def r1():
    return run_cli


@pytest.fixture(scope="session")
def exported_fused(session_workdir):
    """`exported_fused("r1-distill-tiny")` → ExportResult of `export --graph fused`, at most once per session."""
    from exporter.export import ExportConfig, export_model

    cache: dict = {}

    def get(model: str):
        if model not in cache:
            cache[model] = export_model(ExportConfig(model=model, workdir=session_workdir, graph="fused"))
        return cache[model]

    return get


def assert_one_line(proc: subprocess.CompletedProcess, code: int, needle: str) -> str:
    """The error contract: exit `code`, exactly one `error:` line on stderr, printed last, containing `needle`,
    and no traceback. Returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0], "the error is the last thing printed"
    assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    return errors[0]


def copy_workdir(src: Path, dest: Path, model: str) -> Path:
    """A private copy of a session workdir's model (its export, tokenizer and generated checkpoint): a test that
    writes engines or repositories there changes nothing another test reads."""
    for rel in (model, f"models/{model}"):
        if (src / rel).is_dir():
            import shutil

            shutil.copytree(src / rel, dest / rel, symlinks=True,
                            ignore=lambda d, names: [n for n in names if n in ("engines", "model_repository", "bench", "k8s")])
    return dest


@contextlib.contextmanager
def gateway_beside_triton(repositories: list[Path], key_file: Path, key: str):
    """A real CPU Triton serving `repositories` and the `r1deploy gateway` process in front of it, with the API key
    `key` (written to `key_file`): yields the gateway's base URL once /health answers 200; on exit both stop, and the
    gateway must have exited 0 without a traceback."""
    import signal

    from test_gateway import _wait_http

    from exporter.serve import ServerConfig, TritonServer, free_port

    srv = TritonServer(ServerConfig(model_repository=repositories[0], extra_repositories=list(repositories[1:])))
    srv.start()
    key_file.write_text(key + "\n")
    port = free_port()
    argv = [str(R1DEPLOY), "gateway", "--triton", srv.endpoints.grpc, "--port", str(port), "--api-key-file", str(key_file)]
    for repo in repositories:
        argv += ["--repository", str(repo)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        srv.stop()
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
