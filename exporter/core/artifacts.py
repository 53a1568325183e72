"""The working-directory layout, stage manifests and atomic writes.

Layout under `--workdir` (default `build/`)::

    models/<preset>/                    generated preset checkpoints
    <model>/tokenizer/                  tokenizer files copied from the checkpoint
    <model>/onnx/fp32/                  export stage: model.onnx (+ model.onnx.data), export_report.json
    <model>/onnx/<variant>/             quantize stage: fp16, int4-awq-b128-qdq, ...
    <model>/engines/<deployment profile>/  engine stage: model.plan + engine.json
    <model>/timing-cache/               TensorRT timing caches, keyed by runtime, version and GPU

Every stage directory carries `manifest.json`: sha256 of its inputs and outputs, its config and the tool
versions. A stage whose fingerprint (inputs + config + tools) is unchanged is skipped. Stages write into a
temporary sibling directory and rename it into place only when complete, so an interrupted run never leaves a
half-written model where the next stage reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import BadInput

MANIFEST = "manifest.json"
EXPORT_REPORT = "export_report.json"  # in <model>/onnx/fp32/, written by the export stage
# What the export stage copies from a checkpoint into <model>/tokenizer/, and the repository stage next to its
# python models.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
)


PRESETS = ("r1-distill-tiny", "r1-moe-tiny", "minilm")  # the embedded models (exporter/sources.py resolves them)


def model_dir_name(spec: str | Path) -> str:
    """The build-directory name of a model (`<workdir>/<name>/`): the preset name, else the checkpoint folder's
    own name. Cheap on purpose: later stages find an earlier stage's output without loading the model."""
    spec = str(spec)
    return spec if spec in PRESETS else Path(spec).expanduser().resolve().name


@dataclass(frozen=True)
class ModelLayout:
    workdir: Path
    model: str

    @classmethod
    def for_model(cls, workdir: Path, spec: str | Path) -> ModelLayout:
        """The layout of a model named as the user names it (a preset or a checkpoint directory)."""
        return cls(Path(workdir), model_dir_name(spec))

    def has_export(self, graph: str = "generic") -> bool:
        """Whether the export stage's fp32 output (of the generic or the fused graph) and the tokenizer are here."""
        variant = onnx_variant("fp32", graph=graph)
        return (self.onnx_dir(variant) / EXPORT_REPORT).is_file() and self.tokenizer_dir.is_dir()

    @property
    def root(self) -> Path:
        return self.workdir / self.model

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def onnx_dir(self, variant: str = "fp32") -> Path:
        return self.root / "onnx" / variant

    def onnx_path(self, variant: str = "fp32") -> Path:
        return self.onnx_dir(variant) / "model.onnx"

    def engine_dir(self, deployment_profile: str) -> Path:
        return self.root / "engines" / deployment_profile

    @property
    def timing_cache_dir(self) -> Path:
        return self.root / "timing-cache"


def onnx_files(onnx_path: Path) -> list[Path]:
    """An ONNX model's files: the graph file and its external data files (model.onnx, model.onnx.data), sorted."""
    return sorted(f for f in onnx_path.parent.iterdir() if f.is_file() and f.name.startswith(onnx_path.name))


def onnx_bytes(onnx_path: Path) -> int:
    """Size on disk of an ONNX model, external data included."""
    return sum(f.stat().st_size for f in onnx_files(onnx_path))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_files(paths: list[Path] | tuple[Path, ...], root: Path | None = None) -> dict[str, str]:
    out = {}
    for p in sorted(paths):
        key = str(p.relative_to(root)) if root else str(p)
        out[key] = sha256_file(p)
    return out


def tool_versions(*names: str) -> dict[str, str]:
    names = names or ("r1deploy", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def fingerprint(inputs: dict[str, str], config: dict[str, Any], tools: dict[str, str]) -> str:
    payload = json.dumps({"inputs": inputs, "config": config, "tools": tools}, sort_keys=True, default=str)
    return sha256_text(payload)


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys are NOT used: field order is meaningful to readers)."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(stage_dir: Path, fp: str) -> bool:
    """True when the stage directory is complete and was produced from the same fingerprint."""
    manifest = read_manifest(stage_dir)
    if not manifest or manifest.get("fingerprint") != fp:
        return False
    for rel, meta in manifest.get("outputs", {}).items():
        f = stage_dir / rel
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            return False
    return True


def write_manifest(stage_dir: Path, *, stage: str, fp: str, inputs: dict[str, str], config: dict, tools: dict) -> dict:
    outputs = {}
    for f in sorted(stage_dir.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            outputs[str(f.relative_to(stage_dir))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "inputs": inputs,
        "outputs": outputs,
        "config": config,
        "tools": tools,
    }
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def ensure_writable_dir(path: Path) -> None:
    """Create `path` (and parents) or raise one clear BadInput line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"output directory is not writable: {path}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>`) that an r1deploy
    process left when it was killed: only names this module makes, and only when that process is gone (a
    concurrent run's are kept). Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp-(\d+)-.+|old-(\d+))")
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1) or m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` in one rename. The sibling's name
    carries this process's id, so a later run can tell a killed run's leftovers from a concurrent run's."""
    ensure_writable_dir(final.parent)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        # mkdtemp makes the directory private (0700); a finished stage gets the mode any new directory gets
        # (umask), so e.g. a Triton container running as another user can read a model repository
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def onnx_variant(precision: str, method: str | None = None, block_size: int | None = None, fmt: str | None = None,
                 graph: str = "generic") -> str:
    """Directory name of an ONNX variant under `<model>/onnx/`: fp32, fp16, int4-awq-b128-qdq, ...; the fused
    graph (exporter.fused_graph) has its own directories (fp32-fused, int4-awq-b32-ort-fused), so generic
    artifacts are never touched by it."""
    precision = getattr(precision, "value", precision)
    graph = getattr(graph, "value", graph)
    suffix = "" if graph == "generic" else f"-{graph}"
    if precision in ("fp32", "fp16"):
        return precision + suffix
    if precision == "int4":
        return f"int4-{method}-b{block_size}-{fmt}{suffix}"
    raise ValueError(f"unknown precision {precision!r}")


def profile_onnx_variant(profile) -> str:
    """The ONNX variant a deployment profile deploys (its precision and quantization settings)."""
    q = profile.quantization
    return onnx_variant(profile.precision, q.method, q.block_size, q.format)


def read_export_report(layout: ModelLayout, variant: str = "fp32") -> dict:
    """The export stage's report (kind, input/output names, cache layout); BadInput if not exported yet or if
    the report is unreadable (a damaged or hand-edited workdir)."""
    path = layout.onnx_dir(variant) / EXPORT_REPORT
    flag = " --graph fused" if variant.endswith("-fused") else ""
    if not path.is_file():
        raise BadInput(f"{layout.model} has not been exported yet (no {path}); run `r1deploy export --model {layout.model}{flag}` first")
    try:
        report = json.loads(path.read_text())
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise BadInput(f"{path} is corrupt (not a JSON object); rerun `r1deploy export --model {layout.model}{flag} --force`")
    return report


# A name that becomes one path component (profile, model, ONNX variant): no separators, no "..", nothing hidden.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(name: object, what: str) -> str:
    """`name` if it is safe as one directory name (and as a Kubernetes/Triton name part); BadInput otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BadInput(
            f"{what} {name!r} is not a valid name: use letters, digits, '.', '_' and '-' (starting with a letter or "
            "digit, at most 63 characters, no '..')"
        )
    return name


def check_replaceable(out: Path, owned: Callable[[Path], bool], what: str = "--out") -> None:
    """Refuse to replace `out` unless r1deploy wrote everything in it: a regular file, or a directory holding
    anything `owned(entry)` does not recognise, is the user's and is never deleted."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInput(f"refusing to replace {what} {out}: it exists and is not a directory r1deploy wrote")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not owned(p))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise BadInput(f"refusing to replace {what} {out}: it holds {shown}, which r1deploy did not write")
