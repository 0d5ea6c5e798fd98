"""``!scene start|stop|status``: personas taking turns on purpose (personas/scenes.py)."""

from __future__ import annotations

from ..db.scenes import Scene
from ..personas.scenes import SceneError, SceneService
from .base import CommandContext, CommandTable, UserError
from .parser import ActionSpec, CommandSpec, OptionSpec, ParsedCommand, normalize_persona_name

#: Positional slots for persona names (scenes.max_personas is at most this).
MAX_NAMES = 12

START_USAGE = (
    'scene start <persona> <persona> [<persona>…] [turns=N] [--topic "…"] [--order mention]'
)


class SceneCommands:
    def __init__(self, scenes: SceneService) -> None:
        self.scenes = scenes

    def register(self, table: CommandTable) -> None:
        table.add(
            CommandSpec(
                name="scene",
                usage="scene start|stop|status …",
                help="personas talk to each other, taking turns, for N turns",
                optional_args=("action", *(f"persona{i}" for i in range(1, MAX_NAMES + 1))),
                flags=(
                    OptionSpec("topic", help="what the scene is about"),
                    OptionSpec(
                        "order",
                        choices=("round_robin", "mention"),
                        help="round_robin (default) or mention: a reply names the next speaker",
                    ),
                ),
                params=(OptionSpec("turns", "int", minimum=1, help="persona messages at most"),),
                actions=(
                    ActionSpec("start", START_USAGE, "start a scene in this room"),
                    ActionSpec("stop", "scene stop", "end this room's scene now"),
                    ActionSpec("status", "scene status", "this room's scene"),
                ),
            ),
            self.run,
        )

    async def run(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        assert cmd.action is not None  # the parser insists on one
        handler = {"start": self.start, "stop": self.stop, "status": self.status}
        await handler[cmd.action.name](ctx, cmd)

    async def start(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        names = []
        for key in (f"persona{i}" for i in range(1, MAX_NAMES + 1)):
            raw = cmd.args.get(key)
            if raw is None:
                break
            if raw.startswith("@"):  # a user id: the scene looks it up
                names.append(raw)
                continue
            check = normalize_persona_name(raw)
            if check.name is None:
                raise UserError(check.error or "Bad persona name.")
            names.append(check.name)
        turns = cmd.params.get("turns")
        try:
            scene = await self.scenes.start(
                ctx.room_id,
                ctx.sender,
                names,
                turns=int(turns) if turns is not None else None,
                topic=str(cmd.flags.get("topic", "")),
                order=str(cmd.flags.get("order", "round_robin")),
            )
        except SceneError as e:
            raise UserError(str(e)) from None
        topic = f" Topic: {scene.topic}." if scene.topic else ""
        await ctx.reply(
            f"🎬 Scene started: {', '.join(scene.personas)} take {scene.max_turns} turns "
            f"({_order(scene)}).{topic} Speak to one of them by name to have them answer "
            f"next; {ctx.prefix}scene stop ends it."
        )

    async def stop(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        scene = await self.scenes.stop(ctx.room_id, ctx.sender)
        if scene is None:
            await ctx.reply("No scene is running here.")
            return
        await ctx.reply(
            f"🎬 Scene stopped by {ctx.sender} after {scene.turns_taken} of "
            f"{scene.max_turns} turns."
        )

    async def status(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        scene = await self.scenes.status(ctx.room_id)
        if scene is None:
            await ctx.reply(f"No scene here yet; {ctx.prefix}{START_USAGE}")
            return
        await ctx.reply(describe(scene))


def describe(scene: Scene) -> str:
    """One scene in a line or two: who, how far, how it ended."""
    who = ", ".join(scene.personas)
    topic = f" Topic: {scene.topic}." if scene.topic else ""
    if scene.active:
        last = f"; last {scene.last_speaker}" if scene.last_speaker else ""
        nxt = f"; {scene.requested} speaks next" if scene.requested else ""
        return (
            f"Scene running: {who} ({_order(scene)}), turn {scene.turns_taken} of "
            f"{scene.max_turns}{last}{nxt}; started by {scene.started_by}.{topic}"
        )
    how = {
        "turns": "its turns were spent",
        "nobody": "none of its personas could speak",
        "room_stopped": "the personas here were stopped",
        "stopped": f"stopped by {scene.stopped_by}",
    }.get(scene.end_reason or "", scene.end_reason or "ended")
    return (
        f"Last scene: {who}, {scene.turns_taken} of {scene.max_turns} turns; ended: {how}; "
        f"started by {scene.started_by}.{topic}"
    )


def _order(scene: Scene) -> str:
    return "each reply names the next speaker" if scene.order == "mention" else "round robin"
