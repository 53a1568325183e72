"""API keys for the gateway: from a file or an environment variable, never logged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..core.errors import BadInput

API_KEYS_ENV = "R1DEPLOY_API_KEYS"


def load_api_keys(path: Optional[Path] = None, env: str = API_KEYS_ENV) -> list[str]:
    """Keys from a file (one per line; blank lines and # comments skipped — in Kubernetes a mounted Secret) and
    from an environment variable (comma- or newline-separated). Never logged."""
    keys: list[str] = []
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BadInput(f"--api-key-file {path}: {exc.strerror}") from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            raise BadInput(f"--api-key-file {path} holds no key")
    raw = os.environ.get(env, "")
    keys += [k.strip() for k in raw.replace("\n", ",").split(",") if k.strip()]
    return keys

