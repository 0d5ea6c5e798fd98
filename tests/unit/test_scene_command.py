"""``!scene`` parses as documented: names, turns=N, --topic, --order, anywhere."""

from __future__ import annotations

from typing import Any

from hivebridge.commands.base import CommandContext, CommandTable
from hivebridge.commands.parser import CommandError, ParsedCommand, parse
from hivebridge.commands.scenes import SceneCommands
from hivebridge.db.scenes import Scene
from hivebridge.personas.scenes import SceneError


class FakeScenes:
    def __init__(self, error: str | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error

    async def start(self, room_id: str, starter: str, names: list[str], **kw: Any) -> Scene:
        self.calls.append({"names": names, **kw})
        if self.error:
            raise SceneError(self.error)
        return Scene(1, room_id, tuple(names), kw["order"], kw["topic"], kw["turns"] or 6, 0,
                     None, None, None, "active", None, starter, None, 0, None)  # fmt: skip


def table(scenes: FakeScenes) -> CommandTable:
    t = CommandTable()
    SceneCommands(scenes).register(t)  # type: ignore[arg-type]
    return t


def parsed(body: str) -> ParsedCommand:
    result = parse(body, table(FakeScenes()).specs)
    assert isinstance(result, ParsedCommand), result
    return result


def test_names_params_and_flags_in_any_order() -> None:
    cmd = parsed('!scene start ada bob cy turns=6 --topic "a storm at sea" --order mention')
    assert cmd.action is not None and cmd.action.name == "start"
    assert [cmd.args[f"persona{i}"] for i in (1, 2, 3)] == ["ada", "bob", "cy"]
    assert cmd.params == {"turns": 6}
    assert cmd.flags == {"topic": "a storm at sea", "order": "mention"}
    cmd = parsed("!scene start --topic=x turns=2 ada bob")
    assert cmd.args == {"action": "start", "persona1": "ada", "persona2": "bob"}


def test_bad_input_is_one_line_never_a_traceback() -> None:
    for body in ("!scene start ada bob turns=0", "!scene start ada --order chaos", "!scene dance"):
        error = parse(body, table(FakeScenes()).specs)
        assert isinstance(error, CommandError), body
        assert "\n" not in str(error)


async def test_start_passes_names_and_options_and_answers_in_one_notice() -> None:
    scenes = FakeScenes()
    replies: list[str] = []

    async def reply(text: str) -> None:
        replies.append(text)

    ctx = CommandContext("!r:x", "@u:x", "user", "$e", reply)
    await table(scenes).run(ctx, '!scene start Ada @hive_bob:x turns=4 --topic "tea"')
    assert scenes.calls == [
        {"names": ["ada", "@hive_bob:x"], "turns": 4, "topic": "tea", "order": "round_robin"}
    ]
    assert replies and replies[0].startswith("🎬 Scene started") and "4 turns" in replies[0]

    refused = FakeScenes(error="A scene is already running here; !scene stop ends it.")
    await table(refused).run(ctx, "!scene start ada bob")
    assert replies[-1] == "A scene is already running here; !scene stop ends it."
