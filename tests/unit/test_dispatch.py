"""Per-persona answer decisions: every rule, in order, plus crash-freedom and symmetry."""

from __future__ import annotations

import unicodedata
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivebridge.matrix.content import BOUNCE_LIMIT_KEY, strip_reply_fallback
from hivebridge.routing.dispatch import (
    Decision,
    MessageView,
    PersonaView,
    Reason,
    RoomView,
    addressed_in_thread,
    decide,
    next_bounce_limit,
)

BOT = "@hivebridge:example.org"
HUMAN = "@carol:example.org"
ALICE = PersonaView("@hb_alice:example.org", "hb_alice", "Alice")
BOB = PersonaView("@hb_bob:example.org", "hb_bob", "Dr. Bob Jr.")
ZOE = PersonaView("@hb_zoe:example.org", "hb_zoe", "Zoë")
PERSONAS = frozenset({ALICE.mxid, BOB.mxid, ZOE.mxid})
GROUP = RoomView(joined_member_count=5, bot_mxid=BOT, persona_mxids=PERSONAS)
DIRECT = RoomView(joined_member_count=2, bot_mxid=BOT, persona_mxids=PERSONAS)


def msg(body: str = "hello", sender: str = HUMAN, **kw: object) -> MessageView:
    return MessageView(event_id="$ev", sender=sender, body=body, **kw)  # type: ignore[arg-type]


def reason(message: MessageView, persona: PersonaView = ALICE, room: RoomView = GROUP) -> Reason:
    decision = decide(message, persona, room)
    assert decision.answer == (decision.reason in _ANSWERING)
    return decision.reason


_ANSWERING = {
    Reason.DIRECT_ROOM,
    Reason.MENTIONED,
    Reason.PILL,
    Reason.REPLY,
    Reason.NAME,
    Reason.THREAD_FOLLOWUP,
}


# --- never answer ----------------------------------------------------------------------------


def test_own_message_even_in_direct_room_and_when_named() -> None:
    assert reason(msg("Alice here", sender=ALICE.mxid), room=DIRECT) is Reason.OWN_MESSAGE


def test_bridge_bot_is_ignored() -> None:
    assert reason(msg("Alice, look", sender=BOT), room=DIRECT) is Reason.FROM_BRIDGE_BOT


def test_notice_edit_redaction_never_trigger() -> None:
    assert reason(msg("Alice?", msgtype="m.notice"), room=DIRECT) is Reason.NOTICE
    edit = msg("* Alice?", rel_type="m.replace", relates_to_event_id="$orig")
    assert reason(edit, room=DIRECT) is Reason.EDIT
    assert reason(msg("", is_redaction=True), room=DIRECT) is Reason.REDACTION


def test_stopped_room_is_silent_even_when_mentioned() -> None:
    stopped = replace(GROUP, active=False)
    assert reason(msg("Alice", mention_user_ids=(ALICE.mxid,)), room=stopped) is (
        Reason.ROOM_STOPPED
    )
    assert reason(msg("hi"), room=replace(DIRECT, active=False)) is Reason.ROOM_STOPPED


def test_emote_is_a_normal_message() -> None:
    assert reason(msg("waves at Alice", msgtype="m.emote")) is Reason.NAME


# --- direct rooms ----------------------------------------------------------------------------


def test_two_members_answer_everything() -> None:
    assert reason(msg("what's the weather")) is Reason.NOT_ADDRESSED
    assert reason(msg("what's the weather"), room=DIRECT) is Reason.DIRECT_ROOM


@pytest.mark.parametrize("count", [3, 4, 100])
def test_three_or_more_need_addressing(count: int) -> None:
    room = replace(GROUP, joined_member_count=count)
    assert reason(msg("nice day"), room=room) is Reason.NOT_ADDRESSED


# --- addressing ------------------------------------------------------------------------------


def test_mentions_user_ids() -> None:
    assert reason(msg("hey you", mention_user_ids=(ALICE.mxid,))) is Reason.MENTIONED
    assert reason(msg("hey you", mention_user_ids=(BOB.mxid,))) is Reason.NOT_ADDRESSED
    assert reason(msg("hey you", mention_user_ids=())) is Reason.NOT_ADDRESSED


@pytest.mark.parametrize(
    ("body", "html"),
    [
        ("hi", '<a href="https://matrix.to/#/@hb_alice:example.org">A</a> hi'),
        ("hi", '<a href="https://matrix.to/#/%40hb_alice%3Aexample.org">A</a>'),
        ("hi", "<a href='https://matrix.to/#/@hb_alice:example.org?via=x'>A</a>"),
        ("hi", '<a href="matrix:u/hb_alice:example.org?action=chat">A</a>'),
        ("see https://matrix.to/#/@hb_alice:example.org", None),
        ("ping @hb_alice:example.org.", None),
        ("ping @HB_Alice:Example.org", None),
    ],
)
def test_pills_and_links(body: str, html: str | None) -> None:
    assert reason(msg(body, formatted_body=html)) is Reason.PILL


@pytest.mark.parametrize(
    "body",
    [
        "ping @hb_alice:example.org.uk",
        "ping @hb_alice:example.orgs",
        "https://matrix.to/#/@hb_alicex:example.org",
        "mail hb_alice:example.org@x",
    ],
)
def test_links_to_other_users_are_not_pills(body: str) -> None:
    assert reason(msg(body)) is not Reason.PILL  # the localpart as a word still counts as NAME
    other = PersonaView(ALICE.mxid, "zz", "Zed")
    assert reason(msg(body), persona=other) is Reason.NOT_ADDRESSED


def test_reply_to_persona_message() -> None:
    reply = msg("good point", in_reply_to_event_id="$a", reply_to_sender=ALICE.mxid)
    assert reason(reply) is Reason.REPLY
    assert reason(reply, persona=BOB) is Reason.NOT_ADDRESSED


def test_thread_fallback_reply_is_not_a_reply() -> None:
    fallback = msg(
        "more",
        in_reply_to_event_id="$last",
        reply_to_sender=ALICE.mxid,
        reply_is_fallback=True,
        rel_type="m.thread",
        thread_root="$root",
    )
    assert reason(fallback) is Reason.NOT_ADDRESSED


@pytest.mark.parametrize(
    "body",
    [
        "Alice, what do you think?",
        "what do you think, alice",
        "ALICE!",
        "@Alice hi",
        "hb_alice: status?",
        "(alice)",
        "ask «Alice» please",
    ],
)
def test_name_at_word_boundary(body: str) -> None:
    assert reason(msg(body)) is Reason.NAME


@pytest.mark.parametrize("body", ["Alicefoo", "malice", "Alice_bot", "Alice2", "xhb_alice"])
def test_name_inside_a_word_does_not_match(body: str) -> None:
    assert reason(msg(body)) is Reason.NOT_ADDRESSED


def test_display_name_with_spaces_punctuation_and_unicode() -> None:
    assert reason(msg("thanks dr. bob jr. for that"), persona=BOB) is Reason.NAME
    assert reason(msg("thanks Dr.  Bob\nJr."), persona=BOB) is Reason.NAME  # any whitespace
    assert reason(msg("Dr. Bob Jr.s idea"), persona=BOB) is Reason.NAME
    assert reason(msg("Dr x Bob Jr"), persona=BOB) is Reason.NOT_ADDRESSED  # "." is literal
    assert reason(msg("ZOË, hi"), persona=ZOE) is Reason.NAME
    assert reason(msg("Zoe̅, hi"), persona=ZOE) is Reason.NOT_ADDRESSED
    assert reason(msg("ｚｏë?"), persona=ZOE) is Reason.NAME  # NFKC: fullwidth letters
    assert reason(msg("Zoëy"), persona=ZOE) is Reason.NOT_ADDRESSED


def test_regex_metacharacters_in_names_are_literal() -> None:
    weird = PersonaView("@hb_x:example.org", "hb_x", "a+b (c)*")
    assert reason(msg("hey a+b (c)* !"), persona=weird) is Reason.NAME
    assert reason(msg("hey aab (c)"), persona=weird) is Reason.NOT_ADDRESSED


def test_missing_or_blank_display_name_falls_back_to_localpart() -> None:
    plain = PersonaView("@hb_q:example.org", "hb_q", None)
    blank = PersonaView("@hb_q:example.org", "hb_q", "   ")
    assert reason(msg("hb_q?"), persona=plain) is Reason.NAME
    assert reason(msg("hello   there"), persona=blank) is Reason.NOT_ADDRESSED


def test_quoting_a_persona_is_not_addressing_it() -> None:
    body = "> <@hb_alice:example.org> Alice says hi\n> more\n\nnice one"
    html = (
        '<mx-reply><blockquote><a href="https://matrix.to/#/@hb_alice:example.org">Alice</a>'
        "<br>Alice says hi</blockquote></mx-reply>nice one"
    )
    quoted = msg(body, formatted_body=html, in_reply_to_event_id="$a", reply_to_sender=HUMAN)
    assert reason(quoted) is Reason.NOT_ADDRESSED


def test_name_after_the_quote_still_counts() -> None:
    body = "> <@carol:example.org> something\n\nAlice, agree?"
    assert reason(msg(body, in_reply_to_event_id="$c", reply_to_sender=HUMAN)) is Reason.NAME


def test_hand_written_quote_in_a_non_reply_is_not_stripped() -> None:
    assert reason(msg("> Alice said this\n\nthoughts?")) is Reason.NAME


def test_strip_reply_fallback() -> None:
    assert strip_reply_fallback("> a\n> b\n\nc\nd") == "c\nd"
    assert strip_reply_fallback(">\n> x\nbody") == "body"
    assert strip_reply_fallback(">no space") == ">no space"
    assert strip_reply_fallback("text\n> later quote") == "text\n> later quote"
    assert strip_reply_fallback("") == ""


def test_reason_priority_mention_over_name() -> None:
    both = msg("Alice", mention_user_ids=(ALICE.mxid,), reply_to_sender=ALICE.mxid)
    assert reason(both) is Reason.MENTIONED


# --- threads ---------------------------------------------------------------------------------


def test_thread_followup_only_for_persona_addressed_there() -> None:
    room = replace(GROUP, addressed_threads=frozenset({("$root", ALICE.mxid)}))
    in_thread = msg(
        "and then?", rel_type="m.thread", relates_to_event_id="$root", thread_root="$root"
    )
    assert reason(in_thread, room=room) is Reason.THREAD_FOLLOWUP
    assert reason(in_thread, persona=BOB, room=room) is Reason.NOT_ADDRESSED
    elsewhere = replace(in_thread, thread_root="$other")
    assert reason(elsewhere, room=room) is Reason.NOT_ADDRESSED
    assert reason(msg("and then?"), room=room) is Reason.NOT_ADDRESSED


def test_thread_rooted_at_persona_message_is_a_followup() -> None:
    on_alice = msg("more please", thread_root="$root", thread_root_sender=ALICE.mxid)
    assert reason(on_alice) is Reason.THREAD_FOLLOWUP
    assert reason(on_alice, persona=BOB) is Reason.NOT_ADDRESSED


def test_addressed_in_thread_key() -> None:
    top = msg(
        "Alice?",
    )
    assert addressed_in_thread(top, ALICE, decide(top, ALICE, GROUP)) == ("$ev", ALICE.mxid)
    inside = msg("Alice?", thread_root="$root")
    assert addressed_in_thread(inside, ALICE, decide(inside, ALICE, GROUP)) == (
        "$root",
        ALICE.mxid,
    )
    assert addressed_in_thread(inside, BOB, decide(inside, BOB, GROUP)) is None
    # direct rooms answer everything; that is not "addressed" and records nothing
    assert addressed_in_thread(inside, ALICE, decide(inside, ALICE, DIRECT)) is None
    assert addressed_in_thread(inside, ALICE, Decision(False, Reason.NAME)) is None


def test_recorded_thread_makes_followups_addressed() -> None:
    first = MessageView("$q", HUMAN, "Alice, start a thread?", thread_root="$root")
    key = addressed_in_thread(first, ALICE, decide(first, ALICE, GROUP))
    assert key is not None
    room = replace(GROUP, addressed_threads={key})
    follow = MessageView("$q2", HUMAN, "go on", thread_root="$root")
    assert decide(follow, ALICE, room) == Decision(True, Reason.THREAD_FOLLOWUP)


# --- several personas; persona senders; bounce limit -----------------------------------------


def test_several_addressed_personas_each_answer() -> None:
    message = msg("Alice and Dr. Bob Jr., discuss", mention_user_ids=(ZOE.mxid,))
    reasons = {p.localpart: reason(message, persona=p) for p in (ALICE, BOB, ZOE)}
    assert reasons == {"hb_alice": Reason.NAME, "hb_bob": Reason.NAME, "hb_zoe": Reason.MENTIONED}


def test_persona_sender_follows_the_same_rules() -> None:
    from_bob = msg("Alice, your turn", sender=BOB.mxid, bounce_limit=3)
    assert reason(from_bob) is Reason.NAME
    assert reason(msg("nobody", sender=BOB.mxid, bounce_limit=3)) is Reason.NOT_ADDRESSED
    assert reason(msg("x", sender=BOB.mxid, bounce_limit=3), room=DIRECT) is Reason.DIRECT_ROOM


@pytest.mark.parametrize("limit", [0, -1, -100])
def test_spent_bounce_limit_triggers_nobody(limit: int) -> None:
    spent = msg("Alice!", sender=BOB.mxid, bounce_limit=limit, mention_user_ids=(ALICE.mxid,))
    assert reason(spent) is Reason.BOUNCE_LIMIT_REACHED
    assert reason(spent, room=DIRECT) is Reason.BOUNCE_LIMIT_REACHED
    assert reason(replace(spent, bounce_limit=1)) is Reason.MENTIONED
    # Only a persona that would have answered is stopped by it (that stop is announced).
    assert reason(msg("nobody", sender=BOB.mxid, bounce_limit=limit)) is Reason.NOT_ADDRESSED


def test_next_bounce_limit() -> None:
    assert next_bounce_limit(None, 3) == 3  # reply to a human
    assert next_bounce_limit(3, 3) == 2
    assert next_bounce_limit(1, 3) == 0
    assert next_bounce_limit(0, 3) == 0
    assert next_bounce_limit(-5, 3) == 0
    assert next_bounce_limit(100, 3) == 3  # never longer than our own default
    assert next_bounce_limit(None, -1) == 0


def test_bounce_chain_terminates() -> None:
    """A human, then personas replying to each other, stops after default + 1 persona turns."""
    default, limit, turns = 3, None, 0
    sender = HUMAN
    speakers = [ALICE, BOB]
    while True:
        persona = speakers[turns % 2]
        incoming = msg(f"{persona.displayname}?", sender=sender, bounce_limit=limit)
        if not decide(incoming, persona, GROUP).answer:
            break
        limit = next_bounce_limit(limit, default)
        sender = persona.mxid
        turns += 1
    assert turns == default + 1


# --- from_content ----------------------------------------------------------------------------


def test_from_content_full_event() -> None:
    content = {
        "msgtype": "m.text",
        "body": "> <@x:y> q\n\nAlice?",
        "format": "org.matrix.custom.html",
        "formatted_body": "<mx-reply>q</mx-reply>Alice?",
        "m.mentions": {"user_ids": [ALICE.mxid, 5]},
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": "$root",
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": "$prev"},
        },
        BOUNCE_LIMIT_KEY: 2,
    }
    view = MessageView.from_content("$e", HUMAN, content, reply_to_sender=BOB.mxid)
    assert view.mention_user_ids == (ALICE.mxid,)
    assert view.thread_root == "$root" and view.rel_type == "m.thread"
    assert view.in_reply_to_event_id == "$prev" and view.reply_is_fallback
    assert view.reply_to_sender == BOB.mxid
    assert view.bounce_limit == 2
    assert reason(view, persona=BOB) is Reason.NOT_ADDRESSED  # fallback reply, not real


def test_from_content_edit_and_garbage() -> None:
    edit = MessageView.from_content(
        "$e", HUMAN, {"body": "x", "m.relates_to": {"rel_type": "m.replace", "event_id": "$o"}}
    )
    assert edit.rel_type == "m.replace" and edit.thread_root is None
    junk = MessageView.from_content(
        "$e",
        HUMAN,
        {
            "body": 5,
            "msgtype": None,
            "m.mentions": "x",
            "m.relates_to": [],
            BOUNCE_LIMIT_KEY: True,
            "format": "text/markdown",
            "formatted_body": "<b>x</b>",
        },
        reply_to_sender=ALICE.mxid,
    )
    assert junk.body == "" and junk.mention_user_ids is None and junk.bounce_limit is None
    assert junk.formatted_body is None and junk.reply_to_sender is None
    assert MessageView.from_content("$e", HUMAN, {"m.mentions": {}}).mention_user_ids == ()
    assert MessageView.from_content("$e", HUMAN, None).body == ""  # type: ignore[arg-type]


# --- properties ------------------------------------------------------------------------------

_texts = st.text(max_size=300) | st.sampled_from(
    ["Alice", "> quote\n\nAlice", "https://matrix.to/#/%40hb_alice%3Aexample.org", "@hb_bob:"]
)


@given(body=_texts, html=st.none() | st.text(max_size=200), count=st.integers(0, 50))
def test_decide_never_crashes(body: str, html: str | None, count: int) -> None:
    room = replace(GROUP, joined_member_count=count)
    for persona in (ALICE, BOB, ZOE):
        decision = decide(msg(body, formatted_body=html), persona, room)
        assert isinstance(decision.reason, Reason)


_names = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() != "")
# Names that cannot spell a localpart ("hb_a"), so swapping the names swaps everything.
_swap_names = _names.filter(lambda s: "h" not in unicodedata.normalize("NFKC", s).casefold())
_template = st.lists(
    st.sampled_from(["{a}", "{b}", " ", ", ", "hi", "@", "?", "\n", "> ", "x"]), max_size=8
).map("".join)


@given(
    name_a=_swap_names,
    name_b=_swap_names,
    template=_template,
    sender=st.sampled_from(["human", "a", "b"]),
    mentioned=st.sets(st.sampled_from(["a", "b"])),
    replied=st.none() | st.sampled_from(["a", "b"]),
)
def test_dispatch_is_symmetric_across_personas(
    name_a: str,
    name_b: str,
    template: str,
    sender: str,
    mentioned: set[str],
    replied: str | None,
) -> None:
    """Swapping two personas' mxids everywhere swaps their decisions: no persona is special,
    and a persona's decision depends only on its own identity and the message."""
    ids = {"human": HUMAN, "a": "@hb_a:example.org", "b": "@hb_b:example.org"}
    swap = {"human": "human", "a": "b", "b": "a"}
    text = template.replace("{a}", name_a).replace("{b}", name_b)
    room = replace(GROUP, persona_mxids=frozenset({ids["a"], ids["b"]}))

    def message(flip: bool) -> MessageView:
        who = (lambda k: ids[swap[k]]) if flip else (lambda k: ids[k])
        return msg(
            text,
            sender=who(sender),
            mention_user_ids=tuple(sorted(who(k) for k in mentioned)),
            in_reply_to_event_id="$r" if replied else None,
            reply_to_sender=who(replied) if replied else None,
        )

    a = PersonaView(ids["a"], "hb_a", name_a)
    a_as_b = PersonaView(ids["b"], "hb_b", name_a)
    assert decide(message(False), a, room) == decide(message(True), a_as_b, room)


@given(name_a=_swap_names, name_b=_swap_names)
def test_every_named_persona_answers(name_a: str, name_b: str) -> None:
    a = PersonaView("@hb_a:example.org", "hb_a", name_a)
    b = PersonaView("@hb_b:example.org", "hb_b", name_b)
    for text in (f"{name_a}, {name_b}: hi", f"{name_b} , {name_a}"):
        assert decide(msg(text), a, GROUP).answer
        assert decide(msg(text), b, GROUP).answer


@given(name=_names)
def test_own_display_name_always_addresses_in_group(name: str) -> None:
    persona = PersonaView("@hb_p:example.org", "hb_p", name)
    decision = decide(msg(f"hey {name} !"), persona, GROUP)
    assert decision.answer
