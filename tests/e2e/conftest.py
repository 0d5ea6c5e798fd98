"""A real Synapse for the whole session, and a real bridge per test."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hivebridge.app import Bridge
from hivebridge.config import Config
from hivebridge.demo import SERVER_NAME, demo_config
from hivebridge.devserver.client import HumanClient
from hivebridge.devserver.synapse import PrivateSynapse, free_port
from hivebridge.registration import write_registration
from tests.conftest import skip_or_fail

_users = itertools.count()


@dataclass
class Homeserver:
    synapse: PrivateSynapse
    config: Config
    registration: Path

    async def human(self, name: str = "human") -> HumanClient:
        """A freshly registered user (unique name per call)."""
        return await HumanClient.create(
            self.synapse.url, self.synapse.shared_secret, f"{name}{next(_users)}"
        )


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homeserver]:
    if importlib.util.find_spec("synapse") is None:
        skip_or_fail("matrix-synapse is not installed")
    root = tmp_path_factory.mktemp("e2e")
    hs_port, as_port = free_port(), free_port()
    config = demo_config(root, f"http://127.0.0.1:{hs_port}", as_port)
    registration = root / "registration.yaml"
    write_registration(config, registration)
    synapse = PrivateSynapse(
        root / "synapse", server_name=SERVER_NAME, registrations=[registration], port=hs_port
    )
    asyncio.run(synapse.start())
    try:
        yield Homeserver(synapse, config, registration)
    finally:
        synapse.stop()


@pytest.fixture
async def bridge(homeserver: Homeserver, tmp_path: Path) -> AsyncIterator[Bridge]:
    """The bridge on a fresh SQLite database of its own."""
    config = replace(homeserver.config, data_dir=str(tmp_path / "bridge"))
    running = Bridge(config, homeserver.registration)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
