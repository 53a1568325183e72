from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import click

from ..bench import BenchConfig, BenchFailed, BenchResult, run_bench
from ..core.errors import BadInput
from ..core.profiles import SloTargets
from ..core.ui import out as console
from .common import App, emit, pass_app, profile_option


def _numbers(text: str, cast, what: str) -> list:
    try:
        values = [cast(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BadInput(f"{what} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise BadInput(f"{what} is empty")
    return values


def _slo_targets(text: str, base: Optional[SloTargets]) -> SloTargets:
    """`--slo ttft_p99_ms=800,itl_p99_ms=40` over the profile's targets (or none)."""
    values: dict[str, float] = {}
    for item in (t for t in text.replace(" ", "").split(",") if t):
        key, sep, value = item.partition("=")
        if not sep or key not in SloTargets.FIELDS:
            raise BadInput(f"--slo takes KEY=VALUE pairs with KEY one of {', '.join(SloTargets.FIELDS)}; got {item!r}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise BadInput(f"--slo {key} must be a number > 0, got {value!r}")
        values[key] = number
    if not values:
        raise BadInput("--slo is empty")
    return dataclasses.replace(base or SloTargets(), **values)


def _human(r: BenchResult) -> None:
    from ..bench.report import table

    console.print(table(r))
    for c in r.slo:
        console.print(f"  SLO {'[green]ok[/green]' if c.passed else '[red]miss[/red]'}: {c.describe()}")
    if r.files:
        console.print("  results: " + ", ".join(str(p) for p in r.files.values()))


@click.command("bench")
@click.option("--url", required=True, help="Triton endpoint HOST:PORT (the gRPC port with --protocol grpc; the gateway's with openai).")
@click.option("--model", required=True, help="Served model name.")
@click.option("--model-version", default="", help="Model version (default: the server's choice).")
@click.option("--protocol", type=click.Choice(["grpc", "http", "openai"]), default="grpc", show_default=True,
              help="openai: an OpenAI-compatible endpoint (r1deploy gateway; key from $OPENAI_API_KEY), LLMs only.")
@click.option("--concurrency", default="1", show_default=True, help="Closed loop: comma-separated concurrencies, e.g. 1,2,4,8.")
@click.option("--request-rate", default=None, help="Open loop instead: comma-separated request rates (requests/s).")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds per measurement window.")
@click.option("--requests", type=int, default=0, help="Requests per measurement window instead of --duration.")
@click.option("--warmup", type=float, default=1.0, show_default=True, help="Seconds of load before the first window (not counted).")
@click.option("--stability-percentage", type=float, default=10.0, show_default=True,
              help="The last 3 windows' throughput and latency must lie within ±this % of their mean.")
@click.option("--stability-latency", type=click.Choice(["avg", "p99"]), default="avg", show_default=True)
@click.option("--max-trials", type=int, default=10, show_default=True, help="Windows per level before giving up as unstable.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds per request.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--input-data", type=click.Path(path_type=Path), help="JSON input data (perf_analyzer's format or {input: values}).")
@click.option("--llm/--no-llm", default=None, help="Benchmark as a streaming LLM (default: detected from the model config).")
@click.option("--prompts", type=click.Path(path_type=Path), help="LLM prompts, JSONL: {\"text\": ..., \"max_tokens\": N}.")
@click.option("--input-tokens", type=int, default=128, show_default=True, help="Synthetic prompt length (words).")
@click.option("--output-tokens", type=int, default=64, show_default=True, help="max_tokens asked per request.")
@click.option("--no-stream", is_flag=True, help="LLM: ask for one response per request (stream=false).")
@profile_option(help_text="Check the results against this deployment profile's SLO (TTFT p99, ITL p99, tokens/s).")
@click.option("--slo", "slo_text", default=None, metavar="KEY=VALUE,...",
              help="SLO targets to check, over the profile's: ttft_p99_ms, itl_p99_ms, tokens_per_s, qps, "
                   "p99_latency_s (deprecated whole-request p99), e.g. ttft_p99_ms=1500,itl_p99_ms=100.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Results directory [default: WORKDIR/bench/MODEL].")
@pass_app
def command(app: App, url, model, model_version, protocol, concurrency, request_rate, duration, requests, warmup,
            stability_percentage, stability_latency, max_trials, timeout, batch_size, input_data, llm, prompts,
            input_tokens, output_tokens, no_stream, profile_name, slo_text, out_dir):
    """Benchmark a model served by Triton (or through the OpenAI gateway): throughput, latency percentiles and
    server-side time (TTFT, inter-token latency and tokens/s for streaming LLMs), written as JSON, CSV and a plot."""
    slo = app.profile(profile_name).slo if profile_name else None
    if slo_text is not None:
        slo = _slo_targets(slo_text, slo)
    cfg = BenchConfig(
        url=url, model=model, model_version=model_version, protocol=protocol,
        concurrency=[] if request_rate else _numbers(concurrency, int, "--concurrency"),
        request_rate=_numbers(request_rate, float, "--request-rate") if request_rate else [],
        window_s=duration, window_requests=requests, warmup_s=warmup, stability_pct=stability_percentage,
        stability_latency=stability_latency, max_trials=max_trials, timeout_s=timeout, batch_size=batch_size,
        input_data=input_data, llm=llm, prompts=prompts, input_tokens=input_tokens, output_tokens=output_tokens,
        stream=not no_stream, out_dir=out_dir or app.workdir / "bench" / model, profile=profile_name, slo=slo,
    )
    try:
        result = run_bench(cfg)
    except BenchFailed as exc:
        emit(app, exc.result, _human)  # the partial numbers, then the one-line error and exit code
        raise
    emit(app, result, _human)
