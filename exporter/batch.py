"""Batch jobs over the OpenAI API: OpenAI's batch input file (`custom_id`, `method`, `url`, `body` per line) in,
OpenAI's batch output file out, with bounded concurrency, resumable.

Resumable: each finished request is one line appended to the output (or the errors file), flushed and fsynced
before the next is written, so a crash or Ctrl-C loses at most the requests in flight; a rerun reads the
`custom_id`s both files already hold and sends only the rest, so none is written twice. Failed requests go to the
errors file with their reason; rerunning retries them (their old error lines are kept, the new outcome is added).
The whole input is validated before anything is sent: malformed lines and duplicate or missing `custom_id`s are bad
input naming the line."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .core.errors import BadInput, StageFailed

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
RETRY_STATUSES = (429, 502, 503, 504)


@dataclass
class BatchConfig:
    url: str  # the gateway's base URL: http://HOST:PORT (a trailing /v1 is accepted)
    input: Path
    output: Path
    errors: Optional[Path] = None  # default: <output stem>.errors.jsonl beside the output
    concurrency: int = 8
    api_key: Optional[str] = field(default=None, repr=False)
    timeout_s: float = 600.0
    retries: int = 3  # per request, for 429 / 5xx / connection errors, with backoff
    progress: bool = True

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        if self.errors is None:
            self.errors = self.output.with_name(self.output.stem + ".errors.jsonl")
        self.errors = Path(self.errors)
        if not self.url.startswith(("http://", "https://")):
            raise BadInput(f"--url must be http://HOST:PORT, got {self.url!r}")
        self.url = self.url.rstrip("/").removesuffix("/v1")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise BadInput(f"--concurrency must be an integer ≥ 1, got {self.concurrency!r}")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (math.isfinite(timeout) and timeout > 0):
            raise BadInput(f"--timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise BadInput(f"--retries must be an integer ≥ 0, got {self.retries!r}")
        for option, path in (("--output", self.output), ("--errors", self.errors)):
            if path.is_dir():
                raise BadInput(f"{option} {path} is a directory: give a file path")
            if path.exists() and not path.is_file():
                raise BadInput(f"{option} {path} is not a regular file")
        if self.output.resolve() == self.errors.resolve() or self.input.resolve() in (self.output.resolve(), self.errors.resolve()):
            raise BadInput("--input, --output and --errors must be three different files")


class BatchFailed(StageFailed):
    """Some requests failed (their lines are in the errors file); carries the run's result."""

    def __init__(self, message: str, result: BatchResult):
        super().__init__(message)
        self.result = result


@dataclass
class BatchRequest:
    line: int
    custom_id: str
    url: str
    body: dict


@dataclass
class BatchResult:
    output: Path
    errors: Path
    total: int
    already_done: int  # custom_ids found in the output from an earlier run
    succeeded: int  # in this run
    failed: int  # in this run
    seconds: float

    @property
    def complete(self) -> bool:
        return self.failed == 0


def read_input(path: Path) -> list[BatchRequest]:
    if not path.exists():
        raise BadInput(f"--input not found: {path}")
    if path.is_dir():
        raise BadInput(f"--input {path} is a directory: give the batch input file (JSON lines)")
    requests: list[BatchRequest] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"{where}: not UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                raise BadInput(f"{where}: not a JSON object") from None
            if not isinstance(row, dict):
                raise BadInput(f"{where}: not a JSON object")
            if "custom_id" not in row:
                raise BadInput(f"{where}: missing custom_id")
            cid = row["custom_id"]
            if not isinstance(cid, str) or not cid:
                raise BadInput(f"{where}: custom_id must be a non-empty string, got {cid!r}")
            if cid in seen:
                raise BadInput(f"{where}: duplicate custom_id {cid!r} (first on line {seen[cid]})")
            seen[cid] = n
            method = row.get("method", "POST")
            if method != "POST":
                raise BadInput(f"{where}: method must be POST, got {method!r}")
            url = row.get("url")
            if url not in ENDPOINTS:
                raise BadInput(f"{where}: url must be one of {', '.join(ENDPOINTS)}, got {url!r}")
            body = row.get("body")
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise BadInput(f"{where}: body must be an object naming a model")
            if body.get("stream"):
                raise BadInput(f"{where}: batch requests cannot stream (drop \"stream\": true)")
            requests.append(BatchRequest(n, cid, url, body))
    if not requests:
        raise BadInput(f"--input {path} holds no request")
    return requests


# Every line r1deploy writes to an output or errors file starts with these bytes (json.dumps of a dict whose first
# key is "id"): what a torn last line must begin with to be recognised as ours.
_LINE_PREFIX = b'{"id": "batch_req_'


def _is_our_line(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("id"), str) and row["id"].startswith("batch_req_")
            and isinstance(row.get("custom_id"), str) and "response" in row and "error" in row)


def _done_ids(path: Path, option: str) -> tuple[set[str], int]:
    """custom_ids an earlier run wrote, and the size up to the last complete line. Only a torn last line — a crash
    mid-write: no newline, and the start of a line r1deploy writes — is cut off before appending. A file that is not
    r1deploy's batch output, or whose complete lines include one that is not, is refused (bad input naming the line)
    and left exactly as it is: nothing r1deploy did not write is ever truncated."""
    if not path.is_file():
        return set(), 0
    done: set[str] = set()
    good = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                if raw.startswith(_LINE_PREFIX) or (n > 1 and _LINE_PREFIX.startswith(raw)):
                    break  # torn: dropped, and its request sent again
                what = "is not r1deploy batch output" if n == 1 else f"ends with a line ({n}) r1deploy did not write"
                raise BadInput(f"{option} {path} {what}: refusing to append to it (nothing was changed); "
                               "give another path")
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError, UnicodeDecodeError):
                row = None
            if not _is_our_line(row):
                if n == 1:
                    raise BadInput(f"{option} {path} exists and is not r1deploy batch output (line 1): refusing to "
                                   "touch it (nothing was changed); give another path")
                raise BadInput(f"{option} {path}:{n}: not a batch output line (corrupt?): nothing was changed; "
                               "repair or remove that line and rerun")
            done.add(row["custom_id"])
            good += len(raw)
    return done, good


class _Appender:
    """One JSON line at a time, flushed and fsynced: a line on disk is a request that never runs again."""

    def __init__(self, path: Path, keep_bytes: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "ab")
        if self.fh.tell() != keep_bytes:
            self.fh.truncate(keep_bytes)
            self.fh.seek(keep_bytes)

    def write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


async def _send(session, cfg: BatchConfig, req: BatchRequest) -> tuple[int, Optional[dict], str]:
    """(HTTP status, response body, error text); status 0 when no answer came."""
    import aiohttp

    headers = {"Content-Type": "application/json", "X-Request-Id": req.custom_id}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    delay = 0.5
    for attempt in range(cfg.retries + 1):
        try:
            async with session.post(cfg.url + req.url, json=req.body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as r:
                text = await r.text()
                try:
                    body = json.loads(text)
                except ValueError:
                    body = None
                if r.status in RETRY_STATUSES and attempt < cfg.retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                if r.status == 200 and isinstance(body, dict):
                    return 200, body, ""
                message = body["error"].get("message", text) if isinstance(body, dict) and isinstance(body.get("error"), dict) else text[:500]
                return r.status, body, message
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if attempt < cfg.retries:
                await asyncio.sleep(delay)
                delay *= 2
                continue
            return 0, None, f"{type(exc).__name__}: {exc}".strip()
    return 0, None, "no attempt made"


async def _run(cfg: BatchConfig, todo: list[BatchRequest], out: _Appender, err: _Appender, progress) -> tuple[int, int]:
    import aiohttp

    succeeded = failed = 0
    queue: asyncio.Queue = asyncio.Queue()
    for req in todo:
        queue.put_nowait(req)

    async def worker(session) -> None:
        nonlocal succeeded, failed
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            status, body, message = await _send(session, cfg, req)
            rid = f"batch_req_{uuid.uuid4().hex}"
            if status == 200:
                out.write({"id": rid, "custom_id": req.custom_id,
                           "response": {"status_code": 200, "request_id": req.custom_id, "body": body}, "error": None})
                succeeded += 1
            else:
                err.write({"id": rid, "custom_id": req.custom_id, "line": req.line,
                           "response": {"status_code": status, "request_id": req.custom_id, "body": body} if status else None,
                           "error": {"code": str(status) if status else "connection_error", "message": message}})
                failed += 1
            if progress is not None:
                progress(succeeded, failed)

    connector = aiohttp.TCPConnector(limit=cfg.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(min(cfg.concurrency, len(todo)))))
    return succeeded, failed


def run_batch(cfg: BatchConfig) -> BatchResult:
    """Send every request of `cfg.input` whose custom_id is not in `cfg.output` yet; StageFailed when any failed
    (after every line was written), so the exit code says whether the output is complete."""
    requests = read_input(cfg.input)
    done, keep = _done_ids(cfg.output, "--output")
    unknown = done - {r.custom_id for r in requests}
    if unknown:
        raise BadInput(f"--output {cfg.output} holds custom_ids that are not in {cfg.input} (e.g. {sorted(unknown)[0]!r}): "
                       "another job's output?")
    _, keep_err = _done_ids(cfg.errors, "--errors")
    todo = [r for r in requests if r.custom_id not in done]
    started = time.perf_counter()
    out, err = _Appender(cfg.output, keep), _Appender(cfg.errors, keep_err)
    bar = None
    try:
        if cfg.progress and todo:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from .core.ui import console

            bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
                           TimeRemainingColumn(), console=console, transient=False)
            bar.start()
            task = bar.add_task("batch", total=len(todo), failed=0)

            def progress(ok: int, bad: int) -> None:
                bar.update(task, completed=ok + bad, failed=bad)
        else:
            progress = None
        succeeded, failed = asyncio.run(_run(cfg, todo, out, err, progress))
    finally:
        if bar is not None:
            bar.stop()
        out.close()
        err.close()
    result = BatchResult(cfg.output, cfg.errors, len(requests), len(done), succeeded, failed,
                         time.perf_counter() - started)
    if failed:
        raise BatchFailed(f"{failed} of {len(todo)} requests failed (reasons in {cfg.errors}); rerun to retry them", result)
    return result
