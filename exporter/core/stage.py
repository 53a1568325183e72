"""The skeleton every build stage (export, quantize, build-engine) follows, so that each is only its own work:

    out = StageOutput(stage, directory, inputs=sha256 of what it reads, config=what shapes it, tools=versions)
    if out.up_to_date(force):          # fingerprint of inputs + config + tools, checked against manifest.json
        return <result read back from the directory>
    ... the stage's work ...
    with out.writing() as tmp:         # a temporary sibling of the directory
        ... write the artifacts and the stage's report into tmp ...
    # here manifest.json (fingerprint, inputs, every output's sha256 and size, config, tools) has been written
    # into tmp and tmp has replaced the directory in one rename; on an exception nothing replaced it
    return <result>

The file formats (manifest.json, the atomic replace) live in `artifacts`; this module only fixes their order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import artifacts


@dataclass(frozen=True)
class StageOutput:
    """The directory one stage owns, and what it is made from."""

    stage: str  # "export", "quantize", "engine": recorded in the manifest
    directory: Path
    inputs: dict[str, str]  # relative path → sha256 of every file the stage reads
    config: dict[str, Any]  # the settings that shape the output, as the manifest records them
    tools: dict[str, str]  # package → version of what writes the output
    # What the fingerprint hashes in place of `config`, when more than the recorded settings decides the output
    # (the export stage adds the checkpoint's architecture).
    key: Optional[dict[str, Any]] = None

    @property
    def fingerprint(self) -> str:
        return artifacts.fingerprint(self.inputs, self.config if self.key is None else self.key, self.tools)

    def up_to_date(self, force: bool = False) -> bool:
        """Complete, and made from the same inputs, settings and tools (never, when forced)."""
        return not force and artifacts.is_up_to_date(self.directory, self.fingerprint)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary directory to write the outputs into. When the block ends without an error, the manifest is
        written last (it lists every other file) and the directory replaces `directory` in one rename; on an
        error it is removed and whatever was at `directory` stays as it was."""
        with artifacts.atomic_dir(self.directory) as tmp:
            yield tmp
            artifacts.write_manifest(tmp, stage=self.stage, fp=self.fingerprint, inputs=self.inputs,
                                     config=self.config, tools=self.tools)
