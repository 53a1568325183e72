"""One exception family for the whole tool; the CLI turns it into one line on stderr and an exit code.

* `BadInput` (exit 2): the user gave something unusable — a missing path, an unknown preset, invalid YAML.
* `StageFailed` (exit 1): the input was fine but the work failed — parity out of tolerance, an accuracy gate.
"""

from __future__ import annotations


class R1DeployError(Exception):
    exit_code = 1

    def __init__(self, message: str):
        # One line, always: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class BadInput(R1DeployError):
    exit_code = 2


class StageFailed(R1DeployError):
    exit_code = 1


class MissingDependency(BadInput):
    """An optional runtime (TensorRT, Triton, kubectl) is not importable; the message names what to install."""


class BrokenDependency(StageFailed):
    """An optional runtime is installed but cannot be loaded (a missing shared library, a version mismatch): a
    failure to report with its error, never a skip."""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message — what one line of an error can quote of a library's failure —
    else `default` (the exception's type name when not given)."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default
