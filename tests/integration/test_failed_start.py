"""A start that cannot succeed ends the process at once, with one clear line.

The real command line runs as a subprocess; nothing is listening where its
homeserver should be, so no Synapse is needed. Before the composition root
unwound a partial start, a model file llama.cpp could not load left the
process hanging (``'Intake' object has no attribute 'runner'`` on stop).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from ruamel.yaml import YAML

from hivebridge.config import load_config
from hivebridge.devserver.process import free_port
from hivebridge.registration import write_registration

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 60  # far beyond a start that fails; only a hang reaches it


def write_config(tmp_path: Path, **local: object) -> tuple[Path, Path]:
    port = free_port()
    data = {
        "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "hive.test"},
        "appservice": {"address": f"http://127.0.0.1:{port}", "port": port},
        "data_dir": str(tmp_path / "data"),
        "metrics": {"enabled": False},
    }
    config_path, registration = tmp_path / "config.yaml", tmp_path / "registration.yaml"
    with open(config_path, "w") as fh:
        YAML().dump(data, fh)
    write_registration(load_config(config_path), registration)
    data["inference"] = {"local": local}  # after the registration: it may not validate
    with open(config_path, "w") as fh:
        YAML().dump(data, fh)
    return config_path, registration


def run_bridge(config_path: Path, registration: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hivebridge", "-c", str(config_path), "-r", str(registration)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    return done.returncode, done.stderr, time.monotonic() - started


def test_a_model_file_that_does_not_load_exits_1_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)  # a header, then nothing a loader can use
    code, stderr, took = run_bridge(*write_config(tmp_path, model_path=str(bad)))
    print(f"failed start took {took:.1f}s")
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line]
    assert code == 1, stderr
    assert len(errors) == 1, stderr
    assert "hivebridge could not start" in errors[0] and "broken.gguf" in errors[0]
    assert "Traceback" not in stderr


def test_a_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    code, stderr, _ = run_bridge(*write_config(tmp_path, model_path=f"{tmp_path}/no.gguf"))
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [
        f"hivebridge: config: inference.local.model_path: no such file: {tmp_path}/no.gguf"
    ]


def test_a_port_already_taken_exits_1_with_one_line(tmp_path: Path) -> None:
    """The appservice listener cannot bind: the start unwinds (engine, database) and ends."""
    config_path, registration = write_config(tmp_path)
    port = load_config(config_path).appservice.port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, stderr, took = run_bridge(config_path, registration)
    print(f"failed start took {took:.1f}s")
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert code == 1, stderr
    assert len(errors) == 1 and "hivebridge could not start" in errors[0], stderr
    assert "Traceback" not in stderr


def test_a_database_that_cannot_be_reached_exits_1_with_one_line(tmp_path: Path) -> None:
    config_path, registration = write_config(tmp_path)
    data = YAML().load(config_path.read_text())
    data["database"] = {"url": f"postgres://127.0.0.1:{free_port()}/nowhere"}
    with open(config_path, "w") as fh:
        YAML().dump(data, fh)
    code, stderr, took = run_bridge(config_path, registration)
    print(f"failed start took {took:.1f}s")
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert code == 1, stderr
    assert len(errors) == 1 and "hivebridge could not start" in errors[0], stderr
    assert "Traceback" not in stderr
