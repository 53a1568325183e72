from __future__ import annotations

import click

from ..core.errors import BadInput, StageFailed
from ..core.ui import out as console
from .common import App, emit, pass_app


@click.command("health")
@click.option("--triton", default="127.0.0.1:8001", show_default=True, help="Triton's gRPC endpoint HOST:PORT.")
@click.option("--model", default="generate", show_default=True, help="The model to probe (the LLM entry model).")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for the answer.")
@pass_app
def command(app: App, triton, model, timeout):
    """Probe a served LLM model itself (not only Triton's port): exit 0 when its process, scheduler loop and sender
    answer, 1 when not — the Kubernetes liveness/readiness exec probe of the Triton container."""
    import math

    from ..health import check

    host, sep, port = triton.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadInput(f"--triton must be HOST:PORT (Triton's gRPC endpoint), got {triton!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise BadInput(f"--timeout must be a number of seconds > 0, got {timeout}")
    health = check(triton, model, timeout)
    if not health.ok:
        raise StageFailed(f"{model} at {triton} is unhealthy: {health.why}")
    emit(app, health, lambda h: console.print(f"{model} at {triton}: ok ({h.latency_s * 1000:.1f} ms) {h.detail}"))
