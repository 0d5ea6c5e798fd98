"""Who is owner, trusted or user: config patterns plus trust granted in the database."""

from __future__ import annotations

from .commands.parser import Role
from .config import PermissionsConfig
from .db.trust import TrustStore
from .permissions import matches


class Roles:
    def __init__(self, permissions: PermissionsConfig, store: TrustStore) -> None:
        self.permissions = permissions
        self.store = store
        self._granted: set[str] = set()

    async def load(self) -> None:
        self._granted = await self.store.all()

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
