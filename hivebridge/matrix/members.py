"""Who is in a room and what they are called, read from mautrix's state store.

The state store learns membership from the events intake passes it, in order;
cached member lists are dropped on every membership event of their room, so a
list is never older than the last join or leave routed.
"""

from __future__ import annotations

from mautrix.appservice.state_store import ASStateStore
from mautrix.types import Membership

from ..bounded import LruDict

#: Rooms whose member list is kept (least recently asked go first; re-read on demand).
MAX_ROOMS_CACHED = 4096


class RoomMembers:
    def __init__(self, state_store: ASStateStore) -> None:
        self.state_store = state_store
        self._joined: LruDict[str, list[str]] = LruDict(MAX_ROOMS_CACHED)

    async def joined(self, room_id: str) -> list[str]:
        """The joined members of ``room_id`` (cached until its next membership event)."""
        cached = self._joined.get(room_id)
        if cached is not None:
            return cached
        members = await self.state_store.get_members(
            room_id,  # type: ignore[arg-type]
            memberships=(Membership.JOIN,),
        )
        self._joined[room_id] = result = [str(m) for m in members]
        return result

    def forget(self, room_id: str) -> None:
        """A membership event arrived: the next :meth:`joined` reads the store again."""
        self._joined.pop(room_id, None)

    async def encrypted(self, room_id: str) -> bool:
        """Whether the room's state, as far as we have seen it, has ``m.room.encryption``."""
        return bool(await self.state_store.is_encrypted(room_id))  # type: ignore[arg-type]

    async def displayname(self, room_id: str, mxid: str) -> str | None:
        member = await self.state_store.get_member(room_id, mxid)  # type: ignore[arg-type]
        return str(member.displayname) if member is not None and member.displayname else None
