from __future__ import annotations

from pathlib import Path

import click

from ..core.ui import out as console
from .common import App, emit, pass_app


def _human(r) -> None:
    console.print(f"batch: {r.succeeded} succeeded, {r.failed} failed in {r.seconds:.1f} s"
                  f" ({r.already_done} of {r.total} done by an earlier run)")
    console.print(f"  output {r.output}")
    if r.failed:
        console.print(f"  errors {r.errors}")


@click.command("batch")
@click.option("--url", required=True, help="The OpenAI-compatible endpoint, http://HOST:PORT (r1deploy gateway / serve).")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="OpenAI batch input: one {custom_id, method, url, body} per line.")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="OpenAI batch output, appended; custom_ids already in it are skipped (resume).")
@click.option("--errors", "errors_path", type=click.Path(path_type=Path),
              help="Failed requests with their reason [default: OUTPUT's stem + .errors.jsonl].")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Requests in flight at most.")
@click.option("--api-key-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="File whose first line is the API key (also $OPENAI_API_KEY).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per request.")
@click.option("--retries", type=int, default=3, show_default=True, help="Retries of a request on 429, 5xx or a lost connection.")
@pass_app
def command(app: App, url, input_path, output_path, errors_path, concurrency, api_key_file, timeout, retries):
    """Run an OpenAI batch file against the gateway: bounded concurrency, a progress bar, resumable (a rerun skips
    the custom_ids already written; each line is fsynced). Exit 0 only when every request succeeded."""
    import os

    from ..batch import BatchConfig, BatchFailed, run_batch

    key = None
    if api_key_file is not None:
        lines = [ln.strip() for ln in api_key_file.read_text().splitlines() if ln.strip()]
        key = lines[0] if lines else None
    key = key or os.environ.get("OPENAI_API_KEY") or None
    cfg = BatchConfig(url=url, input=input_path, output=output_path, errors=errors_path, concurrency=concurrency,
                      api_key=key, timeout_s=timeout, retries=retries, progress=not (app.quiet or app.as_json))
    try:
        result = run_batch(cfg)
    except BatchFailed as exc:
        emit(app, exc.result, _human)  # the counts, then the one-line error and exit 1
        raise
    emit(app, result, _human)
