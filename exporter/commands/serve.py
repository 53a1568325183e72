from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from ..core.errors import BadInput, StageFailed
from ..core.ui import out as console
from ..health import ModelWatch, probed_models
from ..serve import ServerConfig, TritonServer, port_in_use
from .common import App, pass_app


@click.command("serve")
@click.option("--repository", "repositories", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Triton model repository (repeat to serve several; model names must not clash).")
@click.option("--http-port", type=int, default=0, help="0: a free port.")
@click.option("--grpc-port", type=int, default=0, help="0: a free port.")
@click.option("--metrics-port", type=int, default=0, help="0: a free port.")
@click.option("--cache-mib", type=int, default=64, show_default=True,
              help="Response cache size (models with response_cache enabled, e.g. embed); 0 turns it off.")
@click.option("--log-file", type=click.Path(path_type=Path), help="Server log [default: a temporary file].")
@click.option("--log-verbose", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--startup-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the server (and every model) to be ready.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=5, show_default=True,
              help="Restart a server that dies (a crash, the OOM killer) this many times before giving up.")
@click.option("--openai-port", type=click.IntRange(0, 65535), default=0,
              help="The OpenAI-compatible gateway's port beside Triton (0: a free port).")
@click.option("--no-openai", is_flag=True, help="Do not start the OpenAI-compatible gateway.")
@click.option("--api-key-file", type=click.Path(path_type=Path), help="The gateway's API keys, one per line (also $R1DEPLOY_API_KEYS).")
@pass_app
def command(app: App, repositories, http_port, grpc_port, metrics_port, cache_mib, log_file, log_verbose,
            startup_timeout, max_restarts, openai_port, no_openai, api_key_file):
    """Serve a model repository with a real Triton server on 127.0.0.1 until Ctrl-C or SIGTERM, and the
    OpenAI-compatible gateway in front of it when the repository holds an LLM or an embedding model; a server that dies is started
    again on the same ports (saying so), up to --max-restarts times."""
    if cache_mib < 0:
        raise BadInput(f"--cache-mib must be ≥ 0, got {cache_mib}")
    cfg = ServerConfig(
        model_repository=repositories[0], extra_repositories=list(repositories[1:]), http_port=http_port,
        grpc_port=grpc_port, metrics_port=metrics_port, response_cache_bytes=cache_mib << 20, log_file=log_file,
        log_verbose=log_verbose, startup_timeout_s=startup_timeout,
    )
    if not no_openai and openai_port and port_in_use(openai_port):
        raise BadInput(f"--openai-port {openai_port} on 127.0.0.1 is already in use: stop what listens there or choose another")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(cfg)
    gateway = None
    restarts = 0
    # the LLM models' own health (exporter/health.py): Triton stays "ready" when a model's process is dead
    watch = ModelWatch(server.endpoints.grpc, probed_models(repositories))

    def announce() -> None:
        info = {"pid": server.pid, "http": server.endpoints.http, "grpc": server.endpoints.grpc,
                "metrics": server.endpoints.metrics, "log": str(server.log_path), "restarts": restarts}
        if gateway is not None:
            info["openai"] = gateway.url
        if app.as_json:
            sys.stdout.write(json.dumps(info) + "\n")
            sys.stdout.flush()
        elif not app.quiet:
            console.print(f"tritonserver ready (pid {server.pid}); Ctrl-C or SIGTERM stops it")
            for key in ("http", "grpc", "metrics", "openai", "log"):
                if key in info:
                    console.print(f"  {key:<8} {info[key]}" + ("/v1" if key == "openai" else ""))

    try:
        server.start()
        if not no_openai:
            from .gateway import start_beside_triton

            # the gateway stays up across Triton restarts: they keep the same ports
            gateway = start_beside_triton(app, server.endpoints.grpc, repositories, openai_port, api_key_file)
        announce()
        watch.start()
        while not stop.wait(0.5):
            code = server.process.poll()
            failing = watch.failing() if code is None else None
            if code is None and failing is None:
                continue
            if code is not None:
                why = f"tritonserver (pid {server.pid}) {f'exited with code {code}' if code >= 0 else f'was killed by signal {-code}'}"
            else:
                why = f"model {failing[0]} of tritonserver (pid {server.pid}) is unhealthy ({failing[1]})"
            if restarts >= max_restarts:
                raise StageFailed(f"{why}; not restarted after {restarts} restart(s) (--max-restarts) (log: {server.log_path})")
            restarts += 1
            # said on stderr even with --json/-q: a restart is news to whoever runs this
            click.echo(f"{why}; restarting it ({restarts}/{max_restarts})", err=True)
            # Triton 2.51 cannot reload a python model whose stub died (its unload waits for the dead stub), so the
            # server is restarted; its ports stay the same, and the gateway reconnects
            server.kill()  # the rest of its process group and its shared memory
            server.start()
            watch.reset()
            announce()
    finally:
        watch.stop()
        if gateway is not None:
            gateway.stop()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
