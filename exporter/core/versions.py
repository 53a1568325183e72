"""The one version table (`data/versions.yaml`): Triton image release → its Triton, TensorRT, CUDA and Python.

    t = load_versions()
    r = t.release()                       # the default release (25.06)
    t.release_for_tensorrt("10.11")       # the release whose image ships that TensorRT (major.minor)
    engine_version_problem(meta, t)       # why an engine will not load in the Triton image, or None

`python -m exporter.core.versions --build-args` prints the `--build-arg` flags `make image` passes to the container
engine; `--tag` the image tag. Both come from the same table the manifests and the generated Dockerfiles use.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Optional

import yaml

from .errors import BadInput


@dataclass(frozen=True)
class TritonRelease:
    release: str  # NGC release, "25.06"
    triton: str  # Triton Inference Server version, "2.59.0"
    tensorrt: str  # TensorRT in the image, "10.11.0.33"
    cuda: str
    python: str  # the image's Python: the python backend runs it
    ubuntu: str

    @property
    def tensorrt_major_minor(self) -> str:
        return ".".join(self.tensorrt.split(".")[:2])


@dataclass(frozen=True)
class VersionTable:
    default_release: str
    triton_image: str
    tensorrt_image: str
    releases: dict[str, TritonRelease]
    tensorrt_rtx: str
    uid: int

    def release(self, name: Optional[str] = None) -> TritonRelease:
        name = name or self.default_release
        if name not in self.releases:
            raise BadInput(f"Triton release {name!r} is not in the version table (known: {', '.join(self.releases)})")
        return self.releases[name]

    def release_for_tensorrt(self, tensorrt_version: str) -> TritonRelease:
        want = ".".join(str(tensorrt_version).split(".")[:2])
        for r in self.releases.values():
            if r.tensorrt_major_minor == want:
                return r
        known = ", ".join(r.tensorrt_major_minor for r in self.releases.values())
        raise BadInput(f"no Triton release known for TensorRT {tensorrt_version} (known: {known}); pass --image")


def load_versions() -> VersionTable:
    raw = yaml.safe_load(resources.files("exporter").joinpath("data/versions.yaml").read_text())
    releases = {
        str(name): TritonRelease(release=str(name), **{k: str(v) for k, v in row.items()})
        for name, row in raw["releases"].items()
    }
    table = VersionTable(
        default_release=str(raw["default_release"]), triton_image=raw["triton_image"],
        tensorrt_image=raw["tensorrt_image"], releases=releases, tensorrt_rtx=str(raw["tensorrt_rtx"]),
        uid=int(raw["uid"]),
    )
    table.release()  # the default must be a row
    return table


def r1deploy_version() -> str:
    try:
        return metadata.version("r1deploy")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def image_tag(release: Optional[str] = None, table: Optional[VersionTable] = None) -> str:
    """`<r1deploy version>-<Triton release>`: both images of one deployment carry the same tag."""
    table = table or load_versions()
    return f"{r1deploy_version()}-{table.release(release).release}"


def build_args(release: Optional[str] = None, table: Optional[VersionTable] = None) -> dict[str, str]:
    """The Dockerfiles' ARGs (k8s/images/*/Dockerfile declare the same names with these defaults)."""
    table = table or load_versions()
    r = table.release(release)
    return {
        "TRITON_RELEASE": r.release,
        "TENSORRT_VERSION": r.tensorrt,
        "PYTHON_VERSION": r.python,
        "TENSORRT_RTX_VERSION": table.tensorrt_rtx,
        "UID": str(table.uid),
    }


def engine_version_problem(meta, table: Optional[VersionTable] = None, release: Optional[str] = None) -> Optional[str]:
    """Why an engine (its `engine.json` metadata) will not deserialize in the Triton image of `release`, or None.
    Full TensorRT: the engine's version must be the image's TensorRT (major.minor.patch). TensorRT-RTX: the pinned
    TensorRT-RTX version (the stock Triton image has no TensorRT-RTX backend at all; docs/serving.md)."""
    from .profiles import Runtime

    table = table or load_versions()
    r = table.release(release)
    built = str(meta.runtime_version).split(".")[:3]
    if meta.runtime is Runtime.TENSORRT and built != r.tensorrt.split(".")[:3]:
        return (f"engine built with TensorRT {meta.runtime_version} but the Triton {r.release} image runs TensorRT "
                f"{r.tensorrt}; rebuild it in the engine-build image (or pick the release that ships it)")
    if meta.runtime is Runtime.TENSORRT_RTX and built != table.tensorrt_rtx.split(".")[:3]:
        return (f"engine built with TensorRT-RTX {meta.runtime_version} but the images pin TensorRT-RTX "
                f"{table.tensorrt_rtx}; rebuild it")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporter.core.versions", description=__doc__.splitlines()[0])
    ap.add_argument("--release", default=None, help="Triton release (default: the table's default)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--build-args", action="store_true", help="print --build-arg flags for docker/podman/buildah")
    what.add_argument("--tag", action="store_true", help="print the image tag")
    args = ap.parse_args(argv)
    try:
        if args.build_args:
            print(" ".join(f"--build-arg {k}={v}" for k, v in build_args(args.release).items()))
        else:
            print(image_tag(args.release))
    except BadInput as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
