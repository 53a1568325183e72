"""benchmarks/gpu_smoke.py (issue 21 item 5) on a machine without a GPU: it says so in one line and exits 2, before
building anything. (Its GPU rows can only run where a GPU is; `--rehearse 8.9` exercises the rest by hand:
docs/benchmarks.md "GPU smoke".)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    # no nvidia-smi on PATH (only the interpreter's directory and the system's), so only torch / cuda-python could
    # find a GPU — and here they find none
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)


def test_no_gpu_is_one_line_and_exit_2(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    smoke = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = smoke  # its dataclasses look their module up there
    spec.loader.exec_module(smoke)
    if smoke.find_gpu() is not None:
        pytest.skip("this machine has a GPU: run the script itself")
    res = _run("--workdir", str(tmp_path / "wd"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "gpu_smoke: no GPU found (nvidia-smi, torch.cuda and cuda-python see none); run it on a GPU machine"]
    assert res.stdout == "" and not (tmp_path / "wd").exists()  # nothing built
    bad = _run("--models", "tiny,70b")
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu_smoke: unknown model '70b' (tiny, 122m)"
