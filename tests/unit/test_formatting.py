"""Markdown to Matrix HTML, think-stripping and message splitting."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivebridge.conversation.formatting import (
    DEFAULT_MAX_BYTES,
    markdown_to_html,
    split_message,
    strip_think,
)


def pieces_of(parts: list[str], max_parts: int) -> st.SearchStrategy[str]:
    """Text made of the given fragments (multi-character ones included)."""
    return st.lists(st.sampled_from(parts), max_size=max_parts).map("".join)


# -- markdown_to_html -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hello world", "two\nlines", "para one\n\npara two", "AT&T is 3 < 4", "", "   "],
)
def test_plain_text_needs_no_html(text: str) -> None:
    assert markdown_to_html(text) is None


def test_emphasis_code_and_tables_render() -> None:
    assert markdown_to_html("hello *world*") == "<p>hello <em>world</em></p>"
    assert markdown_to_html("use `x < y`") == "<p>use <code>x &lt; y</code></p>"
    fenced = markdown_to_html("```python\nif a < b:\n    pass\n```")
    assert fenced == '<pre><code class="language-python">if a &lt; b:\n    pass\n</code></pre>'
    table = markdown_to_html("| a | b |\n|---|---|\n| 1 | 2 |")
    assert table is not None and "<table>" in table and "<td>1</td>" in table
    lists = markdown_to_html("- one\n- two")
    assert lists == "<ul>\n<li>one</li>\n<li>two</li>\n</ul>"
    assert markdown_to_html("# Title") == "<h1>Title</h1>"


def test_line_breaks_are_kept_in_formatted_text() -> None:
    assert markdown_to_html("**a**\nb") == "<p><strong>a</strong><br>\nb</p>"


@pytest.mark.parametrize(
    "text",
    [
        "<script>alert(1)</script>",
        "**bold** <script>alert(1)</script>",
        "<img src=x onerror=alert(1)> *x*",
        '<a href="javascript:alert(1)">click</a> *x*',
        "<div onclick='evil()'>\n\n*hi*\n\n</div>",
        "<iframe src='https://evil'></iframe> _x_",
    ],
)
def test_raw_html_is_escaped_never_passed_through(text: str) -> None:
    out = markdown_to_html(text) or ""
    assert "<script" not in out
    assert "<img" not in out
    assert "<iframe" not in out
    assert "<div" not in out
    assert "onerror" not in out or "&lt;img" in out
    assert not re.search(r"<a [^>]*javascript", out)


def test_script_only_text_is_plain() -> None:
    # Shown literally in the body; no formatted_body needed.
    assert markdown_to_html("<b>not bold</b>") is None


def test_links_keep_only_safe_schemes() -> None:
    assert (
        markdown_to_html("[site](https://example.com)")
        == '<p><a href="https://example.com">site</a></p>'
    )
    assert markdown_to_html("[x](javascript:alert(1))") == "<p><a>x</a></p>"
    assert markdown_to_html("[x](data:text/html;base64,AAAA)") == "<p><a>x</a></p>"
    auto = markdown_to_html("see <https://example.com>")
    assert auto == '<p>see <a href="https://example.com">https://example.com</a></p>'


def test_images_become_links() -> None:
    assert (
        markdown_to_html("![cat](https://example.com/cat.png)")
        == '<p><a href="https://example.com/cat.png">cat</a></p>'
    )
    assert markdown_to_html("![cat](javascript:x)") == "<p><a>cat</a></p>"


def test_escapes_count_as_markup() -> None:
    assert markdown_to_html(r"\*literal\*") == "<p>*literal*</p>"


# -- strip_think ------------------------------------------------------------------------


def test_closed_think_block_is_hidden() -> None:
    assert strip_think("<think>hmm, let me see</think>\n\nThe answer is 4.", False) == (
        "The answer is 4."
    )


def test_unterminated_think_hides_everything_after_it() -> None:
    assert strip_think("<think>still going", False) == ""
    assert strip_think("<think>done</think>Yes. <think>more", False) == "Yes. "


def test_lone_closer_hides_what_came_before() -> None:
    assert strip_think("prompted reasoning\n</think>\nAnswer", False) == "Answer"


def test_think_is_case_insensitive_and_multiline() -> None:
    assert strip_think("<THINK>a\nb\nc</Think>ok", False) == "ok"


def test_text_without_think_is_unchanged() -> None:
    text = "  Just an answer, with <b>tags</b> and 3 < 4.\n"
    assert strip_think(text, False) == text.lstrip()
    assert strip_think(text, True) == text.lstrip()


def test_streaming_holds_back_a_partial_opening_tag() -> None:
    for partial in ["<", "<t", "<th", "<thi", "<thin", "<think"]:
        assert strip_think(partial, False, streaming=True) == ""
        assert strip_think("Hi " + partial, False, streaming=True) == "Hi "
    assert strip_think("a < b", False, streaming=True) == "a < b"
    assert strip_think("Hi <", False) == "Hi <"  # not streaming: nothing held back


def test_show_quotes_reasoning_above_the_answer() -> None:
    assert strip_think("<think>step 1\n\nstep 2</think>Answer", True) == (
        "> step 1\n>\n> step 2\n\nAnswer"
    )
    assert strip_think("<think>partial", True) == "> partial\n\n"


@settings(max_examples=200, deadline=None)
@given(pieces_of(["a", " ", "\n", "<think>", "</think>", "<", "x", "THINK>"], 30))
def test_hidden_reasoning_never_leaks_tags(text: str) -> None:
    out = strip_think(text, False)
    assert "<think>" not in out.lower()
    assert "</think>" not in out.lower()


# -- split_message ----------------------------------------------------------------------


def byte_len(s: str) -> int:
    return len(s.encode("utf-8"))


def test_short_text_is_one_piece() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("") == [""]
    assert DEFAULT_MAX_BYTES <= 65536 // 2


def test_prefers_paragraph_breaks() -> None:
    paras = [f"Paragraph {i}. " + "word " * 10 for i in range(10)]
    text = "\n\n".join(paras)
    pieces = split_message(text, 200)
    assert "".join(pieces) == text
    for piece in pieces[:-1]:
        assert piece.endswith("\n\n")
        assert byte_len(piece) <= 200


def test_falls_back_to_lines_then_sentences_then_words() -> None:
    lines = "\n".join(f"line number {i} is here" for i in range(30))
    pieces = split_message(lines, 100)
    assert all(p.endswith("\n") for p in pieces[:-1])

    sentences = " ".join(f"Sentence {i} ends here." for i in range(30))
    pieces = split_message(sentences, 100)
    assert all(p.endswith(". ") for p in pieces[:-1])

    words = " ".join(f"w{i}" for i in range(100))
    pieces = split_message(words, 64)
    assert all(p.endswith(" ") for p in pieces[:-1])
    assert "".join(pieces) == words


def test_never_cuts_inside_a_utf8_character() -> None:
    text = "ü€😀" * 200  # 2-, 3- and 4-byte characters, no boundaries
    pieces = split_message(text, 101)
    assert "".join(pieces) == text
    for piece in pieces:
        assert byte_len(piece) <= 101
        piece.encode("utf-8").decode("utf-8")  # each piece stands alone


def test_avoids_cutting_inside_a_fence() -> None:
    prose = "Some prose here.\n\n" * 4
    code = "```python\n" + "x = 1\n" * 8 + "```\n"
    text = prose + code + prose
    pieces = split_message(text, 140)
    assert "".join(pieces) == text
    assert any(p.startswith("```python") or p.endswith(code) for p in pieces)
    for p in pieces:
        assert p.count("```") % 2 == 0


def test_long_fence_is_closed_and_reopened() -> None:
    code = "```python\n" + "".join(f"print({i})\n" for i in range(100)) + "```"
    text = "Here:\n\n" + code + "\n\nDone."
    pieces = split_message(text, 200)
    assert len(pieces) > 3
    for p in pieces:
        assert byte_len(p) <= 200
        assert p.count("```") % 2 == 0, p
    for p in pieces[1:-1]:
        assert p.startswith("```python\n")
    # Removing the added fences gives back the original text.
    rejoined = pieces[0]
    for p in pieces[1:]:
        assert rejoined.endswith("```")
        rejoined = rejoined[: -len("```")] + p[len("```python\n") :]
    assert rejoined.replace("```\n\nDone.", "") == text.replace("```\n\nDone.", "")


def test_rejects_tiny_limits() -> None:
    with pytest.raises(ValueError):
        split_message("x", 10)


_FENCY = ["a", "b", " ", "\n", "\n\n", ". ", "é", "€", "😀", "```", "```py\n", "~~~\n", "word"]


@settings(max_examples=300, deadline=None)
@given(pieces_of(_FENCY, 150), st.integers(64, 300))
def test_pieces_fit_and_render_balanced(text: str, max_bytes: int) -> None:
    pieces = split_message(text, max_bytes)
    assert pieces
    for p in pieces:
        assert byte_len(p) <= max_bytes
        assert p or len(pieces) == 1


@settings(max_examples=300, deadline=None)
@given(
    pieces_of(["a", "b", " ", "\n", ". ", "é", "€", "😀", "xyz"], 300),
    st.integers(64, 300),
)
def test_pieces_rejoin_to_the_original_without_fences(text: str, max_bytes: int) -> None:
    pieces = split_message(text, max_bytes)
    assert "".join(pieces) == text
    assert all(byte_len(p) <= max_bytes for p in pieces)
    assert all(p for p in pieces) or pieces == [""]


def test_reply_pieces_are_bounded_in_size_and_number() -> None:
    """Before: a reply was one event of any size; Synapse refused those over 64 KiB."""
    from hivebridge.conversation.formatting import (
        MAX_REPLY_PIECES,
        REPLY_CUT_NOTE,
        REPLY_PIECE_BYTES,
        reply_pieces,
    )

    short = reply_pieces("Hello there.")
    assert short == ["Hello there."]
    para = "A sentence of some length that goes on. " * 20 + "\n\n"
    long = para * 60  # ≈ 50 kB
    pieces = reply_pieces(long)
    assert 1 < len(pieces) <= MAX_REPLY_PIECES
    assert all(len(p.encode()) <= REPLY_PIECE_BYTES for p in pieces)
    assert "".join(pieces) == long
    assert all(p.endswith("\n\n") for p in pieces)  # cut at paragraph breaks
    huge = reply_pieces(para * 1000 + "\x00\x01 control")
    assert len(huge) == MAX_REPLY_PIECES and huge[-1].endswith(REPLY_CUT_NOTE)
    assert all(len(p.encode()) <= REPLY_PIECE_BYTES for p in huge)
    assert "\x00" not in "".join(reply_pieces("a\x00b\x1bc\nd\te"))
    assert reply_pieces("a\x00b\x1bc\nd\te") == ["abc\nd\te"]
