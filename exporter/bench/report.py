"""Writing a `BenchResult`: bench.json (everything), bench.csv (one row per level), bench.png (latency against
throughput; TTFT and inter-token latency for LLMs), and the Rich table printed by the CLI."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..core.typed import to_data
from .result import BenchResult, LevelResult

CSV_COLUMNS = [
    "concurrency", "request_rate", "stable", "seconds", "requests", "errors", "throughput_rps",
    "latency_avg_ms", "latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms",
    "server_queue_us", "server_compute_us", "server_avg_batch", "client_cpu_us_per_request",
    "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tokens_per_s",
]


def _row(lv: LevelResult) -> dict:
    lat, s, llm = lv.latency_ms, lv.server, lv.llm
    return {
        "concurrency": lv.concurrency or "", "request_rate": lv.request_rate or "", "stable": lv.stable,
        "seconds": round(lv.seconds, 3), "requests": lv.requests, "errors": lv.errors,
        "throughput_rps": round(lv.throughput_rps, 2),
        "latency_avg_ms": round(lat.avg, 3), "latency_p50_ms": round(lat.p50, 3), "latency_p90_ms": round(lat.p90, 3),
        "latency_p95_ms": round(lat.p95, 3), "latency_p99_ms": round(lat.p99, 3),
        "server_queue_us": round(s.queue_us, 1) if s else "", "server_compute_us": round(s.compute_us, 1) if s else "",
        "server_avg_batch": round(s.avg_batch_size, 2) if s else "",
        "client_cpu_us_per_request": round(lv.client_cpu_us_per_request, 1),
        "ttft_p50_ms": round(llm.ttft_ms.p50, 3) if llm else "", "ttft_p99_ms": round(llm.ttft_ms.p99, 3) if llm else "",
        "itl_p50_ms": round(llm.itl_ms.p50, 3) if llm else "", "itl_p99_ms": round(llm.itl_ms.p99, 3) if llm else "",
        "output_tokens_per_s": round(llm.output_tokens_per_s, 1) if llm else "",
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(result: BenchResult, out_dir: Path) -> Path:
    path = out_dir / "bench.json"
    _atomic_write(path, lambda p: p.write_text(json.dumps(to_data(result), indent=2) + "\n"))
    return path


def write_csv(result: BenchResult, out_dir: Path) -> Path:
    path = out_dir / "bench.csv"

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for lv in result.levels:
                w.writerow(_row(lv))

    _atomic_write(path, write)
    return path


def write_plot(result: BenchResult, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out_dir / "bench.png"
    levels = [lv for lv in result.levels if lv.requests]
    labels = [f"c={lv.concurrency}" if lv.concurrency else f"{lv.request_rate:g}/s" for lv in levels]
    llm = result.kind == "llm"
    fig, axes = plt.subplots(1, 3 if llm else 1, figsize=(15 if llm else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    x = [lv.throughput_rps for lv in levels]
    for name, key in (("p50", "p50"), ("p99", "p99")):
        ax.plot(x, [getattr(lv.latency_ms, key) for lv in levels], marker="o", label=f"{name} latency")
    for xi, yi, label in zip(x, [lv.latency_ms.p50 for lv in levels], labels, strict=True):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title(f"{result.model} ({result.protocol})")
    ax.grid(alpha=0.3)
    ax.legend()
    if llm:
        xs = list(range(len(levels)))
        for ax, attr, title in ((axes[0][1], "ttft_ms", "time to first token"), (axes[0][2], "itl_ms", "inter-token latency")):
            for key in ("p50", "p99"):
                ax.plot(xs, [getattr(getattr(lv.llm, attr), key) for lv in levels], marker="o", label=key)
            ax.set_xticks(xs, labels)
            ax.set_xlabel("load")
            ax.set_ylabel("ms")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path


def write_all(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """JSON and CSV always; the plot when there is something to plot. Called after every level (partial results)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.files = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv"}
    if any(lv.requests for lv in result.levels):
        result.files["png"] = out_dir / "bench.png"
    write_csv(result, out_dir)
    if "png" in result.files:
        write_plot(result, out_dir)
    write_json(result, out_dir)
    return result.files


def table(result: BenchResult):
    from rich.table import Table

    llm = result.kind == "llm"
    t = Table(title=f"{result.model} over {result.protocol} at {result.url}", title_justify="left")
    for col in ("load", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "queue µs", "compute µs", "batch", "client µs/req"):
        t.add_column(col, justify="right")
    if llm:
        for col in ("TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "tokens/s"):
            t.add_column(col, justify="right")
    for lv in result.levels:
        s = lv.server
        load = f"c={lv.concurrency}" if lv.concurrency else f"{lv.request_rate:g}/s"
        row = [
            load + ("" if lv.stable else " (unstable)"), f"{lv.throughput_rps:.1f}", f"{lv.latency_ms.p50:.2f}",
            f"{lv.latency_ms.p90:.2f}", f"{lv.latency_ms.p99:.2f}", str(lv.errors),
            f"{s.queue_us:.0f}" if s else "-", f"{s.compute_us:.0f}" if s else "-",
            f"{s.avg_batch_size:.2f}" if s else "-", f"{lv.client_cpu_us_per_request:.0f}",
        ]
        if llm:
            m = lv.llm
            row += [f"{m.ttft_ms.p50:.1f}", f"{m.ttft_ms.p99:.1f}", f"{m.itl_ms.p50:.2f}", f"{m.itl_ms.p99:.2f}",
                    f"{m.output_tokens_per_s:.1f}"] if m else ["-"] * 5
        t.add_row(*row)
    return t
