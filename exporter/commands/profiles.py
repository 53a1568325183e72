from __future__ import annotations

import click
from rich.table import Table

from ..core.ui import out as console
from .common import App, emit, pass_app


def _human(profiles: dict) -> None:
    table = Table(title="Deployment profiles")
    for col in ("name", "GPU", "GPUs/pod", "precision", "runtime", "max batch", "in/out len", "replicas", "SLO", "gate"):
        table.add_column(col)
    for p in profiles.values():
        slo = ", ".join(f"{k}={v:g}" for k, v in vars(p.slo).items() if v is not None)
        table.add_row(
            p.name, f"{p.gpu.product} ({p.gpu.sm})", str(p.gpus_per_pod), p.precision.value, p.runtime.value,
            str(p.max_batch_size), f"{p.max_input_len}/{p.max_output_len}", f"{p.replicas}..{p.max_replicas}", slo,
            f"cos≥{p.accuracy.min_cosine:g} top1≥{p.accuracy.min_top1:g}",
        )
    console.print(table)


@click.command("profiles")
@pass_app
def command(app: App):
    """List the deployment profiles (built-in plus --profiles FILE)."""
    emit(app, app.profiles, _human)
