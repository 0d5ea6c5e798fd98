"""A real Synapse for the whole session, and a real bridge per test."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from hivebridge.app import Bridge
from hivebridge.config import Config, PermissionsConfig
from hivebridge.devserver.client import HumanClient, register_user
from hivebridge.devserver.encrypting_client import EncryptingHuman
from hivebridge.devserver.stack import DevStack
from hivebridge.devserver.synapse import PrivateSynapse
from tests.conftest import skip_or_fail

_users = itertools.count()


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is an end-to-end test: ``-m "not e2e"`` leaves them out."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


OWNER = "@boss:hive.test"


@dataclass
class Homeserver:
    synapse: PrivateSynapse
    config: Config
    registration: Path
    owner_token: str = ""

    def owner(self) -> HumanClient:
        """The owner named in the bridge's config (registered once per session)."""
        return HumanClient(self.synapse.url, OWNER, self.owner_token)

    async def human(self, name: str = "human") -> HumanClient:
        """A freshly registered user (unique name per call)."""
        return await HumanClient.create(
            self.synapse.url, self.synapse.shared_secret, f"{name}{next(_users)}"
        )

    async def encrypting_human(self, name: str = "human", **kwargs: Any) -> EncryptingHuman:
        """A freshly registered user with an encrypting device (see EncryptingHuman)."""
        return await EncryptingHuman.create(
            self.synapse.url, self.synapse.shared_secret, f"{name}{next(_users)}", **kwargs
        )


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homeserver]:
    if importlib.util.find_spec("synapse") is None:
        skip_or_fail("matrix-synapse is not installed")
    root = tmp_path_factory.mktemp("e2e")
    stack = DevStack(
        root,
        permissions=PermissionsConfig(owners=(OWNER,), invite_allowlist=("*:hive.test",)),
        # Short replies keep the suite quick; the model is real all the same.
        configure=lambda c: replace(
            c, inference=replace(c.inference, max_tokens=24, temperature=0.0)
        ),
    )
    config, registration, synapse = stack.config, stack.registration, stack.synapse
    asyncio.run(stack.start())
    try:
        owner = asyncio.run(
            register_user(synapse.url, synapse.shared_secret, "boss", "boss-password")
        )
        yield Homeserver(synapse, config, registration, owner["access_token"])
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
