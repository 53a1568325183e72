"""The gateway's Prometheus metrics, in the text exposition format: requests by endpoint and status, time to first
token, tokens in and out. Kept to a few counters and one histogram: no client library needed for that."""

from __future__ import annotations

import bisect
from collections import defaultdict

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (endpoint, model, status)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, list[int]] = {}  # model → cumulative-ready bucket counts (last = +Inf)
        self.ttft_sum: dict[str, float] = defaultdict(float)
        self.in_flight = 0
        self.cancelled = 0

    def request(self, endpoint: str, model: str, status: int) -> None:
        self.requests[(endpoint, model, status)] += 1

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens[model] += prompt
        self.completion_tokens[model] += completion

    def first_token(self, model: str, seconds: float) -> None:
        counts = self.ttft.setdefault(model, [0] * (len(TTFT_BUCKETS_S) + 1))
        counts[bisect.bisect_left(TTFT_BUCKETS_S, seconds)] += 1
        self.ttft_sum[model] += seconds

    def render(self) -> str:
        lines = [
            "# HELP r1deploy_gateway_requests_total OpenAI API requests answered, by endpoint, model and HTTP status.",
            "# TYPE r1deploy_gateway_requests_total counter",
        ]
        for (endpoint, model, status), n in sorted(self.requests.items()):
            lines.append(f"r1deploy_gateway_requests_total{_labels(endpoint=endpoint, model=model, status=str(status))} {n}")
        for name, table, what in (("prompt", self.prompt_tokens, "Prompt tokens"),
                                  ("completion", self.completion_tokens, "Generated tokens")):
            lines += [f"# HELP r1deploy_gateway_{name}_tokens_total {what} of answered requests.",
                      f"# TYPE r1deploy_gateway_{name}_tokens_total counter"]
            lines += [f"r1deploy_gateway_{name}_tokens_total{_labels(model=m)} {n}" for m, n in sorted(table.items())]
        lines += ["# HELP r1deploy_gateway_time_to_first_token_seconds Request received to first generated text sent.",
                  "# TYPE r1deploy_gateway_time_to_first_token_seconds histogram"]
        for model, counts in sorted(self.ttft.items()):
            running = 0
            for bound, n in zip([*map(str, TTFT_BUCKETS_S), "+Inf"], counts, strict=True):
                running += n
                lines.append(f"r1deploy_gateway_time_to_first_token_seconds_bucket{_labels(model=model, le=bound)} {running}")
            lines.append(f"r1deploy_gateway_time_to_first_token_seconds_sum{_labels(model=model)} {self.ttft_sum[model]:.6f}")
            lines.append(f"r1deploy_gateway_time_to_first_token_seconds_count{_labels(model=model)} {running}")
        lines += ["# HELP r1deploy_gateway_requests_in_flight Requests being generated now.",
                  "# TYPE r1deploy_gateway_requests_in_flight gauge", f"r1deploy_gateway_requests_in_flight {self.in_flight}",
                  "# HELP r1deploy_gateway_cancelled_total Requests whose client went away before the end (Triton request cancelled).",
                  "# TYPE r1deploy_gateway_cancelled_total counter", f"r1deploy_gateway_cancelled_total {self.cancelled}"]
        return "\n".join(lines) + "\n"
