"""An OpenAI-compatible API (chat and completions, SSE streaming, R1 reasoning split, usage, API keys) in front of
Triton's `generate` model — a library (`GatewayConfig`, `GatewayServer`) under the thin `r1deploy gateway`
command, started beside Triton by `r1deploy serve`."""

from __future__ import annotations

from .app import Gateway, GatewayConfig, GatewayServer
from .keys import API_KEYS_ENV, load_api_keys

__all__ = ["API_KEYS_ENV", "Gateway", "GatewayConfig", "GatewayServer", "load_api_keys"]
