"""SIGTERM, the normal way to stop a service: the bridge and ``hivebridge demo --keep``.

The bridge runs as a subprocess on the session's Synapse and PostgreSQL. It is
stopped by SIGTERM to its PID while a reply streams: with a grace period the
reply finishes before the process exits 0 with one shutdown line; with none
the reply is cut, its job stays pending, and the next start finishes it (one
reply in the room, not two). The demo, stopped the same way, stops its own
Synapse too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from hivebridge.devserver.process import ManagedProcess
from tests.conftest import skip_or_fail
from tests.e2e.bridge_process import (
    ROOT,
    BridgeProcess,
    answers_to,
    bridge_config_yaml,
    pg_value,
    room_history,
)
from tests.e2e.conftest import Homeserver
from tests.e2e.test_exactly_once import addressed, wait_until

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(400)]

STOP_LINE = "hivebridge stopped on SIGTERM"


def sigterm(bridge: BridgeProcess, timeout: float = 90) -> int:
    """SIGTERM exactly our bridge and wait for it to exit on its own (no SIGKILL)."""
    proc = bridge.proc.process
    assert proc is not None and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        bridge.stop()  # a no-op when it exited; SIGKILL if it hung


def stop_lines(bridge: BridgeProcess) -> list[str]:
    return [line for line in bridge.log_path.read_text().splitlines() if STOP_LINE in line]


async def streaming(url: str) -> bool:
    """A reply is on screen and not finished: its job pending with a posted event."""
    n = await pg_value(
        url, "SELECT COUNT(*) FROM reply_jobs WHERE state='pending' AND reply_event_id IS NOT NULL"
    )
    return bool(n)


async def test_sigterm_lets_a_streaming_reply_finish_or_parks_it(
    homeserver: Homeserver, postgres_url: str, tmp_path: Path
) -> None:
    config = homeserver.config
    persona = config.persona_mxid(config.default_persona.name)
    bot = config.bot_mxid

    def write(grace_s: float) -> BridgeProcess:
        # Long replies edited often: the signal lands in the middle of a stream.
        yaml = bridge_config_yaml(
            config, postgres_url, tmp_path / "data", max_tokens=160, edit_interval_s=0.1
        )
        yaml["replies"]["shutdown_grace_s"] = grace_s
        return BridgeProcess.write(tmp_path, yaml, homeserver.registration)

    bridge = write(grace_s=0)
    try:
        await bridge.start()
        async with await homeserver.human("term") as human:
            room = await human.create_room([persona, bot], name="sigterm")
            await human.wait_for_members(room, {human.user_id, persona, bot})

            # No grace: the reply is cut and parked; the process still exits 0.
            first = await addressed(human, room, persona, "tell me a long story about the sea.")
            await wait_until(lambda: streaming(postgres_url), 90, "no reply was streaming")
            assert sigterm(bridge) == 0, bridge.log_tail()
            (line,) = stop_lines(bridge)
            assert "0 of 1 in flight finished, 1 cut at the 0s grace" in line, line
            state = "SELECT state FROM reply_jobs WHERE event_id=$1"
            assert await pg_value(postgres_url, state, first) == "pending"

            # The next start finishes it on the message already posted.
            bridge = write(grace_s=120)
            await bridge.start()
            await wait_until(
                lambda: _is_done(postgres_url, first), 120, "the parked reply never finished"
            )

            # With a grace period the reply in flight finishes before the exit.
            second = await addressed(human, room, persona, "and another long story, please.")
            await wait_until(lambda: streaming(postgres_url), 90, "no reply was streaming")
            assert sigterm(bridge) == 0, bridge.log_tail()
            lines = stop_lines(bridge)
            assert len(lines) == 2, lines
            assert "1 of 1 in flight finished, 0 cut" in lines[1], lines[1]
            assert await pg_value(postgres_url, state, second) == "done"

            history = await room_history(human, room)
            assert len(answers_to(history, persona, first)) == 1
            assert len(answers_to(history, persona, second)) == 1
        log = bridge.log_path.read_text()
        assert "Traceback" not in log
        print("\n--- shutdown log lines ---")
        for shown in stop_lines(bridge):
            print(shown)
    finally:
        bridge.stop()


async def _is_done(url: str, event_id: str) -> bool:
    state = await pg_value(url, "SELECT state FROM reply_jobs WHERE event_id=$1", event_id)
    return bool(state == "done")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pids_running(config_path: Path) -> list[int]:
    """PIDs whose command line names ``config_path``: the demo's own Synapse."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if str(config_path).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_demo_keep_stops_its_synapse_on_sigterm(tmp_path: Path) -> None:
    if importlib.util.find_spec("synapse") is None:
        skip_or_fail("matrix-synapse is not installed")
    workdir = tmp_path / "demo"
    demo = ManagedProcess(
        [sys.executable, "-m", "hivebridge", "demo", "--keep", "--dir", str(workdir)],
        log_path=tmp_path / "demo.log",
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        name="demo",
    )
    synapse_config = workdir / "synapse" / "homeserver.yaml"
    demo.spawn()
    try:
        deadline = time.monotonic() + 240
        while "kept running" not in demo.log_path.read_text():
            assert demo.running(), demo.log_tail()
            assert time.monotonic() < deadline, demo.log_tail()
            time.sleep(0.2)
        text = demo.log_path.read_text()
        hs = re.search(r"homeserver http://127\.0\.0\.1:(\d+)", text)
        metrics = re.search(r"metrics: http://127\.0\.0\.1:(\d+)", text)
        assert hs is not None and metrics is not None, text
        ports = (int(hs.group(1)), int(metrics.group(1)))
        assert all(_port_open(port) for port in ports)
        assert _pids_running(synapse_config)

        proc = demo.process
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, demo.log_tail()
        assert "stopped; the bridge and Synapse are stopped too" in demo.log_path.read_text()
        assert not _pids_running(synapse_config), "the demo's Synapse outlived it"
        assert not any(_port_open(port) for port in ports)
    finally:
        demo.stop()
        for pid in _pids_running(synapse_config):  # left behind by a demo that died
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
