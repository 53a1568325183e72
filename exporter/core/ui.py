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
        quiet_known_warnings()
        quiet_library_logs()


# Warnings seen on every run of a stage that say nothing about the user's model: (category name, message regex,
# why it is safe to hide). Anything else — numerics, deprecations of what r1deploy calls, ONNX Runtime's own —
# is shown; -v shows these too.
KNOWN_NOISE = (
    ("FutureWarning", r"`isinstance\(treespec, LeafSpec\)` is deprecated", "torch's own internals (dynamo export)"),
    ("UserWarning", r"# The axis name: \w+ will not be used", "dynamo export: two inputs share one dynamic axis, by design"),
    ("FutureWarning", r"`past_key_values` is deprecated", "transformers renames the argument; the export wrapper passes the cache it documents"),
    ("OnnxExporterWarning", r"Exporting to ONNX opset version \d+ is not supported", "the legacy exporter at opset 21: the graph is verified against PyTorch after export"),
    ("TracerWarning", r"", "the legacy exporter's tracer: every exported graph is verified against PyTorch on several shapes"),
    ("UserWarning", r"Exporting aten::index operator of advanced indexing", "legacy exporter: verified against PyTorch after export"),
)


def quiet_known_warnings() -> None:
    import re
    import warnings

    for category, pattern, _why in KNOWN_NOISE:
        # categories defined in torch are matched by name through the message filter's module-independent form
        cls = {"FutureWarning": FutureWarning, "UserWarning": UserWarning}.get(category)
        if cls is not None:
            warnings.filterwarnings("ignore", message=pattern, category=cls)
        else:
            _by_name[category] = re.compile(pattern)
    if _by_name and not _state.get("hooked"):
        _state["hooked"] = True
        previous = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            rx = next((r for name, r in _by_name.items() if any(c.__name__ == name for c in category.__mro__)), None)
            if rx is not None and rx.search(str(message)):
                return
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning


_by_name: dict = {}


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
