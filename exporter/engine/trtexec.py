"""The command line that reproduces a build outside r1deploy: `trtexec` (full TensorRT) or `tensorrt_rtx`
(TensorRT-RTX's equivalent, from its SDK tarball). Recorded in engine.json and printed by `--print-trtexec`.

Neither tool is installed here, so these command lines are written from the tools' documented flags and have
not been run on this machine. Each repeated --minShapes/--optShapes/--maxShapes triple adds one shape profile,
in the order the builder adds them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..core.profiles import Runtime
from .shapes import ShapeProfile


def _shapes(profile: ShapeProfile, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(r, which))}" for name, r in profile.inputs.items())


def reproduce_command(
    *,
    runtime: Runtime,
    onnx_path: Path,
    engine_path: Path,
    shape_profiles: list[ShapeProfile],
    workspace_bytes: int,
    optimization_level: int,
    compute_capabilities: list[str],
    hardware_compatible: bool,
    timing_cache_path: Path | None,
) -> list[str]:
    rtx = Runtime(runtime) is Runtime.TENSORRT_RTX
    argv = ["tensorrt_rtx" if rtx else "trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if not rtx:
        argv.append("--stronglyTyped")
    for p in shape_profiles:
        argv += [f"--minShapes={_shapes(p, 'min')}", f"--optShapes={_shapes(p, 'opt')}", f"--maxShapes={_shapes(p, 'max')}"]
    argv.append(f"--memPoolSize=workspace:{max(1, workspace_bytes >> 20)}M")
    if rtx:
        argv.append("--computeCapabilities=" + ",".join(cc.replace(".", "") for cc in compute_capabilities))
    else:
        argv.append(f"--builderOptimizationLevel={optimization_level}")
        if timing_cache_path is not None:
            argv.append(f"--timingCacheFile={timing_cache_path}")
        if hardware_compatible:
            argv.append("--hardwareCompatibilityLevel=ampere+")
    argv.append("--skipInference")
    return argv


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)
