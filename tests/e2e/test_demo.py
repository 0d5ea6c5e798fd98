"""`hivebridge demo`, what `make demo` runs: its own Synapse, the bridge, replies.

The reply streams in as edits; the transcript must show it as a client does
once it is done (the whole stored completion), not the first chunk. Then a
group room: ``!persona spawn`` makes a second persona, both answer when
mentioned, and the demo says where to look next.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(300)]


def block(text: str, title: str) -> list[str]:
    """The lines of one ``--- title ---`` … ``--- end ---`` block of the transcript."""
    return text.split(f"--- {title} ---\n", 1)[1].split("--- end ---", 1)[0].splitlines()


def messages(lines: list[str]) -> list[str]:
    """Transcript lines joined into messages: a reply of several lines continues on
    lines that do not start with ``<``."""
    joined: list[str] = []
    for line in lines:
        if line.startswith("<") or not joined:
            joined.append(line)
        else:
            joined[-1] += "\n" + line
    return joined


def test_demo_transcript_shows_the_whole_reply(tmp_path: Path) -> None:
    if importlib.util.find_spec("synapse") is None:
        skip_or_fail("matrix-synapse is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "hivebridge", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "whole reply after" in proc.stderr
    transcript = proc.stdout.split("--- transcript ---\n", 1)[1].split("--- end ---", 1)[0]
    asked, _, answer = transcript.partition("\n")
    assert asked == "<alice> Hello! Who are you?"
    assert answer.startswith("<Assistant> ")
    database = tmp_path / "demo" / "bridge" / "hivebridge.db"  # data_dir/hivebridge.db
    assert database.is_file()
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT a.body, a.persona, q.body FROM messages a JOIN messages q "
            "ON q.event_id = json_extract(a.content, '$.\"io.github.hivebridge.answers\"') "
            "WHERE a.persona IS NOT NULL ORDER BY a.ts"
        ).fetchall()
    answers = {(persona, question): body for body, persona, question in rows}
    body = answers[("assistant", "Hello! Who are you?")]
    assert body.strip()
    assert answer.removeprefix("<Assistant> ").rstrip("\n") == body

    # The group room: a second persona spawned by command, both answer when mentioned.
    group = messages(block(proc.stdout, "group room"))
    prompt = '--prompt "You are a poet. Answer in two short lines."'
    assert group[0] == f"<alice> !persona spawn poet --display Poet {prompt} --room #hive:hive.test"
    assert group[1].startswith("<Hive> Spawned Poet (@hive_poet:hive.test) in !")
    question = "Assistant and Poet, what do you like about the sea?"
    assert group[2] == f"<alice> {question}"
    said = dict(line[1:].split("> ", 1) for line in group[3:])
    assert set(said) == {"Assistant", "Poet"}, group
    assert said["Assistant"] == answers[("assistant", question)].strip()
    assert said["Poet"] == answers[("poet", question)].strip()
    assert all(text.strip() for text in said.values())

    # Where to look next: the metrics of this run and --keep.
    assert "where to look next:" in proc.stderr
    assert "make demo DEMO_ARGS=--keep" in proc.stderr
    assert re.search(r"http://127\.0\.0\.1:\d+/metrics", proc.stderr)


def test_demo_encrypted_dm(tmp_path: Path) -> None:
    """``--encrypted``: alice's app encrypts the DM; the transcript is what it decrypted,
    the same text the bridge stored, and her question is stored as the bridge read it."""
    if importlib.util.find_spec("synapse") is None:
        skip_or_fail("matrix-synapse is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "hivebridge", "demo", "--encrypted", "--dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "opened an encrypted DM" in proc.stderr
    assert "encrypted both ways" in proc.stderr
    transcript = block(proc.stdout, "transcript")
    assert transcript[0] == "<alice> Hello! Who are you?"
    shown = "\n".join(transcript[1:]).removeprefix("<Assistant> ")
    with sqlite3.connect(tmp_path / "d" / "bridge" / "hivebridge.db") as db:
        (body,) = db.execute(
            "SELECT a.body FROM messages a JOIN messages q "
            "ON q.event_id = json_extract(a.content, '$.\"io.github.hivebridge.answers\"') "
            "WHERE a.persona = 'assistant' AND q.body = 'Hello! Who are you?'"
        ).fetchone()
    assert shown.strip() and shown.rstrip("\n") == body
