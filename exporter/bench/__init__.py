"""`r1deploy bench`: load a model served by Triton (gRPC or HTTP, closed or open loop), measure it in windows
until the numbers settle, and report latency percentiles, server-side queue/compute time, and for LLMs time to
first token, inter-token latency and tokens/s — checked against a deployment profile's SLO."""

from .config import BenchConfig, Protocol, StabilityLatency
from .result import BenchResult, LevelResult, LlmStats, Percentiles, ServerStats, SloCheck, Window
from .runner import BenchFailed, check_slo, run_bench

__all__ = [
    "BenchConfig", "BenchFailed", "BenchResult", "LevelResult", "LlmStats", "Percentiles", "Protocol", "ServerStats",
    "SloCheck", "StabilityLatency", "Window", "check_slo", "run_bench",
]
