"""A real Triton Inference Server process on 127.0.0.1: start, wait for readiness, stop without leftovers.

The binary is `tritonserver` from PATH where it exists (a Triton container or install), else the CPU build
bundled in the `nvidia-pytriton` wheel (python backend only). The bundled layout is prepared once into a cache
directory (binary, backends, caches, and the python-backend stub for this interpreter), and the server is given
the library paths it needs: this interpreter's libpython first (a mismatch breaks the stub), then the wheel's
bundled libraries. The server runs in its own process group so that stopping it also ends the python-backend
stub processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

from .core.errors import BadInput, MissingDependency, StageFailed


@dataclass
class ServerConfig:
    model_repository: Path
    extra_repositories: list[Path] = field(default_factory=list)  # more --model-repository (names must not clash)
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: pick a free port
    grpc_port: int = 0
    metrics_port: int = 0
    model_control_mode: str = "none"  # none | explicit | poll
    load_models: list[str] = field(default_factory=list)  # with explicit mode; empty = none loaded
    startup_timeout_s: float = 120.0
    exit_timeout_s: int = 10
    log_verbose: int = 0
    response_cache_bytes: int = 0  # > 0: a local response cache of that size (models opt in per config)
    log_file: Optional[Path] = None
    # Triton's HTTP frontend blocks one thread per in-flight request to a decoupled model (the generate model's
    # whole completions over /generate): its default of 8 capped served concurrency at 8 (measured: c=32 whole
    # completions 4.3k → 5.6–6.9k tokens/s with 64)
    http_thread_count: int = 64
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for option, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise BadInput(f"{option} must be a port number in 0..65535 (0: a free one), got {port!r}")
        chosen = [p for p in ports.values() if p]
        if len(chosen) != len(set(chosen)):
            raise BadInput(f"the HTTP, gRPC and metrics ports must differ, got {', '.join(f'{o} {p}' for o, p in ports.items() if p)}")
        timeout = self.startup_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (math.isfinite(timeout) and timeout > 0):
            raise BadInput(f"--startup-timeout must be a number of seconds > 0, got {timeout!r}")
        if self.response_cache_bytes < 0:
            raise BadInput("--cache-mib must be ≥ 0")


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    metrics: str


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports, chosen **below the kernel's ephemeral range**. A listening port taken from that
    range (what binding port 0 gives) can be handed to any outgoing connection once its server dies, and a
    restarted server then finds it in use: `serve` lost a restart so once, under load (its clients reconnecting
    in the seconds between kill and start). The sockets stay open until all are chosen, so the ports are distinct
    (Triton refuses HTTP and metrics on one port). Falls back to port 0 when no port below the range is free."""
    low, _ = _ephemeral_range()
    candidates = list(range(1024 + 1, low)) if low > 2048 else []
    random.shuffle(candidates)
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for port in candidates:
            if len(chosen) == count:
                break
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen.append(port)
        while len(chosen) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            chosen.append(sock.getsockname()[1])
        return chosen


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port. SO_REUSEADDR: connections of a server that just died (TIME_WAIT)
    do not count, only a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


# Lines every start of the CPU build logs (no GPU, no CUDA driver): never the reason a start failed.
_HARMLESS = re.compile(r"CudaDriverHelper|CUDA driver version is insufficient|pinned memory|cuda_memory_manager|"
                       r"unable to create stream|Exit timeout expired|GPU metrics", re.I)
_LOG_LINE = re.compile(r"^([EW])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\]\s*(.*)$")


def abort_reason(log_text: str) -> Optional[str]:
    """The line of a Triton log that says why it stopped: its own fatal message (`main.cc`: failed to start a
    service, failed to initialize), else the last error that is not one of the harmless CUDA lines."""
    errors = []
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line.strip())
        if not m or m.group(1) != "E":
            continue
        # the message is quoted with its newlines escaped: keep its first line (the traceback follows "\n\nAt:")
        text = m.group(3).strip().strip('"').split("\\n")[0].strip()
        if _HARMLESS.search(text):
            continue
        errors.append((m.group(2), " ".join(text.split())))
    fatal = [t for src, t in errors if src == "main.cc"]
    if fatal:
        return fatal[-1]
    return errors[-1][1] if errors else None


def _process_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def _mapped_shm(pids: list[int]) -> set[Path]:
    """/dev/shm files the processes have mapped (the python backend's shared-memory regions)."""
    found: set[Path] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                found.add(Path(parts[5].removesuffix(" (deleted)")))
    return found


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (even by SIGKILL), so a killed
    `r1deploy serve` or test run leaves no server behind. Linux only (prctl PR_SET_PDEATHSIG); the "parent" is
    the starting *thread*, so start servers from a thread that outlives them (the main thread)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "r1deploy"


def _bundled_triton() -> tuple[Path, Path, list[str]]:
    """(tritonserver binary, backend dir, extra library dirs) from the nvidia-pytriton wheel."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "no tritonserver on PATH and nvidia-pytriton is not installed: pip install 'r1deploy[serve]'"
        ) from None
    site = Path(pytriton.__file__).resolve().parents[1]
    bundle = site / "pytriton" / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependency(f"nvidia-pytriton has no python-backend stub for Python {pyver}")
    version = metadata.version("nvidia-pytriton")
    root = _cache_root() / f"tritonserver-pytriton{version}-py{pyver}"
    if not (root / ".complete").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            for sub in ("bin", "backends", "caches"):
                if (bundle / sub).is_dir():
                    shutil.copytree(bundle / sub, tmp / sub, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
            (tmp / ".complete").write_text(version + "\n")
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(site / "nvidia_pytriton.libs")]
    return root / "bin" / "tritonserver", root / "backends", [d for d in libdirs if d]


def locate_tritonserver() -> tuple[Path, Optional[Path], list[str]]:
    found = shutil.which("tritonserver")
    if found:
        return Path(found), None, []
    return _bundled_triton()


class TritonServer:
    """`with TritonServer(ServerConfig(repo)) as server: server.endpoints.http` — a started, ready server."""

    def __init__(self, cfg: ServerConfig):
        for repo in [cfg.model_repository, *cfg.extra_repositories]:
            if not Path(repo).is_dir():
                raise BadInput(f"model repository not found: {repo}")
        self.cfg = cfg
        self.process: Optional[subprocess.Popen] = None
        host = cfg.host
        spare = iter(free_ports(3, host))
        self.ports = {
            "http": cfg.http_port or next(spare),
            "grpc": cfg.grpc_port or next(spare),
            "metrics": cfg.metrics_port or next(spare),
        }
        self.endpoints = Endpoints(
            http=f"{host}:{self.ports['http']}", grpc=f"{host}:{self.ports['grpc']}", metrics=f"{host}:{self.ports['metrics']}"
        )
        self.log_path = Path(cfg.log_file) if cfg.log_file else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._log = None
        self._log_offset = 0
        self._shm: set[Path] = set()  # /dev/shm regions of this server, removed when it is stopped

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary, backend_dir, libdirs = locate_tritonserver()
        cfg = self.cfg
        args = [
            str(binary),
            f"--model-repository={Path(cfg.model_repository).resolve()}",
            f"--http-address={cfg.host}",
            f"--http-port={self.ports['http']}",
            f"--http-thread-count={cfg.http_thread_count}",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--model-control-mode={cfg.model_control_mode}",
            f"--log-verbose={cfg.log_verbose}",
        ]
        args[2:2] = [f"--model-repository={Path(r).resolve()}" for r in cfg.extra_repositories]
        args += [f"--load-model={m}" for m in cfg.load_models]
        if cfg.response_cache_bytes > 0:
            args.append(f"--cache-config=local,size={cfg.response_cache_bytes}")
        if backend_dir is not None:
            args += [f"--backend-directory={backend_dir}", f"--cache-directory={backend_dir.parent / 'caches'}"]
        args += cfg.extra_args
        env = dict(os.environ)
        if libdirs:
            env["LD_LIBRARY_PATH"] = ":".join(libdirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
        # The python-backend stub embeds the interpreter in isolated mode (PYTHONPATH is ignored) and finds its
        # prefix by looking up `python3` on PATH. This environment's bin first makes it read this
        # environment's pyvenv.cfg and packages — the base interpreter's numpy 2 would otherwise be imported,
        # and with it every output tensor of a stub built for numpy 1 arrives empty.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return args, env

    def start(self) -> TritonServer:
        for name, port in self.ports.items():
            # a port held by another server would answer our readiness probe for it
            if port_in_use(port, self.cfg.host):
                raise BadInput(f"{name} port {port} on {self.cfg.host} is already in use: stop what listens there or choose another --{name}-port")
        args, env = self.command()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # the log is appended to
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=_terminate_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoints.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def listening(self) -> bool:
        """This process (not another server on the same port) logged that it serves HTTP on our port."""
        log = self._log_text()[self._log_offset:]
        return f"Started HTTPService at {self.cfg.host}:{self.ports['http']}" in log

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                why = abort_reason(self._log_text()[self._log_offset:]) or f"exit code {self.process.returncode}"
                raise StageFailed(f"tritonserver exited during start-up: {why} (log: {self.log_path})")
            # readiness is asked of the server this object started: the port answering is not enough
            if self.listening() and self.is_ready():
                if self.process is not None:
                    self._shm |= _mapped_shm(_process_group(self.process.pid))
                return
            time.sleep(0.25)
        why = abort_reason(self._log_text()[self._log_offset:])
        raise StageFailed(
            f"tritonserver not ready after {self.cfg.startup_timeout_s:g} s{f' (last error: {why})' if why else ''}; "
            f"a larger --startup-timeout may help (log: {self.log_path})"
        )

    def stop(self) -> None:
        """SIGTERM, wait for Triton's own exit timeout, then SIGKILL the whole process group."""
        proc = self.process
        if proc is None:
            return
        self._shm |= _mapped_shm(_process_group(proc.pid))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.cfg.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        # A server that crashed (or was SIGKILLed) leaves its python-backend shared memory behind; these names
        # were mapped by this server's own processes, so no other server uses them.
        for path in self._shm:
            with contextlib.suppress(OSError):
                path.unlink()
        self._shm = set()
        if self._log:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop a broken server at once (SIGKILL to its process group, then the same clean-up as `stop`): a
        server whose model process is dead cannot unload that model, and would wait its whole exit timeout."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.stop()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
