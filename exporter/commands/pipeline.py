from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from ..core.errors import StageFailed
from ..core.ui import out as console
from ..pipeline import PipelineConfig, PipelineResult, StageSummary, run_pipeline
from .common import App, emit, force_option, model_options, pass_app

_STYLE = {"ok": "green", "skipped": "yellow", "incomplete": "yellow", "failed": "red"}


def _table(result: PipelineResult) -> Table:
    table = Table(title=f"r1deploy pipeline — {result.model} (workdir {result.workdir})", show_lines=False)
    for col in ("stage", "status", "what", "where", "s"):
        table.add_column(col, overflow="fold")
    for s in result.stages:
        table.add_row(s.stage, f"[{_STYLE[s.status]}]{s.status}[/]", escape(s.detail), escape(str(s.path or "")), f"{s.seconds:.1f}")
    return table


@click.command("pipeline")
@model_options
@click.option("--serve/--no-serve", default=True, show_default=True, help="Serve the CPU variant on a real Triton and send one request.")
@click.option("--bench/--no-bench", default=True, show_default=True, help="A short `r1deploy bench` against the served model.")
@click.option("--bench-seconds", type=float, default=1.0, show_default=True, help="Length of each bench window.")
@click.option("--profile", "profile_names", multiple=True, help="Deployment profiles to build for (default: all).")
@click.option("--strict", is_flag=True,
              help="Exit 1 unless every stage is ok (none skipped or incomplete): for a run that must produce every deployable artifact.")
@force_option
@pass_app
def command(app: App, model, allow_pickle, trust_remote_code, serve, bench, bench_seconds, profile_names, strict, force):
    """Run every stage on one model and print one summary table.

    Exit 0 when no stage failed (rows may say skipped or incomplete: on a CPU-only machine the GPU engines cannot
    be built), 2 for bad input, 1 when a stage failed; with --strict also 1 when a stage is skipped or incomplete."""
    profiles = {n: app.profile(n) for n in profile_names} if profile_names else app.profiles
    cfg = PipelineConfig(
        model=model, workdir=app.workdir, profiles=profiles, serve=serve, bench=bench, bench_seconds=bench_seconds,
        force=force, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
    )

    def progress(stage: StageSummary) -> None:
        if not app.quiet and not app.as_json:
            from ..core.ui import console as err

            err.print(f"[{_STYLE[stage.status]}]{stage.status:>7}[/] {stage.stage}: {escape(stage.detail)}", highlight=False)

    try:
        result = run_pipeline(cfg, on_stage=progress)
    except Exception as exc:
        partial = getattr(exc, "partial_result", None)
        if partial is not None:  # the summary so far (and --json), then the one-line error
            emit(app, partial, lambda r: console.print(_table(r)))
        raise
    emit(app, result, lambda r: console.print(_table(r)))
    short = [s for s in result.stages if s.status in ("skipped", "incomplete")]
    if strict and short:
        raise StageFailed(f"--strict: {len(short)} stage(s) not ok: " + "; ".join(f"{s.stage} {s.status}" for s in short))
