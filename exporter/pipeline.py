"""The main job: every stage, in order, on one model — what `make pipeline` runs.

export → quantize (each precision the deployment profiles ask for) → engine (TensorRT-RTX for the RTX profile
here; full TensorRT where installed) → Triton repository per profile (+ a CPU variant to serve here) →
Kubernetes manifests → serve the CPU repository, send one request, bench briefly → one summary table.

Every stage status is true: `ok` it worked; `skipped` a part is not installed (the install hint says which);
`incomplete` it wrote its output but a named piece is missing (a repository without its engine, a bench that did
not settle); `failed` it broke (a broken TensorRT install is a failure, not a skip). A failure stops the pipeline
with that stage's error after the summary so far (and `--json`), exit 2 for bad input and 1 otherwise.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import tiny_models
from .core import artifacts
from .core.errors import BadInput, MissingDependency, R1DeployError, StageFailed, first_line
from .core.profiles import DeploymentProfile, Precision, Runtime, ServingVariant
from .core.ui import status


@dataclass
class PipelineConfig:
    model: str = "r1-distill-tiny"
    workdir: Path = Path("build")
    profiles: dict[str, DeploymentProfile] = field(default_factory=dict)
    serve: bool = True  # serve the CPU variant on a real Triton and send one request
    bench: bool = True  # then a short `r1deploy bench` run against it
    bench_seconds: float = 1.0
    force: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        # checked before any work: a bad bench length found after the export would cost minutes
        if not (isinstance(self.bench_seconds, (int, float)) and math.isfinite(self.bench_seconds) and self.bench_seconds > 0):
            raise BadInput(f"--bench-seconds must be a number > 0, got {self.bench_seconds!r}")


class Incomplete(Exception):
    """Raised inside a stage that wrote its output but lacks a named piece: the row says `incomplete`."""

    def __init__(self, summary: StageSummary):
        super().__init__(summary.detail)
        self.summary = summary


@dataclass
class StageSummary:
    stage: str
    status: str  # ok | skipped | incomplete | failed
    detail: str
    path: Optional[Path] = None
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    model: str
    workdir: Path
    stages: list[StageSummary] = field(default_factory=list)
    failed: Optional[str] = None

    @property
    def incomplete(self) -> list[str]:
        return [s.stage for s in self.stages if s.status == "incomplete"]


# The accuracy figures shown in the summary (the full set, perplexity included, is in quantize_report.json).
# KL rather than the perplexity change: on held-out text a tiny model's perplexity is in the thousands and its
# change is noise, while the KL divergence from FP32 measures the quantization whatever the text.
_HEADLINE_ACCURACY = {
    "decoder": ("logits_cosine", "top1_agreement", "kl_divergence"),
    "encoder": ("cosine", "spearman"),
}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _Run:
    def __init__(self, result: PipelineResult, on_stage: Callable[[StageSummary], None] | None = None):
        self.result = result
        self.on_stage = on_stage

    def stage(self, name: str, fn: Callable[[], StageSummary]) -> Optional[StageSummary]:
        """Run one stage and record its row; on failure the row says `failed` and the error carries the partial
        result (`exc.partial_result`) so the command can print the summary so far before the error line."""
        started = time.perf_counter()
        try:
            summary = fn()
        except MissingDependency as exc:
            summary = StageSummary(name, "skipped", exc.message)
        except Incomplete as inc:
            summary = inc.summary
        except R1DeployError as exc:
            self._record(StageSummary(name, "failed", exc.message, seconds=time.perf_counter() - started))
            self.result.failed = f"{name}: {exc.message}"
            exc.args = (self.result.failed,)  # the error line names the stage
            exc.partial_result = self.result
            raise
        except Exception as exc:  # a bug or an unexpected library error: still a failed row, then the error
            detail = first_line(exc, default="")
            self._record(StageSummary(name, "failed", f"{type(exc).__name__}: {detail}", seconds=time.perf_counter() - started))
            self.result.failed = f"{name}: {type(exc).__name__}: {detail}"
            exc.partial_result = self.result
            raise
        summary.seconds = time.perf_counter() - started
        self._record(summary)
        return summary

    def _record(self, summary: StageSummary) -> None:
        self.result.stages.append(summary)
        if self.on_stage:
            self.on_stage(summary)


def run_pipeline(cfg: PipelineConfig, on_stage: Callable[[StageSummary], None] | None = None) -> PipelineResult:
    from .export import ExportConfig, export_model

    result = PipelineResult(cfg.model, cfg.workdir)
    run = _Run(result, on_stage)
    profiles = cfg.profiles
    exported = {}

    def export():
        try:
            exp = export_model(ExportConfig(model=cfg.model, workdir=cfg.workdir, force=cfg.force,
                                            allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code))
        except MissingDependency as exc:  # every later stage needs the export: not a skip, a failed row
            raise BadInput(exc.message) from None
        exported["result"] = exp
        diff = max(exp.max_abs_diff.values()) if exp.max_abs_diff else float("nan")
        return StageSummary(
            "export", "ok", f"{exp.architecture} fp32 ONNX, {_mb(exp.onnx_bytes)}, max abs diff vs PyTorch {diff:.1e}"
            + (" (up to date)" if exp.skipped else ""), exp.onnx_path, exp.seconds, {"max_abs_diff": diff, "bytes": exp.onnx_bytes},
        )

    run.stage("export", export)
    exp = exported["result"]
    model_name = exp.model

    # The fused graph (GroupQueryAttention over an in-place KV buffer) is what the CPU repository serves for the
    # architectures it is written for: 2-3x the generic graph's decode speed here (docs/benchmarks.md).
    from .fused_graph import SUPPORTED as FUSED_ARCHITECTURES

    fused = exp.kind.value == "decoder" and exp.architecture in FUSED_ARCHITECTURES.values()
    if fused:
        def export_fused():
            f = export_model(ExportConfig(model=cfg.model, workdir=cfg.workdir, force=cfg.force, graph="fused",
                                          allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code))
            diff = max(f.max_abs_diff.values()) if f.max_abs_diff else float("nan")
            return StageSummary(
                "export fused", "ok", f"fused graph (GroupQueryAttention, in-place KV buffer), {_mb(f.onnx_bytes)}, "
                f"max abs diff vs PyTorch {diff:.1e}" + (" (up to date)" if f.skipped else ""), f.onnx_path, f.seconds,
                {"max_abs_diff": diff, "bytes": f.onnx_bytes},
            )

        run.stage("export fused", export_fused)

    # Quantize once per distinct variant the profiles deploy.
    from quantize import QuantizeConfig

    from .quantize_fused import quantize_variant

    def quantize_one(profile: DeploymentProfile, graph: str) -> StageSummary:
        q = quantize_variant(QuantizeConfig(model=cfg.model, workdir=cfg.workdir, profile=profile, force=cfg.force,
                                            graph=graph, extra_texts=tiny_models.quality_texts(cfg.model)))
        keys = _HEADLINE_ACCURACY[exp.kind.value]
        acc = ", ".join(f"{k} {q.accuracy[k]:.4f}" for k in keys if isinstance(q.accuracy.get(k), float))
        kept = f", kept {len(q.kept_layers)} layer(s) unquantized" if q.kept_layers else ""
        return StageSummary(
            f"quantize {q.variant}", "ok",
            f"{_mb(q.sizes.model_bytes_fp32)} → {_mb(q.sizes.model_bytes)}; {acc}{kept} (gate of {profile.name})"
            + (" (up to date)" if q.skipped else ""),
            q.onnx_path, figures={"accuracy": q.accuracy, "bytes": q.sizes.model_bytes},
        )

    done: set[str] = set()
    for profile in profiles.values():
        if profile.precision is Precision.FP32:
            continue
        variant = artifacts.profile_onnx_variant(profile)
        if variant in done:
            continue
        done.add(variant)

        run.stage(f"quantize {variant}", lambda profile=profile: quantize_one(profile, "generic"))

    # Engines: every profile; a runtime that is not installed is a skip with its reason.
    from .engine import EngineConfig, build_engine

    for profile in profiles.values():
        def build(profile=profile):
            e = build_engine(EngineConfig(model=cfg.model, profile=profile, workdir=cfg.workdir, force=cfg.force))
            return StageSummary(
                f"engine {profile.name}", "ok",
                f"{e.runtime.value} {e.runtime_version} {e.precision} for {'/'.join(e.compute_capabilities)}, "
                f"{_mb(e.engine_bytes)}, built in {e.build_seconds:.1f} s" + (" (up to date)" if e.skipped else ""),
                e.engine_path, figures={"bytes": e.engine_bytes},
            )

        run.stage(f"engine {profile.name}", build)

    # Triton repositories: one per profile (as deployed), plus the CPU variant this machine can serve.
    from .repository import RepositoryConfig, write_repository

    for profile in profiles.values():
        def repo(profile=profile):
            r = write_repository(RepositoryConfig(model=cfg.model, profile=profile, workdir=cfg.workdir))
            notes = "".join(f"; note: {n}" for n in r.notes)
            summary = StageSummary(
                f"repository {profile.name}", "ok",
                f"{r.variant.value}, {len(r.models)} models, max_batch_size {r.max_batch_size}, {r.onnx_variant}{notes}",
                r.out, figures={"missing": r.missing},
            )
            if r.missing:  # written, but it cannot be served until these are placed
                summary.status = "incomplete"
                summary.detail = f"missing {', '.join(r.missing)}; " + summary.detail
            return summary

        run.stage(f"repository {profile.name}", repo)
    cpu_profile = next((p for p in profiles.values() if p.runtime is Runtime.TENSORRT_RTX), next(iter(profiles.values())))
    cpu_out = artifacts.ModelLayout(cfg.workdir, model_name).root / "model_repository" / "cpu"
    cpu_repo = None
    if fused and cpu_profile.precision is not Precision.FP32:
        # the CPU repository serves the cpu profile's precision on the fused graph: quantize that graph too
        run.stage(f"quantize {artifacts.profile_onnx_variant(cpu_profile)}-fused", lambda: quantize_one(cpu_profile, "fused"))

    def repo_cpu():
        nonlocal cpu_repo
        cpu_repo = write_repository(RepositoryConfig(model=cfg.model, profile=cpu_profile, workdir=cfg.workdir,
                                                     variant=ServingVariant.PYTHON_ORT, out=cpu_out,
                                                     graph="fused" if fused else "generic"))
        return StageSummary("repository cpu", "ok", f"python_ort variant of {cpu_profile.name} ({cpu_repo.onnx_variant}) for the CPU Triton", cpu_repo.out)

    run.stage("repository cpu", repo_cpu)

    from .manifests import ManifestsConfig, render_manifests

    def manifests():
        out = artifacts.ModelLayout(cfg.workdir, model_name).root / "k8s"
        m = render_manifests(ManifestsConfig(model=cfg.model, out=out, profiles=profiles))
        from .manifests.checks import check_tree

        report = check_tree(out)
        if report.violations:
            raise StageFailed(f"manifest check failed: {report.violations[0]}")
        skipped = f" ({'; '.join(report.skipped)})" if report.skipped else ""
        return StageSummary(
            "manifests", "ok",
            f"{len(m.overlays)} overlays ({', '.join(m.overlays)}), {report.objects_checked} objects; kustomize, "
            f"kubernetes-validate ({report.kubernetes_validated}), CRD schemas ({report.crd_validated}) and policy checks passed{skipped}",
            out,
        )

    run.stage("manifests", manifests)

    if cfg.serve and cpu_repo is not None:
        run.stage("serve + bench", lambda: _serve_and_bench(cfg, cpu_repo, cpu_profile))
    return result


def _serve_and_bench(cfg: PipelineConfig, repo, profile: DeploymentProfile) -> StageSummary:
    from .serve import ServerConfig, TritonServer

    server = TritonServer(ServerConfig(model_repository=repo.out))
    with status("starting Triton on 127.0.0.1"):
        server.start()
    try:
        pass_, shown = _one_request(server.endpoints.http, repo, cfg.model)
        figures: dict[str, Any] = {"request": pass_, **shown}
        detail = f"Triton {server.endpoints.http}: {pass_}"
        unsettled = None
        if cfg.bench:
            from .bench import BenchConfig, BenchFailed, run_bench

            with status(f"benchmarking {repo.entry_model} (concurrency 1, 2; {cfg.bench_seconds:g} s windows)"):
                try:
                    b = run_bench(BenchConfig(
                        url=server.endpoints.grpc, model=repo.entry_model, concurrency=[1, 2], window_s=cfg.bench_seconds,
                        warmup_s=0.5, stability_pct=50.0, max_trials=4, input_tokens=16, output_tokens=16,
                        out_dir=Path(cfg.workdir) / repo.model / "bench",
                    ))
                except BenchFailed as exc:
                    # a short bench on a busy machine may not settle: the model served and every artifact was
                    # built, so this is an incomplete measurement, not a failed pipeline
                    if exc.result is None or not exc.message.startswith("unstable") or "requests failed" in exc.message:
                        raise
                    b, unsettled = exc.result, exc.message
            best = max(b.levels, key=lambda lv: lv.throughput_rps) if b.levels else None
            if best is not None:
                figures["bench"] = {
                    "concurrency": best.concurrency, "throughput_rps": best.throughput_rps,
                    "p99_ms": best.latency_ms.p99,
                    **({"tokens_per_s": best.llm.output_tokens_per_s, "ttft_p50_ms": best.llm.ttft_ms.p50} if best.llm else {}),
                }
                tok = f", {best.llm.output_tokens_per_s:.0f} tok/s, TTFT p50 {best.llm.ttft_ms.p50:.1f} ms" if best.llm else ""
                detail += f"; bench c={best.concurrency}: {best.throughput_rps:.1f} req/s, p99 {best.latency_ms.p99:.1f} ms{tok}"
    finally:
        server.stop()
    summary = StageSummary("serve + bench", "ok", detail, Path(cfg.workdir) / repo.model / "bench", figures=figures)
    if unsettled:
        summary.status = "incomplete"
        summary.detail = f"bench did not settle ({unsettled}); {detail}"
        raise Incomplete(summary)
    return summary


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _one_request(http: str, repo, model: str) -> tuple[str, dict[str, Any]]:
    """One request to the served model; (what to show, its parts). The embedded trained preset is asked a
    question of its corpus through its chat template, so the answer shown is legible: R1's reasoning, then the
    answer, told apart on the `</think>` token id (the text output drops special tokens)."""
    if repo.entry_model == "generate":
        url = f"http://{http}/v2/models/generate/generate"
        if model not in tiny_models.TRAINED:
            reply = _post(url, {"text_input": "DeepSeek-R1 is", "max_tokens": 8, "temperature": 0.0, "stream": False})
            return f"generate → {reply.get('text_output', '')!r} ({reply.get('finish_reason', '')})", {}
        from tokenizers import Tokenizer

        question = tiny_models.CHAT_TURNS[0][0]
        reply = _post(url, {"text_input": tiny_models.chat_prompt(question), "max_tokens": 128, "temperature": 0.0,
                            "stream": False})
        tok = Tokenizer.from_file(str(repo.out / "generate" / "1" / "tokenizer" / "tokenizer.json"))
        ids = list(reply.get("token_ids") or [])
        end = tok.token_to_id(tiny_models.END_THINK)
        cut = ids.index(end) if end in ids else len(ids)
        reasoning = tok.decode(ids[:cut], skip_special_tokens=True).strip()
        answer = tok.decode(ids[cut + 1:], skip_special_tokens=True).strip()
        shown = {"question": question, "reasoning": reasoning, "answer": answer, "finish_reason": reply.get("finish_reason", "")}
        return (f"generate → {question!r}: <think> {reasoning!r} </think> {answer!r} ({shown['finish_reason']})", shown)
    body = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["Deploying models to GPUs."]}]}
    reply = _post(f"http://{http}/v2/models/{repo.entry_model}/infer", body)
    dim = len(reply["outputs"][0]["data"])
    return f"{repo.entry_model} → {dim}-dim embedding", {}
