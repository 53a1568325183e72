from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from ..core.errors import BadInput, StageFailed
from ..core.ui import out as console
from .common import App, pass_app, profile_option


def gateway_config(app: App, triton: str, repositories, host: str, port: int, api_key_file, served_model_names,
                   profile_name, max_body_bytes: int = 1 << 20):
    """The GatewayConfig of the options `r1deploy gateway` and `r1deploy serve` share."""
    from ..gateway import GatewayConfig, load_api_keys

    host_part, sep, port_part = triton.rpartition(":")
    if not sep or not host_part or not port_part.isdigit():
        raise BadInput(f"--triton must be HOST:PORT (Triton's gRPC endpoint), got {triton!r}")
    sampling = app.profile(profile_name).sampling.as_dict() if profile_name else {}
    return GatewayConfig(
        triton=triton, repositories=list(repositories), host=host, port=port, api_keys=load_api_keys(api_key_file),
        served_model_names=list(served_model_names), sampling=sampling, max_body_bytes=max_body_bytes,
    )


@click.command("gateway")
@click.option("--triton", required=True, help="Triton's gRPC endpoint HOST:PORT (localhost:8001 in the pod).")
@click.option("--repository", "repositories", multiple=True, required=True, type=click.Path(path_type=Path),
              help="The model repository Triton serves (repeat for several): model names, tokenizer, chat template, limits.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 in a pod).")
@click.option("--port", type=int, default=9000, show_default=True, help="0: a free port.")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Accepted API keys, one per line (also $R1DEPLOY_API_KEYS); none: no authentication.")
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="Another model id for the repository's LLM (e.g. the checkpoint's name).")
@profile_option(help_text="Deployment profile whose default sampling (temperature, top_p) applies to requests that set none.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Larger request bodies get 413.")
@pass_app
def command(app: App, triton, repositories, host, port, api_key_file, served_model_names, profile_name, max_body_bytes):
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) in front of a
    running Triton, until Ctrl-C or SIGTERM."""
    from ..gateway import GatewayServer

    cfg = gateway_config(app, triton, repositories, host, port, api_key_file, served_model_names, profile_name,
                         max_body_bytes)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = GatewayServer(cfg)
    try:
        try:
            server.start()
        except OSError as exc:
            raise StageFailed(f"gateway cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        info = {"url": server.url, "triton": triton, "models": sorted(server.gateway.models),
                "auth": bool(cfg.api_keys)}
        if app.as_json:
            sys.stdout.write(json.dumps(info) + "\n")
        elif not app.quiet:
            console.print(f"gateway listening on {server.url} (OpenAI API; Triton {triton}); Ctrl-C or SIGTERM stops it")
            console.print(f"  models   {', '.join(info['models'])}")
            console.print(f"  api keys {'required' if cfg.api_keys else 'none (open)'}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            if not server.alive():
                raise StageFailed("the gateway stopped unexpectedly")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_beside_triton(app: App, grpc_endpoint: str, repositories, port: int, api_key_file):
    """For `r1deploy serve`: the gateway on 127.0.0.1:`port` in front of the Triton just started — chat and
    completions for the LLMs, /v1/embeddings for the embedding ensembles — or None when the repositories hold
    neither."""
    from ..gateway import GatewayServer
    from ..gateway.embeddings import read_embedding_models
    from ..gateway.models import read_repositories

    if not read_repositories(list(repositories), require=False) and not read_embedding_models(list(repositories)):
        return None
    cfg = gateway_config(app, grpc_endpoint, repositories, "127.0.0.1", port, api_key_file, (), None)
    try:
        return GatewayServer(cfg).start()
    except OSError as exc:
        raise StageFailed(f"gateway cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
