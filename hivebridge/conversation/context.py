"""Prompt assembly for one persona's reply: which turns fit, in what words.

Pure: stored turns in, :class:`~hivebridge.inference.types.ChatMessage` lists
out. The caller loads turns (room or thread, after the last summary or reset)
and counts tokens with the model's tokenizer.

Prompts are built to keep the local engine's KV prefix cache hitting:

* **Deterministic**: the same inputs give byte-identical messages; no
  timestamps, event ids or other volatile data go into the text.
* **Append-only**: one system message (prompt + summary), then one message per
  turn, oldest first. Consecutive user turns stay separate messages: merging
  them would rewrite the last message when a new turn arrives. Adding a turn
  therefore only appends a message.
* **Trimmed in chunks (hysteresis)**: dropping the oldest turn changes the
  prefix and costs a full prefill. Dropping one turn per new turn would do that
  on every reply once the budget is full, so when the turns no longer fit the
  window jumps forward until they use at most ``low_water`` (75 %) of the
  room left after the system block. The next several turns then append to a
  stable prefix before the next jump. The window is found by replaying that
  rule over the whole turn list, so it needs no stored state: pass every turn
  since the chapter started (the last summary or reset), not a sliding "last
  N turns" slice, or the window start can move on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from hivebridge.inference.types import ChatMessage, ToolCall

__all__ = [
    "DEFAULT_LOW_WATER",
    "MESSAGE_OVERHEAD",
    "SUMMARY_HEADER",
    "SUMMARY_INSTRUCTION",
    "TRUNCATION_MARKER",
    "Mode",
    "Prompt",
    "SummaryRequest",
    "TokenCounter",
    "ToolUse",
    "Turn",
    "apply_reset",
    "build_prompt",
    "build_summary_request",
    "render_turn",
    "render_turn_messages",
    "rollback",
    "select_turns",
    "summary_due",
    "system_content",
]

TokenCounter = Callable[[str], int]

# Chat templates wrap every message in role markers; a flat per-message
# allowance keeps the estimate on the safe side without knowing the template.
MESSAGE_OVERHEAD = 4
DEFAULT_LOW_WATER = 0.75
SUMMARY_HEADER = "\n\nSummary of the conversation so far:\n"
TRUNCATION_MARKER = "\n[… message truncated …]\n"
# Share of a truncated message's kept text taken from its start; the rest comes
# from its end, where the actual question usually is.
_HEAD_SHARE = 1 / 3


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool call a reply made before its text, and the result the model saw."""

    call: ToolCall
    result: str
    hop: int = 0  # calls of one hop were asked for together
    note: str = ""  # what the model said along with the call(s)


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored message of a room, as the prompt sees it."""

    event_id: str
    sender_mxid: str
    sender_name: str  # display name, shown to the model in group rooms
    is_self: bool  # this persona's own message: an assistant turn
    body: str
    ts: int  # origin_server_ts (ms); never put into the text
    thread_root: str | None = None  # root event id when the turn is in a thread
    #: The tool calls behind this (own) reply, in order; rendered before it.
    tools: tuple[ToolUse, ...] = ()


@dataclass(frozen=True, slots=True)
class Prompt:
    """The messages for one reply and where the budget went (for ``!context``)."""

    messages: list[ChatMessage]
    budget: int
    system_tokens: int  # persona prompt, with its message overhead
    summary_tokens: int  # what appending the summary added to the system message
    turns_tokens: int  # history turns included (the new message not counted)
    new_message_tokens: int
    turns_included: int
    turns_dropped: int
    dropped_tokens: int  # what the dropped turns would have cost
    new_message_truncated: bool
    included: tuple[Turn, ...]  # history turns in the prompt, oldest first
    dropped: tuple[Turn, ...]  # history turns before the window, oldest first

    @property
    def total_tokens(self) -> int:
        parts = (self.system_tokens, self.summary_tokens, self.turns_tokens)
        return sum(parts) + self.new_message_tokens


def render_turn(turn: Turn, is_group: bool) -> ChatMessage:
    """A turn as a chat message: other people (and other personas) are users.

    In group rooms a user turn says who spoke (``"Alice: hello"``); in a DM
    there is only one other party, so the body goes in as is.
    """
    if turn.is_self:
        return ChatMessage("assistant", turn.body)
    if is_group:
        return ChatMessage("user", f"{turn.sender_name}: {turn.body}")
    return ChatMessage("user", turn.body)


def render_turn_messages(turn: Turn, is_group: bool) -> list[ChatMessage]:
    """A turn with the tool calls behind it: per hop an assistant message with its
    calls and a ``tool`` message per result, then the reply itself."""
    if not (turn.is_self and turn.tools):
        return [render_turn(turn, is_group)]
    out: list[ChatMessage] = []
    hops: dict[int, list[ToolUse]] = {}
    for use in turn.tools:
        hops.setdefault(use.hop, []).append(use)
    for _hop, uses in sorted(hops.items()):
        out.append(ChatMessage("assistant", uses[0].note, tool_calls=tuple(u.call for u in uses)))
        for use in uses:
            out.append(
                ChatMessage("tool", use.result, tool_call_id=use.call.id, name=use.call.name)
            )
    out.append(render_turn(turn, is_group))
    return out


def system_content(system_prompt: str, summary: str | None) -> str:
    """The one system message: persona prompt, then the chapter summary if any."""
    if summary and summary.strip():
        return system_prompt + SUMMARY_HEADER + summary.strip()
    return system_prompt


def _cost(count_tokens: TokenCounter, message: ChatMessage) -> int:
    cost = count_tokens(message.content) + MESSAGE_OVERHEAD
    for call in message.tool_calls:
        cost += count_tokens(f"{call.name} {call.arguments_json()}") + MESSAGE_OVERHEAD
    return cost


def _truncate_middle(
    turn: Turn, is_group: bool, limit: int, count_tokens: TokenCounter
) -> tuple[ChatMessage, int]:
    """Cut the middle of ``turn``'s body so its message costs at most ``limit``.

    The start (what is being talked about) and the end (the actual question)
    are kept, a third and two thirds of what fits, around
    :data:`TRUNCATION_MARKER`. When not even the marker fits, the marker alone
    is returned and the budget is exceeded.
    """
    body = turn.body

    def make(keep: int) -> ChatMessage:
        head = int(keep * _HEAD_SHARE)
        tail = keep - head
        text = body[:head] + TRUNCATION_MARKER + (body[len(body) - tail :] if tail else "")
        return render_turn(_with_body(turn, text), is_group)

    lo, hi = 0, len(body) - 1  # largest keep in [lo, hi] that fits; lo assumed to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _cost(count_tokens, make(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    message = make(lo)
    return message, _cost(count_tokens, message)


def _with_body(turn: Turn, body: str) -> Turn:
    return replace(turn, body=body)


def _window_start(costs: Sequence[int], available: int, low_water: float) -> int:
    """Replay the chunked trimming over ``costs``; index of the first kept item.

    Each step appends one item (the last is the new message, always kept). When
    the window goes over ``available`` its start jumps forward until the window
    is within ``low_water * available``.
    """
    low = int(available * low_water)
    start = 0
    total = 0
    for end, cost in enumerate(costs):
        total += cost
        if total > available:
            while start < end and total > low:
                total -= costs[start]
                start += 1
    return start


def build_prompt(
    system_prompt: str,
    summary: str | None,
    turns: Sequence[Turn],
    new_message: Turn,
    *,
    is_group: bool,
    budget: int,
    count_tokens: TokenCounter,
    low_water: float = DEFAULT_LOW_WATER,
) -> Prompt:
    """Messages for a reply to ``new_message``, fitted to ``budget`` tokens.

    ``turns`` is the stored history before the new message, oldest first (a
    copy of the new message in it, by event id, is ignored). The system block
    is never trimmed and the new message is always included; history turns
    are dropped whole, oldest first, in chunks (see the module docs). If the
    new message alone does not fit what the system block leaves, its middle is
    cut (see :func:`_truncate_middle`); only when the system block alone leaves
    no room is the budget exceeded. ``count_tokens`` is called once per turn on
    every build: memoize it (``functools.lru_cache``) for long chapters.
    """
    if not 0 < low_water <= 1:
        raise ValueError("low_water must be in (0, 1]")
    history = [t for t in turns if t.event_id != new_message.event_id]

    system_text = system_content(system_prompt, summary)
    system_tokens = _cost(count_tokens, ChatMessage("system", system_prompt))
    full_system_tokens = _cost(count_tokens, ChatMessage("system", system_text))
    summary_tokens = full_system_tokens - system_tokens if system_text != system_prompt else 0
    available = budget - full_system_tokens

    rendered = [render_turn_messages(t, is_group) for t in history]
    costs = [sum(_cost(count_tokens, m) for m in ms) for ms in rendered]
    new_rendered = render_turn(new_message, is_group)
    new_cost = _cost(count_tokens, new_rendered)
    truncated = False
    if new_cost > available:
        new_rendered, new_cost = _truncate_middle(new_message, is_group, available, count_tokens)
        truncated = True
        start = len(history)
    else:
        start = _window_start([*costs, new_cost], available, low_water)

    return Prompt(
        messages=[
            ChatMessage("system", system_text),
            *(m for ms in rendered[start:] for m in ms),
            new_rendered,
        ],
        budget=budget,
        system_tokens=system_tokens,
        summary_tokens=summary_tokens,
        turns_tokens=sum(costs[start:]),
        new_message_tokens=new_cost,
        turns_included=len(history) - start,
        turns_dropped=start,
        dropped_tokens=sum(costs[:start]),
        new_message_truncated=truncated,
        included=tuple(history[start:]),
        dropped=tuple(history[:start]),
    )


# -- thread / room selection, reset, rollback -------------------------------------------

Mode = Literal["room", "thread"]


def select_turns(turns: Sequence[Turn], thread_root: str | None, mode: Mode) -> list[Turn]:
    """The turns a reply sees: the main timeline, or one thread with its root.

    ``room``: turns not in any thread (thread replies are side conversations).
    ``thread``: the root event, then the turns whose ``thread_root`` is it.
    Order is kept as given (the caller's storage order).
    """
    if mode == "room":
        return [t for t in turns if t.thread_root is None]
    if thread_root is None:
        raise ValueError("thread mode needs a thread_root")
    return [t for t in turns if t.event_id == thread_root or t.thread_root == thread_root]


def apply_reset(turns: Sequence[Turn], reset_event_id: str | None) -> list[Turn]:
    """Turns after the reset event (it and everything before are forgotten).

    If the event is not in the list (``None``, or the caller already loaded only
    later turns) the list is returned unchanged.
    """
    if reset_event_id is not None:
        for i in range(len(turns) - 1, -1, -1):
            if turns[i].event_id == reset_event_id:
                return list(turns[i + 1 :])
    return list(turns)


def rollback(turns: Sequence[Turn], exchanges: int) -> list[Turn]:
    """Turns with the last ``exchanges`` exchanges (and anything after) removed.

    An exchange is the persona's reply (a run of its own consecutive turns,
    e.g. a split message) and the user turn just before it, the one it
    answered. The history is cut at that user turn, so unanswered turns after
    the last reply go too. With fewer exchanges than asked, all are removed;
    with none (or ``exchanges <= 0``) the list is returned unchanged.
    """
    cut = len(turns)
    i = len(turns)
    remaining = exchanges
    while remaining > 0:
        j = i - 1
        while j >= 0 and not turns[j].is_self:
            j -= 1
        if j < 0:
            break  # no earlier reply: nothing more to roll back
        while j > 0 and turns[j - 1].is_self:
            j -= 1
        cut = j - 1 if j > 0 else 0  # the user turn that the reply answered
        i = cut
        remaining -= 1
    return list(turns[:cut])


# -- chapter summaries ------------------------------------------------------------------

SUMMARY_INSTRUCTION = (
    "You maintain the running summary of a chat conversation. Merge the previous "
    "summary (if any) with the new messages into one concise summary in the third "
    "person: who is involved, facts and preferences they shared, decisions, open "
    "questions and the current topic. Keep names. Write only the summary."
)


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """What to send to the summarizer, and what the resulting summary covers."""

    messages: list[ChatMessage]
    covered: tuple[Turn, ...]  # oldest first; the prefix of the given turns used
    up_to_event_id: str  # the summary covers the chapter up to and including it
    up_to_ts: int


def summary_due(prompt: Prompt, *, min_dropped_turns: int = 8, min_dropped_tokens: int = 0) -> bool:
    """Whether the history outgrew the budget enough to fold old turns into a summary.

    Dropped turns are invisible to the model; once enough have piled up, a new
    chapter summary (covering them) brings them back in a few tokens. Both
    thresholds must be met. The summary changes the system block, so the KV
    prefix is rebuilt once per chapter, not per turn.
    """
    return (
        prompt.turns_dropped > 0
        and prompt.turns_dropped >= min_dropped_turns
        and prompt.dropped_tokens >= min_dropped_tokens
    )


def _transcript_line(turn: Turn) -> str:
    """One line per turn; a reply's tool calls, with short results, go before it."""
    used = "".join(
        f"[{u.call.name}({u.call.arguments_json()}) -> {' '.join(u.result.split())[:120]}] "
        for u in turn.tools
    )
    return f"{turn.sender_name}: {used}{turn.body}"


def build_summary_request(
    turns: Sequence[Turn],
    previous_summary: str | None,
    *,
    budget: int,
    count_tokens: TokenCounter,
    persona_name: str | None = None,
    instruction: str = SUMMARY_INSTRUCTION,
) -> SummaryRequest:
    """Messages asking for a new summary of ``previous_summary`` + ``turns``.

    Usually ``turns`` is :attr:`Prompt.dropped`. The transcript takes turns
    oldest first while they fit ``budget`` (always at least one, its middle cut
    if needed); the rest wait for the next chapter. Every speaker, the persona
    included, is named, since a summary is written from outside.
    """
    if not turns:
        raise ValueError("nothing to summarize")
    system_text = instruction
    if persona_name:
        system_text += f" The assistant in this conversation is {persona_name}."
    system = ChatMessage("system", system_text)
    header = ""
    if previous_summary and previous_summary.strip():
        header = f"Previous summary:\n{previous_summary.strip()}\n\n"
    header += "New messages:\n"

    def user(lines: list[str]) -> ChatMessage:
        return ChatMessage("user", header + "\n".join(lines))

    fixed = _cost(count_tokens, system) + _cost(count_tokens, user([]))
    lines: list[str] = []
    used = fixed
    covered: list[Turn] = []
    for turn in turns:
        line = _transcript_line(turn)
        extra = count_tokens(line + "\n")
        if covered and used + extra > budget:
            break
        if not covered and used + extra > budget:
            as_user = replace(turn, is_self=False)
            cut, _ = _truncate_middle(as_user, True, max(budget - fixed, 0), count_tokens)
            line = cut.content
        lines.append(line)
        covered.append(turn)
        used += extra
    last = covered[-1]
    return SummaryRequest(
        messages=[system, user(lines)],
        covered=tuple(covered),
        up_to_event_id=last.event_id,
        up_to_ts=last.ts,
    )
