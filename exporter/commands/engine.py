from __future__ import annotations

from dataclasses import dataclass

import click

from ..core.profiles import Precision, Runtime
from ..core.ui import out as console
from ..engine import EngineConfig, EngineResult, build_engine, plan_build, trtexec_command
from ..engine.builder import graph_command
from ..engine.metadata import ENGINE_GRAPHS
from ..engine.trtexec import shell_line
from .common import App, emit, force_option, model_options, pass_app, profile_option


@dataclass
class TrtexecCommand:
    model: str
    deployment_profile: str
    argv: list[str]
    shell: str  # graph_argv (when there is one) && argv
    graph_argv: list[str]  # writes the serving graph `argv` reads; [] for the generic graph


def _human(r: EngineResult) -> None:
    for u in r.upstream:
        console.print(f"{u.stage}: {'up to date' if u.skipped else f'done in {u.seconds:.1f} s'} ({u.path})")
    verb = "up to date" if r.skipped else f"built in {r.build_seconds:.1f} s"
    ccs = ", ".join(r.compute_capabilities)
    console.print(
        f"[bold]{r.model}[/bold] {r.runtime.value} {r.runtime_version} engine for deployment profile "
        f"{r.deployment_profile} ({r.onnx_variant}, compute capability {ccs}) {verb}: {r.engine_path} "
        f"({r.engine_bytes / 1e6:.1f} MB)"
    )
    console.print(f"  shape profiles: {', '.join(r.shape_profiles)}; max batch {r.max_batch_size}")
    g = r.graph
    if g.form == "serving":
        console.print(f"  graph: serving — logits at the last position only, KV cache IO {g.kv_dtype}")
    elif g.logits:
        console.print(f"  graph: generic — logits at every position, KV cache IO {g.kv_dtype}")
    tc = r.timing_cache
    console.print(f"  timing cache: {tc.path + f' ({tc.loaded_bytes} B loaded)' if tc.supported else tc.note}")
    for w in r.warnings:
        console.print(f"  [yellow]warning:[/yellow] {w}")
    console.print(f"  metadata: {r.metadata_path}")


@click.command("build-engine")
@model_options
@profile_option(default="edge")
@click.option("--runtime", type=click.Choice([r.value for r in Runtime]), default=None,
              help="Engine runtime [default: the deployment profile's].")
@click.option("--precision", type=click.Choice([p.value for p in Precision]), default=None,
              help="Which ONNX variant to build (fp32 = the exported model) [default: the deployment profile's].")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None,
              help="Builder optimization level [default: the deployment profile's].")
@click.option("--workspace-gib", type=float, default=None, help="Workspace memory-pool limit [default: the deployment profile's].")
@click.option("--hardware-compatible/--no-hardware-compatible", default=None,
              help="Build for every Ampere-or-later GPU instead of only the profile's [default: the deployment profile's].")
@click.option("--prepare/--no-prepare", default=True, show_default=True,
              help="First run the stages the engine is built from (export, then the profile's quantization), each "
                   "skipped when up to date; --no-prepare builds only from ONNX already on disk.")
@click.option("--engine-graph", "graph", type=click.Choice(ENGINE_GRAPHS), default=None,
              help="What TensorRT is given for a decoder: serving (logits at the last position only, KV cache IO in "
                   "the compute dtype: fp16 for fp16 and int4) or generic (the ONNX variant as it is: logits at every "
                   "position, its own cache IO) [default: serving for decoders].")
@click.option("--no-timing-cache", is_flag=True, help="Neither load nor save the timing cache.")
@click.option("--print-trtexec", is_flag=True,
              help="Print the equivalent trtexec (TensorRT) / tensorrt_rtx (TensorRT-RTX) command and exit without building.")
@force_option
@pass_app
def command(app: App, model, allow_pickle, trust_remote_code, profile_name, runtime, precision, optimization_level,
            workspace_gib, hardware_compatible, prepare, graph, no_timing_cache, print_trtexec, force):
    """Build a TensorRT / TensorRT-RTX engine for a deployment profile from the quantized ONNX.

    The engine's TensorRT shape profiles (min/opt/max) come from the deployment profile's batch and length limits.
    Writes <workdir>/<model>/engines/<profile>/model.plan and engine.json. By default the export and quantize
    stages run first through their own caches (a fresh clone needs only this command; a second run rebuilds
    nothing); --force rebuilds the engine only."""
    cfg = EngineConfig(
        model=model, profile=app.profile(profile_name), workdir=app.workdir, runtime=runtime, precision=precision,
        optimization_level=optimization_level, workspace_gib=workspace_gib, hardware_compatible=hardware_compatible,
        graph=graph, timing_cache=not no_timing_cache, force=force, verbose=app.verbose,
    )
    if print_trtexec:
        plan = plan_build(cfg)
        argv, before = trtexec_command(plan), graph_command(plan)
        shell = " && ".join(shell_line(a) for a in (before, argv) if a)
        emit(app, TrtexecCommand(plan.model, plan.deployment_profile, argv, shell, before),
             lambda c: click.echo(c.shell))
        return
    upstream, rt = [], None
    if prepare:
        from ..engine.prepare import prepare_engine_inputs
        from ..engine.runtimes import load_runtime

        rt = load_runtime(cfg.runtime)  # a missing runtime is reported before minutes of export and quantization
        upstream = prepare_engine_inputs(cfg, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    result = build_engine(cfg, rt)
    result.upstream = upstream
    emit(app, result, _human)
