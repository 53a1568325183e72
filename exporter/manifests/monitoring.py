"""Everything that reads Triton's Prometheus metrics: the ServiceMonitor that scrapes them, the Prometheus adapter
rule behind the HPA, the alert rules and the Grafana dashboard. Every metric named here must be one Triton's
metrics port exports — Triton's own (`TRITON_METRICS`) or the generate model's scheduler metrics
(`GENERATE_METRICS`, custom metrics of the python backend); `checks.py` enforces it on the rendered objects.

For LLMs (decoders) the queue lives inside the generate model — its in-flight batching scheduler takes every
request at once and queues it itself — so Triton's `nv_inference_queue_duration_us` no longer sees the wait: the
HPA and the queue-time alert read the scheduler's `r1deploy_generate_queue_duration_us` instead."""

from __future__ import annotations

import json
import re
from typing import Optional

from ..core.profiles import DeploymentProfile

# Metrics Triton's /metrics endpoint exports (port 8002), counters, gauges and summaries.
TRITON_METRICS: frozenset[str] = frozenset({
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_first_response_histogram_ms",
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
    "nv_cpu_utilization",
    "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
})
TRITON_METRIC_PREFIXES = ("nv_cache_",)  # response-cache metrics: nv_cache_num_hits_per_model, …
# The generate model's scheduler metrics (exporter/repository/python_models/generate.py, `_Metrics`).
GENERATE_METRICS: frozenset[str] = frozenset({
    "r1deploy_generate_requests_waiting",
    "r1deploy_generate_requests_running",
    "r1deploy_generate_kv_cache_utilization",
    "r1deploy_generate_kv_cache_tokens",
    "r1deploy_generate_queue_duration_us",
    "r1deploy_generate_requests_admitted",
    "r1deploy_generate_time_to_first_token_us",
    "r1deploy_generate_first_tokens",
    "r1deploy_generate_generated_tokens",
    "r1deploy_generate_requests_rejected",
    "r1deploy_generate_requests_finished",
})

# The HPA's Pods metric: mean queue time per request (µs), served by the Prometheus adapter rules below — the
# scheduler's for decoders, Triton's for encoders.
QUEUE_TIME_METRIC = "r1deploy_generate_queue_duration_us_per_request"
TRITON_QUEUE_TIME_METRIC = "nv_inference_queue_duration_us_per_request"
# metric name → (queue-time counter, request counter) whose rate ratio is the mean queue time per request
_QUEUE_SOURCES = {
    QUEUE_TIME_METRIC: ("r1deploy_generate_queue_duration_us", "r1deploy_generate_requests_admitted"),
    TRITON_QUEUE_TIME_METRIC: ("nv_inference_queue_duration_us", "nv_inference_request_success"),
}
ADAPTER_RULES: dict[str, dict] = {
    name: {
        "seriesQuery": f'{queue}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{queue}$", "as": name},
        "metricsQuery": (
            f"sum(rate({queue}{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>)"
            f" / clamp_min(sum(rate({count}{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>), 0.001)"
        ),
    }
    for name, (queue, count) in _QUEUE_SOURCES.items()
}


def queue_time_metric(kind: str) -> str:
    """The HPA metric for a model kind: decoders queue inside the generate model, encoders in Triton."""
    return QUEUE_TIME_METRIC if kind == "decoder" else TRITON_QUEUE_TIME_METRIC


def _mean_queue_time(kind: str, sel: str, per: str, window: str) -> str:
    queue, count = _QUEUE_SOURCES[queue_time_metric(kind)]
    return f"sum {per} (rate({queue}{{{sel}}}[{window}])) / clamp_min(sum {per} (rate({count}{{{sel}}}[{window}])), 0.001)"

_PROMQL_WORDS = frozenset(
    "sum avg min max count rate irate increase delta idelta by without on ignoring group_left group_right and or "
    "unless bool offset clamp_min clamp_max abs absent histogram_quantile quantile topk bottomk avg_over_time "
    "max_over_time min_over_time sum_over_time vector scalar time label_replace round ceil floor".split()
)


def is_triton_metric(name: str) -> bool:
    """Exported on Triton's metrics port: Triton's own, or the generate model's."""
    return name in TRITON_METRICS or name in GENERATE_METRICS or name.startswith(TRITON_METRIC_PREFIXES)


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (label matchers, grouping labels, durations and functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"<<[^>]*>>", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]|e\d*", n)}


def hpa_metric_sources(name: str) -> Optional[set[str]]:
    """The Triton metrics behind an HPA metric name (itself, or the adapter rule's query); None if unknown."""
    if is_triton_metric(name):
        return {name}
    rule = ADAPTER_RULES.get(name)
    return promql_metrics(rule["metricsQuery"]) if rule else None


def adapter_config() -> dict:
    """The `rules:` block for prometheus-adapter's config (docs/deploy.md explains where it goes)."""
    return {"rules": [ADAPTER_RULES[name] for name in sorted(ADAPTER_RULES)]}


def queue_time_target_us(profile: DeploymentProfile) -> int:
    """Mean queue time per request that triggers a scale-up: a tenth of the TTFT p99 target (queueing is the part
    of TTFT that more replicas remove), else of the deprecated whole-request p99, else 50 ms."""
    if profile.slo.ttft_p99_ms:
        return int(profile.slo.ttft_p99_ms * 1e3 / 10)
    if profile.slo.p99_latency_s:
        return int(profile.slo.p99_latency_s * 1e6 / 10)
    return 50_000


def _selector(namespace: str) -> str:
    return f'namespace="{namespace}"'


def alert_rules(profile: DeploymentProfile, namespace: str, kind: str = "decoder") -> list[dict]:
    sel = _selector(namespace)
    queue_us = queue_time_target_us(profile) * 2
    per_pod = "by (namespace, pod)"
    rules = [
        {
            "alert": "TritonQueueTimeHigh",
            "expr": f"{_mean_queue_time(kind, sel, per_pod, '5m')} > {queue_us}",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Triton requests wait too long in the queue",
                "description": f"Mean queue time per request above {queue_us} us for 10 minutes on {{{{ $labels.pod }}}}"
                f" (profile {profile.name}); scale out or lower the batch delay.",
            },
        },
        {
            "alert": "TritonInferenceFailureRate",
            "expr": (
                f"sum {per_pod} (rate(nv_inference_request_failure{{{sel}}}[5m]))"
                f" / clamp_min(sum {per_pod} (rate(nv_inference_request_success{{{sel}}}[5m]))"
                f" + sum {per_pod} (rate(nv_inference_request_failure{{{sel}}}[5m])), 0.001) > 0.01"
            ),
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "More than 1% of Triton inference requests fail",
                "description": "Failure ratio above 1% for 5 minutes on {{ $labels.pod }}.",
            },
        },
        {
            "alert": "TritonGpuMemoryHigh",
            "expr": f"max by (namespace, pod, gpu_uuid) (nv_gpu_memory_used_bytes{{{sel}}}"
            f" / nv_gpu_memory_total_bytes{{{sel}}}) > 0.95",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "A GPU serving Triton is above 95% memory",
                "description": "GPU {{ $labels.gpu_uuid }} on {{ $labels.pod }} above 95% memory for 15 minutes.",
            },
        },
    ]
    if kind == "decoder":
        rules += [
            {
                "alert": "GenerateRequestsRefused",
                "expr": f"sum {per_pod} (rate(r1deploy_generate_requests_rejected{{{sel}}}[5m])) > 0",
                "for": "5m",
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": "The generate model refuses requests: its queue is full",
                    "description": "{{ $labels.pod }} answered \"server busy\" for 5 minutes; scale out or raise max_queue.",
                },
            },
            {
                "alert": "GenerateKvCacheFull",
                "expr": f"max {per_pod} (r1deploy_generate_kv_cache_utilization{{{sel}}}) > 0.95",
                "for": "15m",
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": "The generate model's KV-cache budget is nearly all reserved",
                    "description": "Over 95% of the KV budget reserved for 15 minutes on {{ $labels.pod }}: requests wait for room.",
                },
            },
        ]
    return rules


def prometheus_rule(name: str, profile: DeploymentProfile, namespace: str, kind: str = "decoder") -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name},
        "spec": {"groups": [{"name": f"{name}.triton", "rules": alert_rules(profile, namespace, kind)}]},
    }


def service_monitor(name: str, selector: dict, gateway: bool = False) -> dict:
    """Triton's metrics port, and the OpenAI gateway's /metrics (on its API port) where the pod runs one."""
    endpoints = [{"port": "metrics", "path": "/metrics", "interval": "15s", "scheme": "http"}]
    if gateway:
        endpoints.append({"port": "openai", "path": "/metrics", "interval": "15s", "scheme": "http"})
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": selector},
            "endpoints": endpoints,
        },
    }


def _panel(pid: int, title: str, expr: str, unit: str, x: int, y: int) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "targets": [{"expr": expr, "refId": "A", "legendFormat": "{{pod}}"}],
    }


DASHBOARD_PANELS: tuple[tuple[str, str, str], ...] = (
    ("Requests per second", 'sum by (pod) (rate(nv_inference_request_success{namespace="$namespace"}[1m]))', "reqps"),
    ("Failures per second", 'sum by (pod) (rate(nv_inference_request_failure{namespace="$namespace"}[1m]))', "reqps"),
    (
        "Queue time per request",
        'sum by (pod) (rate(nv_inference_queue_duration_us{namespace="$namespace"}[1m]))'
        ' / clamp_min(sum by (pod) (rate(nv_inference_request_success{namespace="$namespace"}[1m])), 0.001)',
        "µs",
    ),
    (
        "Compute time per inference",
        'sum by (pod) (rate(nv_inference_compute_infer_duration_us{namespace="$namespace"}[1m]))'
        ' / clamp_min(sum by (pod) (rate(nv_inference_count{namespace="$namespace"}[1m])), 0.001)',
        "µs",
    ),
    ("Generate: requests running", 'sum by (pod) (r1deploy_generate_requests_running{namespace="$namespace"})', "short"),
    ("Generate: requests waiting", 'sum by (pod) (r1deploy_generate_requests_waiting{namespace="$namespace"})', "short"),
    (
        "Generate: scheduler queue time per request",
        'sum by (pod) (rate(r1deploy_generate_queue_duration_us{namespace="$namespace"}[1m]))'
        ' / clamp_min(sum by (pod) (rate(r1deploy_generate_requests_admitted{namespace="$namespace"}[1m])), 0.001)',
        "µs",
    ),
    (
        "Generate: time to first token",
        'sum by (pod) (rate(r1deploy_generate_time_to_first_token_us{namespace="$namespace"}[1m]))'
        ' / clamp_min(sum by (pod) (rate(r1deploy_generate_first_tokens{namespace="$namespace"}[1m])), 0.001)',
        "µs",
    ),
    ("Generate: tokens per second", 'sum by (pod) (rate(r1deploy_generate_generated_tokens{namespace="$namespace"}[1m]))', "short"),
    ("GPU utilization", 'avg by (pod) (nv_gpu_utilization{namespace="$namespace"})', "percentunit"),
    (
        "GPU memory used",
        'max by (pod, gpu_uuid) (nv_gpu_memory_used_bytes{namespace="$namespace"}'
        ' / nv_gpu_memory_total_bytes{namespace="$namespace"})',
        "percentunit",
    ),
)


def dashboard(title: str) -> dict:
    panels = [_panel(i + 1, t, e, u, 12 * (i % 2), 8 * (i // 2)) for i, (t, e, u) in enumerate(DASHBOARD_PANELS)]
    return {
        "title": title,
        "uid": re.sub(r"[^a-z0-9-]", "-", title.lower())[:40],
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "tags": ["r1deploy", "triton"],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(nv_inference_request_success, namespace)",
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def dashboard_configmap(name: str, title: str) -> dict:
    # `grafana_dashboard: "1"` is the label Grafana's dashboard sidecar (kube-prometheus-stack) watches for.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"grafana_dashboard": "1"}},
        "data": {f"{name}.json": json.dumps(dashboard(title), indent=2, sort_keys=True, ensure_ascii=False) + "\n"},
    }
