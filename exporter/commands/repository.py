from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import BadInput
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


def _trtllm_human(r) -> None:
    p = r.plan
    console.print(
        f"[yellow]unverified[/yellow] [bold]{p.model}[/bold] → TensorRT-LLM (tensorrtllm_backend) repository for profile "
        f"{p.profile!r}: tp={p.tp_size}, {p.precision}, max batch {p.max_batch_size}, max input/seq "
        f"{p.max_input_len}/{p.max_seq_len}, max tokens {p.max_num_tokens}: {r.out}"
    )
    console.print(f"  entry model: {r.entry_model}; engine build on the node: {r.build_script}")
    for path in r.missing:
        console.print(f"  [yellow]missing before serving:[/yellow] {path}")


@click.command("repository")
@click.option("--model", default="r1-distill-tiny", show_default=True, help="An exported model (preset name or checkpoint directory).")
@profile_option(default="edge")
@click.option("--out", type=click.Path(path_type=Path), help="Repository directory [default: <workdir>/<model>/model_repository/<profile>].")
@click.option("--variant", type=click.Choice([v.value for v in ServingVariant]), help="Engine model variant [default: the profile's serving_variant].")
@click.option("--runtime", type=click.Choice(["auto", "r1deploy", "tensorrt-llm"]), default="auto", show_default=True,
              help="tensorrt-llm: Triton's tensorrtllm_backend repository (tensor parallel over the profile's GPUs, "
                   "the engine built on the node; unverified, never run on a GPU); auto: that where the plan needs "
                   "more than one GPU of a TensorRT profile, else r1deploy's generate model.")
@click.option("--device", type=click.Choice(["gpu", "cpu"]), help="Instance kind [default: gpu, cpu for python_ort].")
@click.option("--engine-call", type=click.Choice(["bls", "inprocess"]),
              help="How `generate` reaches the engine [default: inprocess for python_ort and TensorRT-RTX plans, else bls].")
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
@click.option("--int4-activations", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="INT4 weights run by ONNX Runtime (python_ort): keep activations FP32 (the weights-only model the "
                   "quantize stage measured and gated) or let MatMulNBits quantize them to int8 (faster on CPU; "
                   "not what was measured).")
@pass_app
def command(app: App, model, profile_name, out, runtime, variant, device, engine_call, onnx_variant, graph, max_rows,
            max_queue, intra_op_threads, prefix_cache_tokens, int4_activations):
    """Write a Triton model repository (config.pbtxt + model files) for a model under a deployment profile."""
    profile = app.profile(profile_name)
    from ..trtllm import chosen_for, write_for_model

    shape = chosen_for(runtime, model, profile, app.workdir)
    if shape is not None:
        given = {"--variant": variant, "--device": device, "--engine-call": engine_call, "--onnx-variant": onnx_variant,
                 "--graph": None if graph == "generic" else graph, "--max-rows": max_rows, "--max-queue": max_queue,
                 "--intra-op-threads": intra_op_threads, "--prefix-cache-tokens": prefix_cache_tokens or None,
                 "--int4-activations": None if int4_activations == "fp32" else int4_activations}
        ignored = [k for k, v in given.items() if v is not None]
        if ignored:  # options of r1deploy's own repository: refused, never silently dropped
            raise BadInput(f"{', '.join(ignored)} apply to r1deploy's generate repository, not to TensorRT-LLM's "
                           f"(--runtime {runtime} on profile {profile.name!r}); drop them or pass --runtime r1deploy")
        emit(app, write_for_model(shape, model, profile, app.workdir, out), _trtllm_human)
        return
    cfg = RepositoryConfig(
        model=model, profile=profile, workdir=app.workdir, out=out,
        variant=ServingVariant(variant) if variant else None, device=device, engine_call=engine_call,
        onnx_variant=onnx_variant, graph=graph, max_rows=max_rows, max_queue=max_queue,
        intra_op_threads=intra_op_threads, prefix_cache_tokens=prefix_cache_tokens, int4_activations=int4_activations,
    )
    emit(app, write_repository(cfg), _human)
