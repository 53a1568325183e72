from __future__ import annotations

from dataclasses import dataclass, field

import click
from rich.table import Table

from ..core.profiles import Precision
from ..core.ui import out as console
from ..plan import GIB, GRAPHS, REAL_FAMILY, CapacityPlan, PlanConfig, load_shape, plan_capacity
from .common import App, emit, pass_app


@dataclass
class PlanReport:
    plans: list[CapacityPlan] = field(default_factory=list)


def _tps(p: CapacityPlan, value: float) -> str:
    return f"{value:,.0f}" if p.planned_batch else "—"


def _human(r: PlanReport) -> None:
    by_model: dict[str, list[CapacityPlan]] = {}
    for p in r.plans:
        by_model.setdefault(p.model, []).append(p)
    for model, plans in by_model.items():
        first = plans[0]
        n = first.parameters
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        kv = sorted({(p.kv_bytes_per_token, p.kv_dtype) for p in plans})
        kv_text = ", ".join(f"{b / 1024:.1f} KiB/token ({d})" for b, d in kv)
        table = Table(title=f"{model}: {size} parameters, KV {kv_text}, {first.graph} graph", title_justify="left")
        for col in ("profile", "precision", "weights", "GPU memory at limits", "fits", "max seqs", "batch",
                    "GPUs/replica", "tok/s b=1", "tok/s batch", "SLO tok/s"):
            table.add_column(col, justify="left" if col in ("profile", "precision", "fits") else "right")
        for p in plans:
            slo = "—" if p.slo_tokens_per_s is None else (
                f"{p.slo_tokens_per_s:g}" + {True: " met", False: " missed", None: ""}[p.meets_slo])
            fits = "[green]yes[/]" if p.fits else ("[yellow]reduced[/]" if p.planned_batch else "[red]no[/]")
            w = p.weights.total
            table.add_row(
                p.profile, p.precision, f"{w / GIB:.1f} GiB" if w >= GIB / 10 else f"{w / (1 << 20):.1f} MiB",
                f"{p.memory_at_limits.total / GIB:.1f} / {p.gpu_memory_bytes / GIB:.0f} GiB", fits,
                str(p.max_concurrent_sequences), f"{p.planned_batch}/{p.max_batch_size}", str(p.gpus_per_replica),
                _tps(p, p.decode_tokens_per_s_batch1), _tps(p, p.decode_tokens_per_s_planned), slo,
            )
        console.print(table)
        for p in plans:
            if p.planned_batch < 1:
                console.print(f"  [red]{p.profile}/{p.precision}:[/] {p.refusal()}")
    console.print(
        "GPU memory at limits (serving): weights + KV for max batch × (max input + max output) tokens + one max "
        "prefill's activations and logits (the last position's on the serving and fused graphs, every position's on "
        "the generic graph) + 1 GiB runtime; the engine build (weights + builder workspace + runtime) "
        "must fit the GPU too, before serving. max seqs: sequences of that length the memory left holds. "
        "tok/s: decode upper bound per GPU from memory bandwidth (one replica per GPU)."
    )


@click.command("plan")
@click.option("--model", "models", multiple=True,
              help=f"Config-only preset ({', '.join(REAL_FAMILY)}), a tiny preset, a checkpoint directory or a "
                   "config.json; repeatable [default: the whole R1 family].")
@click.option("--profile", "profile_names", multiple=True, help="Deployment profile; repeatable [default: every profile].")
@click.option("--precision", type=click.Choice(["profile", "all", *[p.value for p in Precision]]), default="profile",
              show_default=True, help="Weights precision: the profile's, one given, or fp16 and int4 side by side (all).")
@click.option("--kv-dtype", type=click.Choice(["fp32", "fp16"]), default=None,
              help="KV-cache element type [default: the graph's: serving — fp16 for fp16 and int4, fp32 for fp32; "
                   "generic — fp32 (fp16 after `quantize --fp16-io`); fused — fp16 for its fp16 variant, else fp32].")
@click.option("--graph", type=click.Choice(GRAPHS), default="serving", show_default=True,
              help="The served graph: serving (r1deploy's TensorRT engines: logits at the last position only, KV cache "
                   "in the compute dtype), generic (the ONNX as exported, e.g. `build-engine --engine-graph generic` "
                   "or ONNX Runtime: logits at every prompt position) or fused (ONNX Runtime; the last position).")
@pass_app
def command(app: App, models, profile_names, precision, kv_dtype, graph):
    """Capacity plan from config.json alone: parameters, weight bytes, KV bytes per token, memory per GPU at each
    profile's limits, whether it fits, the largest batch that does, GPUs a replica needs and a decode tokens/s bound."""
    profiles = {n: app.profile(n) for n in profile_names} if profile_names else app.profiles
    report = PlanReport()
    for spec in models or REAL_FAMILY:
        shape = load_shape(spec, app.workdir)
        for profile in profiles.values():
            if precision == "profile":
                precisions = [profile.precision]
            elif precision == "all":
                precisions = [Precision.FP16, Precision.INT4]
            else:
                precisions = [Precision(precision)]
            for prec in precisions:
                report.plans.append(plan_capacity(PlanConfig(shape, profile, prec, kv_dtype, graph), app.profiles))
    emit(app, report, _human)
