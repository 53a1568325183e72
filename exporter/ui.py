"""Console output: progress on stderr (Rich) for work longer than a second; silent with -q or --json."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_state = {"quiet": False, "verbose": False}
log = logging.getLogger("r1deploy")


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state.update(quiet=quiet, verbose=verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    # Third-party progress bars and warnings are noise on a CLI unless -v. Environment variables, read when
    # those libraries are imported: importing transformers here would cost every command seconds.
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        quiet_library_logs()


def quiet_library_logs() -> None:
    """torch configures its own loggers on import (and the ONNX exporter warns about every missing optional
    op library): call again after importing torch. No-op with -v."""
    if _state["verbose"]:
        return
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    if _state["quiet"]:
        yield
        return
    with console.status(escape(message), spinner="dots"):
        yield
    console.print(f"[green]✓[/green] {escape(message)}", highlight=False)


def info(message: str) -> None:
    if not _state["quiet"]:
        console.print(escape(message), highlight=False)

# Results (human summaries) go to stdout; progress and errors to stderr.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
