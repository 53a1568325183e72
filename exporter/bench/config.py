"""What a benchmark run is asked to do (`BenchConfig`) — every option in one place, validated once."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..core.errors import BadInput
from ..core.profiles import SloTargets

# The longest measurement window accepted (an hour): a longer one is a typo (`--duration 1e9`) that would run
# for years with nothing to show.
MAX_WINDOW_S = 3600.0
_OPTION = {"window_s": "--duration", "warmup_s": "--warmup", "stability_pct": "--stability-percentage",
           "timeout_s": "--timeout", "max_window_s": "max_window_s"}


class Protocol(str, enum.Enum):
    GRPC = "grpc"
    HTTP = "http"
    OPENAI = "openai"  # an OpenAI-compatible endpoint (r1deploy gateway): LLMs only


class StabilityLatency(str, enum.Enum):
    """Which latency figure must settle besides throughput (perf_analyzer uses the average by default)."""

    AVG = "avg"
    P99 = "p99"


@dataclass
class BenchConfig:
    url: str  # HOST:PORT of the protocol's endpoint (openai: also http://HOST:PORT)
    model: str
    protocol: Protocol = Protocol.GRPC
    model_version: str = ""
    # Load: closed loop at each concurrency, or open loop at each request rate (requests/s). One of the two.
    concurrency: list[int] = field(default_factory=lambda: [1])
    request_rate: list[float] = field(default_factory=list)
    # A measurement window lasts `window_s` seconds, or — when `window_requests` is set — until that many
    # requests completed (bounded by `max_window_s`).
    window_s: float = 5.0
    window_requests: int = 0
    max_window_s: float = 120.0
    warmup_s: float = 1.0
    stability_pct: float = 10.0
    stable_windows: int = 3
    max_trials: int = 10
    stability_latency: StabilityLatency = StabilityLatency.AVG
    timeout_s: float = 30.0
    batch_size: int = 1
    input_data: Optional[Path] = None  # perf_analyzer-style JSON ({"data": [{name: [...]}, …]}) or {name: [...]}
    # LLM (decoupled `generate`-style models); None = detect from the model config.
    llm: Optional[bool] = None
    prompts: Optional[Path] = None  # JSONL: {"text": "...", "max_tokens": N} per line
    input_tokens: int = 128  # synthetic prompt length (words)
    output_tokens: int = 64  # → max_tokens
    stream: bool = True
    seed: int = 0
    max_outstanding: int = 1024  # open-loop bound on requests in flight
    out_dir: Optional[Path] = None
    profile: Optional[str] = None
    slo: Optional[SloTargets] = None

    def __post_init__(self) -> None:
        self.protocol = Protocol(self.protocol)
        # nan passes every `x > 0` check by failing none of them, and inf never ends a window: refuse both first
        for name in ("window_s", "max_window_s", "warmup_s", "stability_pct", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BadInput(f"{_OPTION.get(name, name)} must be a finite number, got {value!r}")
        if any(not math.isfinite(r) for r in self.request_rate):
            raise BadInput(f"--request-rate must be finite numbers > 0, got {self.request_rate}")
        self.stability_latency = StabilityLatency(self.stability_latency)
        if self.protocol is Protocol.OPENAI:
            self.url = self.url.removeprefix("http://").rstrip("/").removesuffix("/v1")
            if self.llm is False:
                raise BadInput("--protocol openai benchmarks LLMs only (drop --no-llm)")
        host, sep, port = self.url.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise BadInput(f"--url must be HOST:PORT, got {self.url!r}")
        if self.request_rate and self.concurrency and self.concurrency != [1]:
            raise BadInput("give --concurrency or --request-rate, not both")
        levels = self.request_rate or self.concurrency
        if not levels:
            raise BadInput("no load level: give --concurrency or --request-rate")
        if any(c < 1 for c in self.concurrency) and not self.request_rate:
            raise BadInput(f"concurrency must be ≥ 1, got {self.concurrency}")
        if any(c > 4096 for c in self.concurrency):
            raise BadInput("concurrency above 4096 is not supported")
        if any(r <= 0 for r in self.request_rate):
            raise BadInput(f"request rate must be > 0, got {self.request_rate}")
        checks = [
            (self.window_s > 0, "--duration must be > 0"),
            (self.window_s <= MAX_WINDOW_S, f"--duration must be ≤ {MAX_WINDOW_S:g} s (one measurement window; a run has up to --max-trials of them per level)"),
            (self.window_requests == 0 or self.max_window_s <= MAX_WINDOW_S, f"max_window_s must be ≤ {MAX_WINDOW_S:g} s"),
            (self.warmup_s <= MAX_WINDOW_S, f"--warmup must be ≤ {MAX_WINDOW_S:g} s"),
            (self.window_requests >= 0, "--requests must be ≥ 0"),
            (self.warmup_s >= 0, "--warmup must be ≥ 0"),
            (0 < self.stability_pct <= 100, "--stability-percentage must lie in (0, 100]"),
            (self.stable_windows >= 1, "stable_windows must be ≥ 1"),
            (self.max_trials >= self.stable_windows, f"--max-trials must be ≥ {self.stable_windows}"),
            (self.timeout_s > 0, "--timeout must be > 0"),
            (self.batch_size >= 1, "--batch-size must be ≥ 1"),
            (self.input_tokens >= 1 and self.output_tokens >= 1, "--input-tokens/--output-tokens must be ≥ 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        for p, what in ((self.input_data, "--input-data"), (self.prompts, "--prompts")):
            if p is not None and not Path(p).is_file():
                raise BadInput(f"{what} file not found: {p}")
        if self.prompts is not None:  # read now: a bad line is bad input before any server is contacted
            from .inputs import read_prompts

            read_prompts(Path(self.prompts), self.output_tokens)

    @property
    def open_loop(self) -> bool:
        return bool(self.request_rate)

    @property
    def levels(self) -> list[float]:
        return list(self.request_rate) if self.open_loop else [int(c) for c in self.concurrency]
