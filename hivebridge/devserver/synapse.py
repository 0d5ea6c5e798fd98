"""A private Synapse on 127.0.0.1 for the demo and the end-to-end tests.

It runs as a subprocess of ours, from the ``matrix-synapse`` package, with
SQLite, one client listener on a free port, every rate limit raised for the
human test users, and our registration installed. We keep its PID and stop
exactly that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from ruamel.yaml import YAML

_RELAXED = {"per_second": 1000, "burst_count": 1000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def synapse_config(
    workdir: Path, server_name: str, port: int, registrations: list[Path], shared_secret: str
) -> dict[str, Any]:
    return {
        "server_name": server_name,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "pid_file": str(workdir / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(workdir / "homeserver.db")}},
        "log_config": str(workdir / "log.yaml"),
        "media_store_path": str(workdir / "media"),
        "signing_key_path": str(workdir / "signing.key"),
        "report_stats": False,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
        "enable_registration": False,
        "bcrypt_rounds": 4,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "app_service_config_files": [str(p) for p in registrations],
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "rc_message": _RELAXED,
        "rc_registration": _RELAXED,
        "rc_login": {"address": _RELAXED, "account": _RELAXED, "failed_attempts": _RELAXED},
        "rc_joins": {"local": _RELAXED, "remote": _RELAXED},
        "rc_joins_per_room": _RELAXED,
        "rc_invites": {"per_room": _RELAXED, "per_user": _RELAXED, "per_issuer": _RELAXED},
        "rc_admin_redaction": _RELAXED,
        "rc_3pid_validation": _RELAXED,
        "rc_room_creation": _RELAXED,
        "rc_delayed_event_mgmt": _RELAXED,
        "rc_reports": _RELAXED,
    }


_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s %(levelname)s %(name)s: %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {path}
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
"""


def _write_signing_key(path: Path) -> None:
    from signedjson.key import generate_signing_key, write_signing_keys

    with open(path, "w") as fh:
        write_signing_keys(fh, [generate_signing_key("a_hive")])


class PrivateSynapse:
    """Start with :meth:`start`, stop with :meth:`stop` (also on failure)."""

    def __init__(
        self,
        workdir: Path,
        *,
        server_name: str = "hive.test",
        registrations: list[Path] | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.server_name = server_name
        self.registrations = list(registrations or [])
        self.port = port or free_port()
        self.shared_secret = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "homeserver.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "media").mkdir(exist_ok=True)
        key = self.workdir / "signing.key"
        if not key.exists():
            _write_signing_key(key)
        (self.workdir / "log.yaml").write_text(_LOG_CONFIG.format(path=self.log_path))
        path = self.workdir / "homeserver.yaml"
        cfg = synapse_config(
            self.workdir, self.server_name, self.port, self.registrations, self.shared_secret
        )
        with open(path, "w") as fh:
            YAML().dump(cfg, fh)
        return path

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`start`)."""
        config = self.write_config()
        with open(self.workdir / "homeserver.stdout", "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", str(config)],
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start(self, timeout: float = 90.0) -> None:
        self.spawn()
        try:
            await self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"synapse exited with {self.process.returncode}; see {self.log_path}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"synapse not healthy after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
