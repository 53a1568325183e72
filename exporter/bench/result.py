"""What a benchmark run measured (`BenchResult`): one `LevelResult` per concurrency or request rate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Percentiles:
    """Milliseconds over `count` samples."""

    count: int = 0
    avg: float = 0.0
    min: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@dataclass
class ServerStats:
    """Per-request averages from Triton's statistics (delta of /v2/models/<m>/stats across the windows)."""

    requests: int = 0
    queue_us: float = 0.0
    compute_input_us: float = 0.0
    compute_infer_us: float = 0.0
    compute_output_us: float = 0.0
    avg_batch_size: float = 0.0  # inferences / executions

    @property
    def compute_us(self) -> float:
        return self.compute_input_us + self.compute_infer_us + self.compute_output_us


@dataclass
class LlmStats:
    ttft_ms: Percentiles = field(default_factory=Percentiles)  # request sent → first token
    itl_ms: Percentiles = field(default_factory=Percentiles)  # per request: (last − first token) / (tokens − 1)
    output_tokens: int = 0
    output_tokens_per_s: float = 0.0
    tokens_per_request: float = 0.0


@dataclass
class Window:
    seconds: float
    requests: int
    errors: int
    throughput_rps: float
    avg_ms: float
    p99_ms: float


@dataclass
class LevelResult:
    concurrency: int = 0  # closed loop
    request_rate: float = 0.0  # open loop (requests/s asked for)
    stable: bool = False
    windows: list[Window] = field(default_factory=list)  # every measured window, warm-up excluded
    # Over the last `stable_windows` windows:
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    throughput_rps: float = 0.0
    latency_ms: Percentiles = field(default_factory=Percentiles)
    server: Optional[ServerStats] = None
    llm: Optional[LlmStats] = None
    client_cpu_us_per_request: float = 0.0  # this process's CPU time (all threads) / completed requests
    first_error: str = ""

    @property
    def label(self) -> str:
        return f"request rate {self.request_rate:g}/s" if self.request_rate else f"concurrency {self.concurrency}"


# Figures that are upper bounds (measured ≤ target passes); the others are lower bounds.
UPPER_BOUND_FIGURES = ("TTFT p99", "ITL p99", "p99 latency")


@dataclass
class SloCheck:
    figure: str  # "TTFT p99" | "ITL p99" | "tokens/s" | "qps" | "p99 latency" (deprecated whole-request)
    target: float
    measured: Optional[float]  # None when not measured (then `note` says why; JSON has no nan)
    unit: str
    level: str
    passed: bool
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return f"{self.figure} {self.note} (target {self.target:g} {self.unit}; {self.level})"
        upper = self.figure in UPPER_BOUND_FIGURES
        op, bad = ("≤", ">") if upper else ("≥", "<")
        rel = op if self.passed else bad
        return f"{self.figure} {self.measured:.3g} {self.unit} {rel} {self.target:g} {self.unit} ({self.level})"


@dataclass
class BenchResult:
    url: str
    model: str
    protocol: str
    kind: str  # "plain" | "llm"
    levels: list[LevelResult] = field(default_factory=list)
    slo: list[SloCheck] = field(default_factory=list)
    profile: Optional[str] = None
    complete: bool = False
    failure: str = ""
    files: dict[str, Path] = field(default_factory=dict)
