"""What aiohttp answers before any handler runs — a request line or a header over its 8190-byte limits, a malformed
request — in OpenAI's error shape, with one log line and no traceback.

aiohttp's own answer is plain text (`400 Bad Request` with the parser's message, which quotes the first 100 bytes
of the offending line: an oversized `Authorization` header would be echoed and logged) and it logs the parser's
traceback. The only hook is `RequestHandler.handle_error`, reached through the `Server` that `AppRunner` makes:
`JsonErrorRunner` swaps both for subclasses that change that one method.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .errors import ApiError

log = logging.getLogger("r1deploy.gateway")
_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")
RETRY_AFTER_S = 1  # a queue that is full drains in about one request's time


def error_headers(exc: ApiError) -> dict[str, str]:
    """429 (the model's queue is full) and 503 (the model being brought back) tell the client when to come back,
    as OpenAI's API does."""
    headers = dict(exc.headers)
    if exc.status in (429, 503):
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return headers


def parser_error(status: int, exc: BaseException | None) -> ApiError:
    """The client's malformed request as an ApiError; never quotes the request (it may hold a key)."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        line = bytes(line) if isinstance(line, (bytes, bytearray)) else str(line).encode("utf-8", "replace")
        limit = exc.args[1] if len(exc.args) > 1 else "8190"
        # the C parser quotes the URL (origin or absolute form), the Python one the whole request line
        if line.startswith((b"/", b"http://", b"https://")) or line.split(b" ", 1)[0] in _METHODS:
            return ApiError(414, f"request line longer than {limit} bytes", code="request_line_too_long")
        return ApiError(431, f"a request header longer than {limit} bytes", code="header_too_large")
    if isinstance(exc, BadHttpMessage) or 400 <= status < 500:
        return ApiError(status if 400 <= status < 500 else 400, f"malformed HTTP request: {type(exc).__name__}",
                        code="bad_http_request")
    return ApiError(status, "internal server error")


class _JsonErrorHandler(RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        if request.writer.output_size > 0:  # as aiohttp: a response is under way, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        err = parser_error(status, exc)
        if err.status >= 500:  # a fault of the gateway's own: the traceback is what an operator needs
            log.error("request from %s failed", request.remote, exc_info=exc)
        else:
            log.info("refused a request from %s: %s", request.remote, err.message)
        resp = web.json_response(err.body(), status=err.status, headers=error_headers(err))
        resp.force_close()
        return resp


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # the same object, only __call__ differs (aiohttp builds it privately)
        return server
