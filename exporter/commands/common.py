"""What every command shares: the application context (global options) and result output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import click

from ..core.profiles import DeploymentProfile, get_profile, load_profiles
from ..core.typed import to_data


@dataclass
class App:
    workdir: Path = Path("build")
    as_json: bool = False
    verbose: bool = False
    quiet: bool = False
    profiles_file: Optional[Path] = None
    profile_overrides: dict = field(default_factory=dict)
    _profiles: Optional[dict[str, DeploymentProfile]] = None

    @property
    def profiles(self) -> dict[str, DeploymentProfile]:
        if self._profiles is None:
            self._profiles = load_profiles(self.profiles_file, self.profile_overrides)
        return self._profiles

    def profile(self, name: str) -> DeploymentProfile:
        return get_profile(name, self.profiles)


pass_app = click.make_pass_decorator(App, ensure=True)


def emit(app: App, result: Any, human: Callable[[Any], None]) -> None:
    """`--json`: the typed result as JSON on stdout; otherwise a human summary (unless -q)."""
    if app.as_json:
        sys.stdout.write(json.dumps(to_data(result), indent=2, default=str) + "\n")
    elif not app.quiet:
        human(result)


def profile_option(default: Optional[str] = None, help_text: str = "Deployment profile (production, research, edge or your own).") -> Callable:
    return click.option("--profile", "profile_name", default=default, show_default=bool(default), help=help_text)


def model_options(f: Callable) -> Callable:
    """The model-source options shared by every stage that reads a checkpoint."""
    f = click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code (auto_map).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin/.pt) weights; safetensors only otherwise.")(f)
    f = click.option(
        "--model", default="r1-distill-tiny", show_default=True,
        help="Preset (r1-distill-tiny, r1-moe-tiny, minilm) or a local Hugging Face checkpoint directory.",
    )(f)
    return f


def force_option(f: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Redo the stage even if its inputs are unchanged.")(f)


def memory_check_option(f: Callable) -> Callable:
    return click.option(
        "--no-memory-check", is_flag=True,
        help="Start even when the stage's estimated peak memory (it holds the whole model) exceeds what this machine "
             "has available; by default it refuses before loading (exporter/core/memory.py).",
    )(f)
