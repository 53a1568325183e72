"""`run_bench(cfg) -> BenchResult`: connect, read the model, build its requests, measure each load level, write
the results after every level, check the SLO. Failures (a server that died, failed requests, numbers that never
settled, an SLO miss) raise `BenchFailed` — a `StageFailed` carrying the partial result — after the files are
written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

from ..core.errors import BadInput, StageFailed
from ..core.profiles import SloTargets
from .config import BenchConfig
from .inputs import ModelSpec, llm_payloads, model_spec, payloads_from_file, synthetic_payloads
from .load import LevelRun
from .report import write_all
from .result import BenchResult, LevelResult, SloCheck
from .transport import FailedRequest, make_transport


class BenchFailed(StageFailed):
    def __init__(self, message: str, result: BenchResult):
        super().__init__(message)
        self.result = result


def check_slo(levels: list[LevelResult], slo: SloTargets, profile: str, llm: bool) -> list[SloCheck]:
    """Every level must meet the latency targets (TTFT p99, ITL p99, and the deprecated whole-request p99 when a
    profile still sets it); the best level must reach tokens/s and qps. TTFT, ITL and tokens/s are LLM figures:
    a plain model gets none of them. An LLM target that no level measured (ITL of a non-streamed run) is a miss
    that says so, never a silent pass."""
    checks: list[SloCheck] = []
    where = f"profile {profile}, " if profile else ""
    measured = [lv for lv in levels if lv.requests]
    if not measured:
        return checks
    for figure, target, key in (("TTFT p99", slo.ttft_p99_ms, "ttft_ms"), ("ITL p99", slo.itl_p99_ms, "itl_ms")):
        if target is None or not llm:
            continue
        for lv in measured:
            stats = getattr(lv.llm, key) if lv.llm else None
            if stats is None or stats.count == 0:
                why = "not measured: no response streamed two or more tokens" if key == "itl_ms" else "not measured"
                checks.append(SloCheck(figure, target, None, "ms", where + lv.label, False, why))
            else:
                checks.append(SloCheck(figure, target, stats.p99, "ms", where + lv.label, stats.p99 <= target))
    if slo.p99_latency_s is not None:
        for lv in measured:
            p99_s = lv.latency_ms.p99 / 1000
            checks.append(SloCheck("p99 latency", slo.p99_latency_s, p99_s, "s", where + lv.label, p99_s <= slo.p99_latency_s))
    if slo.tokens_per_s is not None and llm:
        best = max(measured, key=lambda lv: lv.llm.output_tokens_per_s if lv.llm else 0.0)
        got = best.llm.output_tokens_per_s if best.llm else 0.0
        checks.append(SloCheck("tokens/s", slo.tokens_per_s, got, "tokens/s", where + best.label, got >= slo.tokens_per_s))
    if slo.qps is not None:
        best = max(measured, key=lambda lv: lv.throughput_rps)
        checks.append(SloCheck("qps", slo.qps, best.throughput_rps, "req/s", where + best.label,
                               best.throughput_rps >= slo.qps))
    return checks


def _is_llm(cfg: BenchConfig, spec: ModelSpec) -> bool:
    return spec.looks_like_llm if cfg.llm is None else cfg.llm


async def _connect(cfg: BenchConfig):
    connections = max(cfg.levels) if not cfg.open_loop else 0
    import os

    api_key = os.environ.get("OPENAI_API_KEY") if cfg.protocol.value == "openai" else None
    transport = make_transport(cfg.protocol.value, cfg.url, int(connections), api_key)
    if not await transport.live():
        await transport.close()
        what = "an OpenAI endpoint" if cfg.protocol.value == "openai" else "Triton"
        raise BadInput(f"cannot reach {what} at {cfg.url} over {cfg.protocol.value} (is the server running? right port?)")
    try:
        metadata = await transport.metadata(cfg.model, cfg.model_version)
        config = await transport.config(cfg.model, cfg.model_version)
    except FailedRequest as exc:
        await transport.close()
        raise BadInput(f"model {cfg.model!r} not available at {cfg.url}: {exc}") from None
    return transport, model_spec(metadata, config)


async def _run(cfg: BenchConfig, out_dir: Optional[Path]) -> BenchResult:
    transport, spec = await _connect(cfg)
    try:
        llm = _is_llm(cfg, spec)
        if llm:
            payloads = llm_payloads(spec, cfg.prompts, cfg.input_tokens, cfg.output_tokens, cfg.stream, cfg.seed)
        elif cfg.input_data is not None:
            payloads = payloads_from_file(spec, cfg.input_data, cfg.batch_size)
        else:
            payloads = synthetic_payloads(spec, cfg.batch_size, cfg.seed)
        result = BenchResult(url=cfg.url, model=cfg.model, protocol=cfg.protocol.value, kind="llm" if llm else "plain",
                             profile=cfg.profile)

        def save() -> None:
            if out_dir is not None:
                write_all(result, out_dir)

        def fail(message: str) -> BenchFailed:
            result.failure = message
            save()
            where = f"; partial results in {out_dir}" if out_dir is not None else ""
            return BenchFailed(message + where, result)

        for level in cfg.levels:
            run = LevelRun(cfg, transport, payloads, llm, level)
            lv = await run.run()
            result.levels.append(lv)
            save()
            if run.server_died:
                raise fail(f"server at {cfg.url} stopped answering during {lv.label}: "
                           f"{sum(w.errors for w in lv.windows)} requests failed ({lv.first_error})")
            if not lv.stable:
                tput = ", ".join(f"{w.throughput_rps:.0f}" for w in lv.windows[-cfg.stable_windows:])
                errors = sum(w.errors for w in lv.windows)
                why = f"; {errors} requests failed ({lv.first_error})" if errors else ""
                raise fail(f"unstable: {lv.label} did not settle within ±{cfg.stability_pct:g} % over "
                           f"{len(lv.windows)} windows (last req/s: {tput}){why}; try a longer --duration, "
                           f"more --max-trials or a larger --stability-percentage")
        result.complete = True
        if cfg.slo is not None:
            result.slo = check_slo(result.levels, cfg.slo, cfg.profile or "", llm)
        save()
        miss = next((c for c in result.slo if not c.passed), None)
        if miss is not None:
            raise BenchFailed(f"SLO miss: {miss.describe()}", result)
        return result
    finally:
        await transport.close()


def run_bench(cfg: BenchConfig) -> BenchResult:
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    return asyncio.run(_run(cfg, out_dir))
