"""The bridge as a subprocess (``python -m hivebridge``), so a test can kill -9 it.

The in-process ``bridge`` fixture cannot crash: its stop always runs. Here the
real command line runs on a config written by the test (PostgreSQL, the
session's registration and appservice port) and is killed by its PID, exactly
that process, never by name. Helpers read the bridge's own database and the
homeserver's room history, the two sources of truth the tests count in.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
from ruamel.yaml import YAML

from hivebridge.config import Config
from hivebridge.devserver.client import HumanClient, is_edit
from hivebridge.devserver.process import ManagedProcess
from hivebridge.matrix.content import ANSWERS_KEY

Event = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]


def bridge_config_yaml(
    config: Config,
    database_url: str,
    data_dir: Path,
    *,
    max_tokens: int = 24,
    edit_interval_s: float = 0.5,
    log_level: str = "INFO",
    context_tokens: int = 1536,
) -> dict[str, Any]:
    """The YAML the operator would write, from the session's (demo) config."""
    return {
        "homeserver": {"address": config.homeserver.address, "domain": config.homeserver.domain},
        "appservice": {
            "address": config.appservice.address,
            "hostname": config.appservice.hostname,
            "port": config.appservice.port,
        },
        "database": {"url": database_url},
        "data_dir": str(data_dir),
        "permissions": {
            "owners": list(config.permissions.owners),
            "invite_allowlist": list(config.permissions.invite_allowlist),
        },
        "inference": {
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "context_tokens": context_tokens,
        },
        # The tests send faster than any person; request limits are not what they test.
        "limits": {"requests_per_minute": 0},
        "routing": {"max_persona_turns_per_minute": 1000},
        "replies": {"edit_interval_s": edit_interval_s},
        "summaries": {"enabled": False},
        "metrics": {"enabled": False},
        "logging": {"level": log_level},
        # As the dev stack has it (on): the keys then live in this bridge's database.
        "encryption": {
            "enabled": config.encryption.enabled,
            "pickle_key": config.encryption.pickle_key,
        },
    }


class BridgeProcess:
    """``python -m hivebridge -c cfg -r reg``; start, wait until ready, kill -9 or stop."""

    def __init__(self, config_path: Path, registration: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.registration = registration
        self.port = port
        self.log_path = log_path
        self.starts: list[float] = []  # seconds each start took
        self.proc = ManagedProcess(
            [
                sys.executable,
                "-m",
                "hivebridge",
                "-c",
                str(config_path),
                "-r",
                str(registration),
            ],
            log_path=log_path,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            name="bridge",
        )

    @classmethod
    def write(cls, workdir: Path, config: dict[str, Any], registration: Path) -> BridgeProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "config.yaml"
        with open(path, "w") as fh:
            YAML().dump(config, fh)
        return cls(path, registration, int(config["appservice"]["port"]), workdir / "bridge.log")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`start`)."""
        self.proc.spawn()

    async def start(self, timeout: float = 90.0) -> None:
        """Spawn it and wait until its appservice answers ready (listening, resumed)."""
        started = time.monotonic()
        self.spawn()
        try:
            await self.proc.wait_http(f"http://127.0.0.1:{self.port}/_matrix/mau/ready", timeout)
        except BaseException:
            self.stop()
            raise
        self.starts.append(time.monotonic() - started)

    def kill9(self) -> None:
        """SIGKILL exactly our bridge: no shutdown code runs, as in a crash."""
        assert self.proc.running(), "the bridge is not running"
        self.proc.kill()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean stop), then SIGKILL if it does not exit in time."""
        return self.proc.stop(timeout)

    def rss_kib(self) -> int:
        """Resident memory of the bridge process (VmRSS from /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines)


async def pg_fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """A query on the bridge's database, on a connection of our own."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def pg_value(url: str, sql: str, *args: Any) -> Any:
    rows = await pg_fetch(url, sql, *args)
    return rows[0][0] if rows else None


async def room_history(client: HumanClient, room_id: str) -> list[Event]:
    """Every timeline event of a room, oldest first, from the homeserver (/messages).

    /sync timelines are cut short ("limited") when much happens at once; the
    paginated history is complete, so counts are taken from it.
    """
    events: list[Event] = []
    token: str | None = None
    while True:
        params = {"dir": "b", "limit": "500"}
        if token:
            params["from"] = token
        page = await client.request("GET", f"/rooms/{quote(room_id)}/messages", **params)
        events.extend(page.get("chunk", []))
        token = page.get("end")
        if not token or not page.get("chunk"):
            return list(reversed(events))


def answers_to(history: list[Event], sender: str, event_id: str) -> list[Event]:
    """``sender``'s messages answering ``event_id`` (Matrix reply or our marker), no edits."""
    found = []
    for e in history:
        if e.get("type") != "m.room.message" or e.get("sender") != sender or is_edit(e):
            continue
        content = e.get("content", {})
        reply = content.get("m.relates_to", {}).get("m.in_reply_to", {})
        if reply.get("event_id") == event_id or content.get(ANSWERS_KEY) == event_id:
            found.append(e)
    return found


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
