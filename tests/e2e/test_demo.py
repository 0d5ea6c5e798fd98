"""`hivebridge demo`, what `make demo` runs: its own Synapse, the bridge, a reply.

The reply streams in as edits; the transcript must show it as a client does
once it is done (the whole stored completion), not the first chunk.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(300)]


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
        rows = db.execute("SELECT body FROM messages WHERE persona IS NOT NULL").fetchall()
    assert len(rows) == 1, rows
    (body,) = rows[0]
    assert body.strip()
    assert answer.removeprefix("<Assistant> ").rstrip("\n") == body
