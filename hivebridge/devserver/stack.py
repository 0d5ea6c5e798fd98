"""A private homeserver with hivebridge registered: what the demo and the e2e tests run on.

One place writes the bridge's config and registration, installs the
registration in a private Synapse on a free 127.0.0.1 port and starts it; the
caller then runs a bridge on :attr:`DevStack.config`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..config import (
    AppserviceConfig,
    Config,
    DatabaseConfig,
    EncryptionConfig,
    HomeserverConfig,
    LoggingConfig,
    MetricsConfig,
    PermissionsConfig,
    SecurityConfig,
)
from ..registration import write_registration
from .process import free_port
from .synapse import PrivateSynapse

SERVER_NAME = "hive.test"


def stack_config(workdir: Path, hs_url: str, as_port: int) -> Config:
    """The bridge's config on a dev stack: SQLite under ``workdir``, alice the owner,
    encryption on (the private Synapse sends what it needs)."""
    return Config(
        homeserver=HomeserverConfig(address=hs_url, domain=SERVER_NAME),
        appservice=AppserviceConfig(address=f"http://127.0.0.1:{as_port}", port=as_port),
        database=DatabaseConfig(url="sqlite:hivebridge.db"),
        data_dir=str(workdir / "bridge"),
        permissions=PermissionsConfig(
            owners=(f"@alice:{SERVER_NAME}",), invite_allowlist=(f"*:{SERVER_NAME}",)
        ),
        logging=LoggingConfig(level="WARNING"),
        metrics=MetricsConfig(port=free_port()),
        encryption=EncryptionConfig(enabled=True, pickle_key=secrets.token_urlsafe(24)),
        # Everything of a dev stack listens on 127.0.0.1, endpoints too.
        security=SecurityConfig(private_endpoint_hosts=("127.0.0.1",)),
    )


class DevStack:
    """Synapse + registration (+ the config a bridge needs); start, then stop by PID."""

    def __init__(
        self,
        root: Path,
        *,
        permissions: PermissionsConfig | None = None,
        configure: Callable[[Config], Config] | None = None,
    ) -> None:
        """``configure`` adjusts the bridge's config before the registration is written."""
        self.root = root
        hs_port, as_port = free_port(), free_port()
        config = stack_config(root, f"http://127.0.0.1:{hs_port}", as_port)
        if permissions is not None:
            config = replace(config, permissions=permissions)
        self.config = configure(config) if configure is not None else config
        self.registration = root / "registration.yaml"
        self.synapse = PrivateSynapse(
            root / "synapse",
            server_name=SERVER_NAME,
            registrations=[self.registration],
            port=hs_port,
        )

    @property
    def url(self) -> str:
        return self.synapse.url

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_registration(self.config, self.registration)
        await self.synapse.start()

    def stop(self) -> None:
        self.synapse.stop()
