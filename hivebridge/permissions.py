"""Who may do what: roles from config patterns plus trust granted in the database.

The one home of :data:`Role`: command specs, rate limits and the admin surface
all ask :meth:`Roles.role_of`, and nothing below the command layer needs to
know how commands are parsed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from .config import Config, PermissionsConfig
from .db.trust import TrustStore

Role = Literal["user", "trusted", "owner"]
#: Roles from least to most privileged.
ROLES: tuple[Role, ...] = ("user", "trusted", "owner")


def role_allows(role: Role, min_role: Role) -> bool:
    """Whether someone with ``role`` may do what needs ``min_role``."""
    return ROLES.index(role) >= ROLES.index(min_role)


def matches(mxid: str, patterns: Iterable[str]) -> bool:
    """Whether ``mxid`` is covered by any pattern: ``@user:server``, ``*:server`` or ``*``."""
    server = mxid.split(":", 1)[1] if ":" in mxid else ""
    for pattern in patterns:
        if pattern == "*" or pattern == mxid:
            return True
        if pattern.startswith("*:") and pattern[2:] == server:
            return True
    return False


class Roles:
    """Owner and trusted come from config; trust granted with ``!trust`` is stored."""

    def __init__(self, permissions: PermissionsConfig, store: TrustStore) -> None:
        self.permissions = permissions
        self.store = store
        self._granted: set[str] = set()

    async def load(self) -> None:
        self._granted = await self.store.all()

    async def apply_config(self, config: Config) -> None:
        """Owners and trusted patterns of a reloaded config; stored trust stays."""
        self.permissions = config.permissions

    def role_of(self, mxid: str) -> Role:
        if matches(mxid, self.permissions.owners):
            return "owner"
        if mxid in self._granted or matches(mxid, self.permissions.trusted):
            return "trusted"
        return "user"

    async def trust(self, mxid: str, by: str) -> bool:
        added = await self.store.grant(mxid, by)
        self._granted.add(mxid)
        return added

    async def untrust(self, mxid: str) -> bool:
        removed = await self.store.revoke(mxid)
        self._granted.discard(mxid)
        return removed
