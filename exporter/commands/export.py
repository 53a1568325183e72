from __future__ import annotations

import click

from ..core.ui import out as console
from ..export import ExportConfig, Exporter, ExportResult, GraphForm, export_model
from .common import App, emit, force_option, memory_check_option, model_options, pass_app


def _human(r: ExportResult) -> None:
    verb = "up to date" if r.skipped else f"exported in {r.seconds:.1f} s"
    console.print(f"[bold]{r.model}[/bold] ({r.architecture}, {r.kind.value}) {verb}: {r.onnx_path} ({r.onnx_bytes / 1e6:.1f} MB)")
    if r.max_abs_diff:
        worst = max(r.max_abs_diff.items(), key=lambda kv: kv[1])
        console.print(f"  verified on {len(r.cases) or 'earlier'} shapes; worst max abs diff {worst[1]:.2e} ({worst[0]})")
    console.print(f"  report: {r.report_path}")


@click.command("export")
@model_options
@click.option("--opset", default=21, show_default=True, type=int, help="ONNX opset (21 for INT4 blocked quantization).")
@click.option("--exporter", "exporter_", type=click.Choice([e.value for e in Exporter]), default="dynamo", show_default=True,
              help="dynamo: torch.export (maintained upstream). legacy: TorchScript, ~3x faster and ~0.6x the peak "
                   "memory here (docs/benchmarks.md).")
@click.option("--graph", "graph", type=click.Choice([g.value for g in GraphForm]), default="generic", show_default=True,
              help="generic: the graph torch emits (standard ops; every runtime, TensorRT included). fused: ONNX "
                   "Runtime's fused attention and an in-place KV buffer, Qwen2/Llama only, written to onnx/fp32-fused.")
@click.option("--external-data-threshold-mib", type=float, default=2048.0, show_default=True,
              help="Weights above this size go to model.onnx.data.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Max abs diff allowed per output.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs PyTorch comparison.")
@click.option("--allow-weight-mismatch", is_flag=True,
              help="Export even when checkpoint tensors do not match the architecture (missing weights stay random).")
@memory_check_option
@force_option
@pass_app
def command(app: App, model, allow_pickle, trust_remote_code, opset, exporter_, graph, external_data_threshold_mib,
            tolerance, no_verify, allow_weight_mismatch, no_memory_check, force):
    """Export a model to ONNX (decoders with KV cache) and verify it against PyTorch."""
    cfg = ExportConfig(
        model=model, workdir=app.workdir, opset=opset, exporter=Exporter(exporter_), graph=GraphForm(graph),
        external_data_threshold_mib=external_data_threshold_mib, verify=not no_verify, tolerance=tolerance,
        force=force, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        allow_weight_mismatch=allow_weight_mismatch, memory_check=not no_memory_check,
    )
    emit(app, export_model(cfg), _human)
