"""A private Synapse on 127.0.0.1 for the demo and the end-to-end tests.

It runs as a subprocess of ours, from the ``matrix-synapse`` package, with
SQLite, one client listener on a free port, every rate limit raised for the
human test users, and our registration installed. We keep its PID and stop
exactly that process.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from .process import ManagedProcess, free_port

_RELAXED = {"per_second": 1000, "burst_count": 1000}

#: What an appservice whose users encrypt needs from Synapse (names as in
#: synapse/config/experimental.py): to-device events and device lists / one-time
#: key counts in appservice transactions. MSC4190 needs no server setting, only
#: the registration's ``io.element.msc4190``.
ENCRYPTION_FEATURES = {
    "msc2409_to_device_messages_enabled": True,
    "msc3202_transaction_extensions": True,
}


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
        "experimental_features": dict(ENCRYPTION_FEATURES),
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
        self.process = ManagedProcess(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            log_path=self.workdir / "homeserver.stdout",
            cwd=self.workdir,
            name="synapse",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "homeserver.yaml"

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
        path = self.config_path
        cfg = synapse_config(
            self.workdir, self.server_name, self.port, self.registrations, self.shared_secret
        )
        with open(path, "w") as fh:
            YAML().dump(cfg, fh)
        return path

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`start`)."""
        self.write_config()
        self.process.spawn()

    async def start(self, timeout: float = 90.0) -> None:
        self.spawn()
        try:
            await self.process.wait_http(f"{self.url}/health", timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        self.process.stop(timeout)
