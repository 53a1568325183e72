"""A real Prometheus (Debian's 2.42 package, unpacked by `make prometheus`) scrapes a real CPU Triton serving
`generate` while requests run, and evaluates what the manifests deploy: the production overlay's PrometheusRule
(promtool checks it; every alert expression, its threshold removed, evaluates to series) and the Prometheus
adapter rule behind the HPA (its query, with the adapter's placeholders filled in, returns the pod's queue time)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from conftest import REPO
from test_serve import PROMPT, grpc_inputs, grpc_stream

from exporter.repository import RepositoryConfig, write_repository
from exporter.serve import ServerConfig, TritonServer

PROM_BIN = REPO / ".venv/prometheus/usr/bin"
NAMESPACE = "r1deploy-production"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (PROM_BIN / "prometheus").is_file(),
                       reason="no Prometheus: `make prometheus` unpacks Debian's prometheus package into .venv"),
]


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendered_rules_evaluate_on_a_scraped_triton(exported, session_workdir, tmp_path):
    rule_obj = yaml.safe_load((REPO / "k8s/overlays/production/prometheusrule.yaml").read_text())
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule_obj["spec"]["groups"]}))
    check = subprocess.run([str(PROM_BIN / "promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    exported("r1-distill-tiny")
    repo = write_repository(RepositoryConfig(
        model="r1-distill-tiny", profile="edge", variant="python_ort", workdir=session_workdir, out=tmp_path / "repo",
        onnx_variant="fp32", max_rows=2,
    ))
    with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
        port = free_port()
        config = {
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"},
            "rule_files": [str(rules_file)],
            # the labels a ServiceMonitor scrape gives every series in the cluster
            "scrape_configs": [{"job_name": "triton", "static_configs": [
                {"targets": [srv.endpoints.metrics], "labels": {"namespace": NAMESPACE, "pod": "triton-0"}}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen(
            [str(PROM_BIN / "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=(tmp_path / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        stop = threading.Event()

        def load():  # more requests than rows, so some wait in the scheduler's queue
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(4) as pool:
                while not stop.is_set():
                    list(pool.map(lambda _: grpc_stream(srv, grpc_inputs(PROMPT, max_tokens=48, ignore_eos=True)), range(4)))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            deadline = time.monotonic() + 90
            adapter = yaml.safe_load((REPO / "k8s/extras/prometheus-adapter-rules.yaml").read_text())["rules"]
            decoder_rule = next(r for r in adapter if r["seriesQuery"].startswith("r1deploy_generate_"))
            hpa_expr = (decoder_rule["metricsQuery"].replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}"')
                        .replace("<<.GroupBy>>", "pod"))
            alerts = [r for g in rule_obj["spec"]["groups"] for r in g["rules"]]
            pending = {r["alert"]: re.sub(r"\s*>\s*[0-9.e+]+\s*$", "", r["expr"]) for r in alerts}
            # GPU memory series do not exist on a CPU Triton
            pending.pop("TritonGpuMemoryHigh")
            hpa_value = None
            while time.monotonic() < deadline and (pending or hpa_value is None):
                time.sleep(1)
                try:
                    for name, expr in list(pending.items()):
                        if query(base, expr):
                            pending.pop(name)
                    result = query(base, hpa_expr)
                    if result and float(result[0]["value"][1]) > 0:
                        hpa_value = float(result[0]["value"][1])
                        assert result[0]["metric"]["pod"] == "triton-0"
                except urllib.error.HTTPError as exc:  # a query Prometheus refuses: the rule is broken
                    raise AssertionError(f"{exc}: {exc.read().decode(errors='replace')}") from None
                except OSError:
                    assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                    continue  # Prometheus still starting
            targets = json.loads(urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10).read())["data"]
            assert not pending, f"alert expressions without series under load: {pending}; targets: {targets}"
            assert hpa_value is not None and hpa_value > 0, "the HPA's queue-time query returned nothing"
        finally:
            stop.set()
            loader.join(timeout=60)
            prom.terminate()
            prom.wait(timeout=30)
    shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)
