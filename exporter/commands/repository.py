from __future__ import annotations

from pathlib import Path

import click

from ..core.profiles import ServingVariant
from ..core.ui import out as console
from ..repository import RepositoryConfig, RepositoryResult, write_repository
from .common import App, emit, pass_app, profile_option


def _human(r: RepositoryResult) -> None:
    state = "[yellow]incomplete[/yellow] " if r.status == "incomplete" else ""
    console.print(
        f"{state}[bold]{r.model}[/bold] ({r.kind}) → Triton repository for profile {r.profile!r}, variant {r.variant.value} "
        f"({r.device}, max_batch_size {r.max_batch_size}, ONNX {r.onnx_variant}): {r.out}"
    )
    for m in r.models:
        console.print(f"  {m.name:<10} {m.role:<9} {m.runs_on:<14} max_batch_size {m.max_batch_size}")
    console.print(f"  entry model: {r.entry_model}; engine IO from {r.io_source}")
    for note in r.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    for path in r.missing:
        console.print(f"  [yellow]missing before serving:[/yellow] {path}")


@click.command("repository")
@click.option("--model", default="r1-distill-tiny", show_default=True, help="An exported model (preset name or checkpoint directory).")
@profile_option(default="edge")
@click.option("--out", type=click.Path(path_type=Path), help="Repository directory [default: <workdir>/<model>/model_repository/<profile>].")
@click.option("--variant", type=click.Choice([v.value for v in ServingVariant]), help="Engine model variant [default: the profile's serving_variant].")
@click.option("--device", type=click.Choice(["gpu", "cpu"]), help="Instance kind [default: gpu, cpu for python_ort].")
@click.option("--engine-call", type=click.Choice(["bls", "inprocess"]),
              help="How `generate` reaches the engine [default: inprocess for python_ort, else bls].")
@click.option("--onnx-variant", help="ONNX variant to place (fp32, fp16, …) [default: the profile's, else fp32].")
@click.option("--graph", type=click.Choice(["generic", "fused"]), default="generic", show_default=True,
              help="Decoder graph: fused = `export --graph fused`, served in-process with an in-place KV buffer (python_ort).")
@click.option("--max-rows", type=click.IntRange(min=1), help="Sequences the generate scheduler decodes together [default: the profile's max_batch_size].")
@click.option("--max-queue", type=click.IntRange(min=0), help="Waiting requests before 'server busy' [default: 8 × max rows].")
@click.option("--intra-op-threads", type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads of an in-process engine (python_ort; 0: every core) "
                   "[default: every core for a model of 64 MiB or more, else 1].")
@click.option("--prefix-cache-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="KV positions of prompt prefixes the generate scheduler keeps for reuse (16-token blocks, LRU; "
                   "0: no prefix reuse).")
@pass_app
def command(app: App, model, profile_name, out, variant, device, engine_call, onnx_variant, graph, max_rows, max_queue,
            intra_op_threads, prefix_cache_tokens):
    """Write a Triton model repository (config.pbtxt + model files) for a model under a deployment profile."""
    cfg = RepositoryConfig(
        model=model, profile=app.profile(profile_name), workdir=app.workdir, out=out,
        variant=ServingVariant(variant) if variant else None, device=device, engine_call=engine_call,
        onnx_variant=onnx_variant, graph=graph, max_rows=max_rows, max_queue=max_queue,
        intra_op_threads=intra_op_threads, prefix_cache_tokens=prefix_cache_tokens,
    )
    emit(app, write_repository(cfg), _human)
