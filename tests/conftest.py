"""Shared fixtures. Exports are done once per test session and shared (read-only) by every test module."""

from __future__ import annotations

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
