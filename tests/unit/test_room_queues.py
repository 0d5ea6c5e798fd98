from __future__ import annotations

import asyncio

from hivebridge.matrix.room_queues import RoomQueues


async def test_one_room_in_order_rooms_in_parallel() -> None:
    seen: list[tuple[str, int]] = []
    gate = asyncio.Event()

    async def handle(room: str, item: int) -> None:
        if room == "!slow" and item == 0:
            await gate.wait()  # the slow room blocks only itself
        seen.append((room, item))

    queues: RoomQueues[int] = RoomQueues(handle)
    for i in range(3):
        queues.push("!slow", i)
        queues.push("!fast", i)
    await asyncio.sleep(0.05)
    assert [i for r, i in seen if r == "!fast"] == [0, 1, 2]
    assert not [i for r, i in seen if r == "!slow"]
    gate.set()
    await queues.drain()
    assert [i for r, i in seen if r == "!slow"] == [0, 1, 2]
    await queues.close()


async def test_a_failing_item_does_not_stop_the_room() -> None:
    seen: list[int] = []

    async def handle(room: str, item: int) -> None:
        if item == 1:
            raise RuntimeError("boom")
        seen.append(item)

    queues: RoomQueues[int] = RoomQueues(handle)
    for i in range(3):
        queues.push("!r", i)
    await queues.drain()
    assert seen == [0, 2]
    await queues.close()


async def test_idle_consumer_exits_and_restarts() -> None:
    seen: list[int] = []

    async def handle(room: str, item: int) -> None:
        seen.append(item)

    queues: RoomQueues[int] = RoomQueues(handle, idle_timeout=0.01)
    queues.push("!r", 1)
    await asyncio.sleep(0.1)
    assert seen == [1]
    queues.push("!r", 2)
    await queues.drain()
    assert seen == [1, 2]
    await queues.close()


async def test_a_flooded_room_keeps_a_bounded_queue_and_never_drops_state() -> None:
    """Before: a room flooded while busy queued every event in memory."""
    gate, busy = asyncio.Event(), asyncio.Event()
    seen: list[int | str] = []
    dropped: list[int | str] = []

    async def handle(room: str, item: int | str) -> None:
        if item == 0:
            busy.set()
            await gate.wait()  # a slow reply holds the room
        seen.append(item)

    queues: RoomQueues[int | str] = RoomQueues(
        handle,
        max_per_room=10,
        droppable=lambda item: isinstance(item, int),
        on_drop=lambda room, item: dropped.append(item),
    )
    queues.push("!r", 0)
    await busy.wait()
    for i in range(1, 5000):
        queues.push("!r", "join" if i == 3 else i)
        assert queues.pending <= 10
    gate.set()
    await queues.drain()
    assert seen[:2] == [0, "join"]  # state is never dropped, order is kept
    assert seen[2:] == list(range(4991, 5000))  # the newest messages
    assert len(dropped) == 5000 - len(seen) and "join" not in dropped
    await queues.close()


async def test_wind_down_finishes_what_runs_and_starts_nothing_queued() -> None:
    started: list[tuple[str, int]] = []
    finished: list[tuple[str, int]] = []
    release = asyncio.Event()
    running = asyncio.Event()

    async def handle(room: str, item: int) -> None:
        started.append((room, item))
        running.set()
        await release.wait()
        finished.append((room, item))

    queues: RoomQueues[int] = RoomQueues(handle)
    queues.push("!busy", 0)
    queues.push("!busy", 1)  # queued behind: never starts
    await running.wait()
    queues.push("!idle", 0)  # a consumer waiting for its first item gets cancelled
    asyncio.get_running_loop().call_soon(release.set)
    ended = await queues.wind_down(grace_s=3600)
    assert (ended.in_flight, ended.finished, ended.cut) == (1, 1, 0)
    assert finished == [("!busy", 0)]
    assert ("!busy", 1) not in started
    await queues.close()


async def test_wind_down_cuts_at_the_grace_or_when_hurried() -> None:
    cancelled: list[int] = []
    running = asyncio.Event()

    async def handle(room: str, item: int) -> None:
        running.set()
        try:
            await asyncio.Event().wait()  # a reply that never ends
        except asyncio.CancelledError:
            cancelled.append(item)
            raise

    queues: RoomQueues[int] = RoomQueues(handle)
    queues.push("!r", 1)
    await running.wait()
    ended = await queues.wind_down(grace_s=0)
    assert (ended.in_flight, ended.cut, ended.queued) == (1, 1, 0)
    await queues.close()
    assert cancelled == [1]

    hurry = asyncio.Event()
    queues = RoomQueues(handle)
    queues.push("!r", 2)
    queues.push("!r", 3)
    running.clear()
    await running.wait()
    asyncio.get_running_loop().call_soon(hurry.set)
    ended = await queues.wind_down(grace_s=3600, hurry=hurry)
    assert (ended.in_flight, ended.cut, ended.queued) == (1, 1, 1)
    await queues.close()
    assert cancelled == [1, 2]
