"""A reply the model cannot give becomes an error notice in the room, and is counted.

The inference boundary is faked (a backend that fails, or that says nothing);
Synapse, the bridge, its database and its metrics are real. The count feeds the
dashboard's "Failed replies" panel and the HivebridgeReplyErrors alert.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from hivebridge.app import Bridge
from hivebridge.inference.types import (
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
)
from hivebridge.metrics import REGISTRY
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse]


class BrokenGeneration:
    def __init__(self, fail: bool) -> None:
        self.stats = GenerationStats()
        self._fail = fail

    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        if self._fail:
            raise InferenceError("model exploded")
        return
        yield  # an async generator that yields nothing: the model said nothing

    async def aclose(self) -> None:
        pass


class BrokenBackend:
    """Fails every request (or, with ``fail=False``, answers with nothing at all)."""

    name = "broken"

    def __init__(self) -> None:
        self.fail = True

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> BrokenGeneration:
        return BrokenGeneration(self.fail)


def failed(reason: str) -> float:
    value = REGISTRY.get_sample_value("hivebridge_replies_failed_total", {"reason": reason})
    assert value is not None, f"no series for reason={reason}"
    return value


async def test_failed_replies_are_noticed_and_counted(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    backend = BrokenBackend()
    bridge.parts.replies.backend_for = lambda persona: backend  # type: ignore[assignment]
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    before = {reason: failed(reason) for reason in ("inference_error", "empty")}

    async with await homeserver.human("broken") as human:
        room = await human.create_room([persona], direct=True)
        await human.wait_for_members(room, {human.user_id, persona})
        notices: list[str] = []
        for fail, text in ((True, "Are you there?"), (False, "Still there?")):
            backend.fail = fail
            await human.send_text(room, text)
            notice = await human.wait_for(
                room,
                lambda e: (
                    e.get("sender") == persona
                    and e.get("content", {}).get("msgtype") == "m.notice"
                    and e["event_id"] not in notices
                ),
                timeout=60,
            )
            notices.append(notice["event_id"])
            await bridge.parts.handler.drain()
            body = notice["content"]["body"]
            assert body.startswith("⚠️ I could not answer"), body
            assert ("model exploded" in body) is fail, body

    assert failed("inference_error") - before["inference_error"] == 1
    assert failed("empty") - before["empty"] == 1
