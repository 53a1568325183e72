"""Console output: progress on stderr (Rich) for work longer than a second; silent with -q or --json."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from rich.console import Console

console = Console(stderr=True)
_state = {"quiet": False, "verbose": False}
log = logging.getLogger("r1deploy")


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state.update(quiet=quiet, verbose=verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    # Third-party progress bars and warnings are noise on a CLI unless -v.
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("torch.onnx", "onnxscript", "torch._export", "torch.export"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    if _state["quiet"]:
        yield
        return
    with console.status(message, spinner="dots"):
        yield
    console.print(f"[green]✓[/green] {message}", highlight=False)


def info(message: str) -> None:
    if not _state["quiet"]:
        console.print(message, highlight=False)

# Results (human summaries) go to stdout; progress and errors to stderr.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
