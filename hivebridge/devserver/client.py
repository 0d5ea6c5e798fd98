"""A human Matrix user for the demo and the tests: plain client-server API calls."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from ..matrix.content import is_edit as content_is_edit

Event = dict[str, Any]

#: The content of ``m.room.encryption`` every Matrix client writes.
MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}


async def register_user(
    base_url: str, shared_secret: str, username: str, password: str, *, admin: bool = False
) -> dict[str, Any]:
    """Shared-secret registration (works with enable_registration: false)."""
    url = f"{base_url}/_synapse/admin/v1/register"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            nonce = (await resp.json())["nonce"]
        mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                p.encode() for p in (nonce, username, password, "admin" if admin else "notadmin")
            )
        )
        body = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        async with http.post(url, json=body) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"registration of {username} failed: {data}")
            return dict(data)


class MatrixError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body.get('errcode')}: {body.get('error')}")
        self.status = status
        self.errcode = body.get("errcode")


class HumanClient:
    """Logged-in user; :meth:`events` follows a room through /sync."""

    _txn = itertools.count()

    def __init__(self, base_url: str, user_id: str, access_token: str) -> None:
        self.base_url = base_url
        self.user_id = user_id
        self.access_token = access_token
        self._http: aiohttp.ClientSession | None = None
        self._since: str | None = None
        self.timeline: dict[str, list[Event]] = {}

    @classmethod
    async def create(
        cls, base_url: str, shared_secret: str, username: str, password: str = "hunter2-hive"
    ) -> HumanClient:
        data = await register_user(base_url, shared_secret, username, password)
        return cls(base_url, data["user_id"], data["access_token"])

    async def __aenter__(self) -> HumanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.access_token}"}
            )
        url = f"{self.base_url}/_matrix/client/v3{path}"
        async with self._http.request(method, url, json=body, params=params or None) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise MatrixError(resp.status, data or {})
            return data

    async def create_room(
        self,
        invite: list[str] | tuple[str, ...] = (),
        *,
        direct: bool = False,
        name: str | None = None,
        encrypted: bool = False,
        alias: str | None = None,
    ) -> str:
        """A new room; ``encrypted`` puts ``m.room.encryption`` (megolm) in its first state;
        ``alias`` is the localpart of its alias (``hive`` makes ``#hive:server``)."""
        body: dict[str, Any] = {
            "invite": list(invite),
            "preset": "trusted_private_chat" if direct else "private_chat",
            "is_direct": direct,
        }
        if name:
            body["name"] = name
        if alias:
            body["room_alias_name"] = alias
        if encrypted:
            body["initial_state"] = [
                {"type": "m.room.encryption", "state_key": "", "content": MEGOLM}
            ]
        return str((await self.request("POST", "/createRoom", body))["room_id"])

    async def set_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        path = f"/rooms/{quote(room_id)}/state/{event_type}/{quote(state_key)}"
        return str((await self.request("PUT", path, content))["event_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.request("POST", f"/rooms/{quote(room_id)}/invite", {"user_id": user_id})

    async def join(self, room_id: str) -> None:
        await self.request("POST", f"/join/{quote(room_id)}", {})

    async def leave(self, room_id: str) -> None:
        await self.request("POST", f"/rooms/{quote(room_id)}/leave", {})

    async def send(
        self, room_id: str, content: dict[str, Any], event_type: str = "m.room.message"
    ) -> str:
        txn = f"h{time.time_ns()}{next(self._txn)}"
        path = f"/rooms/{quote(room_id)}/send/{event_type}/{txn}"
        return str((await self.request("PUT", path, content))["event_id"])

    async def send_text(self, room_id: str, body: str, **extra: Any) -> str:
        return await self.send(room_id, {"msgtype": "m.text", "body": body, **extra})

    async def joined_members(self, room_id: str) -> list[str]:
        data = await self.request("GET", f"/rooms/{quote(room_id)}/joined_members")
        return sorted(data["joined"])

    async def sync_once(self, timeout_ms: int = 1000) -> None:
        params = {"timeout": str(timeout_ms)}
        if self._since:
            params["since"] = self._since
        data = await self.request("GET", "/sync", **params)
        self._since = data["next_batch"]
        for room_id, room in data.get("rooms", {}).get("join", {}).items():
            self.timeline.setdefault(room_id, []).extend(room.get("timeline", {}).get("events", []))

    async def wait_for(
        self, room_id: str, predicate: Callable[[Event], bool], timeout: float = 60.0
    ) -> Event:
        """The first event in the room (seen so far or arriving) that matches."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.timeline.get(room_id, []):
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching event in {room_id} after {timeout:.0f}s")
            await self.sync_once(timeout_ms=500)

    async def wait_for_members(
        self, room_id: str, members: set[str], timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not members <= set(await self.joined_members(room_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{members} did not join {room_id}")
            await asyncio.sleep(0.1)


def is_edit(event: Event) -> bool:
    """An ``m.replace`` edit of another event."""
    return content_is_edit(event.get("content", {}))


def shown_text(history: list[Event], event_id: str) -> str:
    """What a client shows for ``event_id``: its last edit's new content, or its body."""
    text = ""
    for e in history:
        if e.get("event_id") == event_id:
            text = str(e["content"].get("body", ""))
        elif is_edit(e) and e["content"]["m.relates_to"].get("event_id") == event_id:
            text = str(e["content"].get("m.new_content", {}).get("body", text))
    return text
