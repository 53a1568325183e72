"""The engine-build init container: `python3 -m exporter.manifests.node_engine` in the r1deploy image.

A TensorRT engine only runs on the GPU compute capability and the TensorRT version it was built with. Before
Triton starts, this compares the cached engine's `engine.json` with the node (compute capability from
`nvidia-smi`, the TensorRT version installed in the image) and, on a mismatch, rebuilds it on this node with
`r1deploy build-engine`, then copies it into the Triton model repository
(`<workdir>/<model>/model_repository/<profile>/<engine model>/1/`: `llm` for a plan Triton's TensorRT backend
loads, `generate` for a TensorRT-RTX plan, which the generate model runs in-process). Both live on the
model-repository volume, so the next pod on the same kind of node finds the engine cached.

Never run on a real cluster in this project (no GPU node here); the decision logic is unit-tested."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..core import artifacts
from ..core.errors import BadInput, StageFailed
from ..core.profiles import DeploymentProfile, Runtime, get_profile, load_profiles, normalize_cc
from ..engine.metadata import ENGINE_FILE, METADATA_FILE, EngineMetadata, ensure_compatible


def node_compute_capability() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, check=True
    ).stdout
    return normalize_cc(out.strip().splitlines()[0])


def installed_runtime_version(runtime: Runtime) -> str:
    """The TensorRT / TensorRT-RTX version in this image (R1DEPLOY_RUNTIME_VERSION overrides)."""
    if os.environ.get("R1DEPLOY_RUNTIME_VERSION"):
        return os.environ["R1DEPLOY_RUNTIME_VERSION"]
    from ..engine.runtimes import load_runtime

    return load_runtime(runtime).version


def decide(meta: Optional[EngineMetadata], profile: DeploymentProfile, node_cc: str, runtime_version: str) -> tuple[bool, str]:
    """(rebuild?, why) for a cached engine against this node: the engine stage's own portability guard, with the
    node's compute capability in place of the profile's and the image's runtime version pinned."""
    if normalize_cc(node_cc) != profile.gpu.compute_capability:
        raise StageFailed(
            f"node GPU has compute capability {node_cc} but profile {profile.name!r} targets "
            f"{profile.gpu.product} ({profile.gpu.compute_capability}); fix the nodeSelector or the profile"
        )
    if meta is None:
        return True, "no cached engine"
    try:
        ensure_compatible(meta, profile, runtime_version=runtime_version)
    except BadInput as exc:
        return True, exc.message
    return False, f"cached engine matches compute capability {node_cc} and {meta.runtime.value} {meta.runtime_version}"


def install_plan(engine_dir: Path, target_dir: Path) -> bool:
    """Copy model.plan + engine.json into Triton's model version directory (atomic per file); True if copied."""
    source = engine_dir / ENGINE_FILE
    target = target_dir / ENGINE_FILE
    if target.is_file() and artifacts.sha256_file(target) == artifacts.sha256_file(source):
        return False
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in (ENGINE_FILE, METADATA_FILE):
        if (engine_dir / name).is_file():
            tmp = target_dir / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(engine_dir / name, tmp)
            os.replace(tmp, target_dir / name)
    return True


# flock errors of a filesystem that has no locks (some NFS setups): building without the lock is still safe — every
# build writes atomically — but two replicas may then build the same engine at once, and the log must say so.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def _lock(path: Path):
    """Two replicas starting together on a shared (RWX) volume must not build into the same directory at once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise StageFailed(f"cannot lock {path}: {exc.strerror or exc}") from None
            print(json.dumps({"action": "warning", "why": f"cannot lock {path} ({exc.strerror or exc}): the filesystem "
                              "has no file locks; replicas starting together may each build the engine"}),
                  file=sys.stderr, flush=True)
        yield


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="node_engine", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--profiles", help="profiles YAML the engine is rebuilt with")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--engine-model", default="llm", help="Triton model that holds the engine (llm | encoder | generate)")
    ap.add_argument("--version-dir", default="1", help="Triton model version directory that holds model.plan")
    args = ap.parse_args(argv)

    engine_dir = args.workdir / args.model / "engines" / args.profile
    profile = get_profile(args.profile, load_profiles(Path(args.profiles) if args.profiles else None))
    with _lock(engine_dir.parent / f".{args.profile}.lock"):
        cached = (engine_dir / ENGINE_FILE).is_file() and (engine_dir / METADATA_FILE).is_file()
        meta = EngineMetadata.load(engine_dir / METADATA_FILE) if cached else None
        rebuild, why = decide(meta, profile, node_compute_capability(), installed_runtime_version(profile.runtime))
        if rebuild:
            # the CLI through this interpreter: the image installs r1deploy under a prefix, not on the default PATH
            cmd = [sys.executable, "-m", "exporter.cli", "--workdir", str(args.workdir)]
            cmd += ["--profiles", args.profiles] if args.profiles else []
            # --no-prepare: the claim holds the ONNX, not the checkpoint; only the engine is rebuilt here
            cmd += ["build-engine", "--model", args.model, "--profile", args.profile, "--no-prepare", "--force"]
            print(json.dumps({"action": "rebuild", "why": why, "command": cmd}), flush=True)
            subprocess.run(cmd, check=True)
        copied = install_plan(engine_dir, args.model_repository / args.engine_model / args.version_dir)
        print(json.dumps({"action": "rebuilt" if rebuild else "cached", "why": why, "installed": copied}), flush=True)
    return 0


if __name__ == "__main__":
    from ..core.errors import R1DeployError

    try:
        sys.exit(main())
    except (R1DeployError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
