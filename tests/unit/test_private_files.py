"""Files that hold tokens or conversations are private from their first byte.

Each is checked under a permissive umask (022), as a service manager may set
it: the registration (both tokens), data_dir, and the SQLite database.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivebridge import registration
from hivebridge.config import AppserviceConfig, Config, HomeserverConfig


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_registration_is_written_0600_not_chmod_ed_after(
    tmp_path: Path, permissive_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: written 0644 under this umask, then chmod-ed: the tokens were readable a moment."""
    modes_while_writing: list[int] = []

    class Spy(registration.YAML):  # type: ignore[misc]
        def dump(self, data: Any, stream: Any, **kw: Any) -> None:
            modes_while_writing.append(stat.S_IMODE(os.fstat(stream.fileno()).st_mode))
            super().dump(data, stream, **kw)

    monkeypatch.setattr(registration, "YAML", Spy)
    cfg = Config(
        homeserver=HomeserverConfig(address="http://127.0.0.1:8008", domain="example.org"),
        appservice=AppserviceConfig(),
    )
    target = tmp_path / "registration.yaml"
    (tmp_path / "registration.yaml.tmp").write_text("left over, 0644\n")
    registration.write_registration(cfg, target)
    assert modes_while_writing == [0o600]
    assert mode(target) == 0o600


def test_data_dir_and_sqlite_database_are_private(tmp_path: Path, permissive_umask: None) -> None:
    """Before: data_dir 0755 and the database 0644 under this umask."""
    data = tmp_path / "data"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"homeserver:\n  address: http://127.0.0.1:8008\n  domain: example.org\ndata_dir: {data}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "hivebridge", "-c", str(cfg), "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert mode(data) == 0o700
    files = [p for p in data.iterdir() if p.name.startswith("hivebridge.db")]
    assert files and all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
