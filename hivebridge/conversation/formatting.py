"""Turning model output into Matrix message content.

Pure text in, text out: Markdown to the ``org.matrix.custom.html`` subset,
hiding ``<think>`` reasoning, and splitting replies that would not fit in one
Matrix event.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_REPLY_PIECES",
    "REPLY_PIECE_BYTES",
    "markdown_to_html",
    "reply_pieces",
    "split_message",
    "strip_think",
]

# A Matrix event is at most 65536 bytes of JSON. ``formatted_body`` roughly
# doubles the body, and JSON escaping and the envelope add more, so one piece of
# body text stays well under half of it.
DEFAULT_MAX_BYTES = 32_000

# A streamed reply is edited (m.replace): an edit carries its text four times
# (body, formatted_body, and both again in m.new_content), so one message of a
# reply holds at most this much text, and a reply at most this many messages.
REPLY_PIECE_BYTES = 10_000
MAX_REPLY_PIECES = 6
REPLY_CUT_NOTE = "\n\n… (cut: the reply was too long)"

# -- markdown ---------------------------------------------------------------------------

_SAFE_SCHEMES = frozenset({"http", "https", "ftp", "mailto", "magnet", "matrix"})
_PLAIN_TAGS = frozenset({"p", "br"})
_TAG_RE = re.compile(r"<[^>]*>")


def _safe_url(url: str) -> bool:
    scheme = urlsplit(url.strip()).scheme.lower()
    # Relative links mean nothing in chat; only absolute URLs with a known scheme.
    return scheme in _SAFE_SCHEMES


class _SanitizeLinks(Treeprocessor):
    """Drop links with unsafe schemes and turn images into links.

    Matrix clients only show ``mxc://`` images, and an ``<img>`` pointing at the
    web would leak the reader's IP, so a model's image becomes a plain link.
    """

    def run(self, root: ET.Element) -> None:
        for el in root.iter():
            if el.tag == "a":
                href = el.get("href", "")
                for attr in list(el.attrib):
                    if attr not in ("href", "title"):
                        del el.attrib[attr]
                if not _safe_url(href):
                    el.attrib.pop("href", None)
            elif el.tag == "img":
                src = el.get("src", "")
                alt = el.get("alt", "") or src
                el.attrib.clear()
                el.tag = "a"
                el.text = alt
                if _safe_url(src):
                    el.set("href", src)


class _SafeExtension(Extension):
    """Treat raw HTML from the model as text: it gets escaped, never passed through."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(_SanitizeLinks(md), "hivebridge_sanitize", 1)


def _new_markdown() -> markdown.Markdown:
    return markdown.Markdown(
        extensions=["fenced_code", "tables", "sane_lists", "nl2br", _SafeExtension()],
        output_format="html",
    )


def _normalise_ws(text: str) -> str:
    return " ".join(text.split())


def markdown_to_html(text: str) -> str | None:
    """Render ``text`` for ``formatted_body``, or ``None`` when it is plain text.

    Raw HTML in the text is escaped (a model must never inject ``<script>`` or
    spoof markup); links keep only safe absolute schemes. ``None`` means the
    HTML would show the same as the body, so the caller sends a plain message.
    """
    if not text.strip():
        return None
    # A fresh instance per call: Markdown objects keep per-document state.
    rendered = _new_markdown().convert(text).strip()
    tags = {m.group(0).strip("</>").split()[0].lower() for m in _TAG_RE.finditer(rendered)}
    if tags <= _PLAIN_TAGS:
        visible = html.unescape(_TAG_RE.sub(" ", rendered))
        if _normalise_ws(visible) == _normalise_ws(text):
            return None
    return rendered


# -- think ------------------------------------------------------------------------------

_THINK_OPEN = "<think>"
_THINK_BLOCK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN_RE = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"</think>", re.IGNORECASE)
_THINK_TAG_RE = re.compile(r"</?think>", re.IGNORECASE)


def _quote(reasoning: str) -> str:
    lines = reasoning.strip().splitlines()
    if not lines:
        return ""
    return "\n".join("> " + line if line.strip() else ">" for line in lines) + "\n\n"


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of ``tag`` that ``text`` ends with."""
    lowered = text.lower()
    for n in range(len(tag) - 1, 0, -1):
        if lowered.endswith(tag[:n]):
            return n
    return 0


def strip_think(text: str, show: bool, *, streaming: bool = False) -> str:
    """Hide (or, with ``show``, quote) the model's ``<think>…</think>`` reasoning.

    Handles the three shapes models produce:

    * closed blocks ``<think>…</think>`` anywhere in the text;
    * an unterminated ``<think>`` (still streaming): everything after it is
      reasoning until ``</think>`` arrives;
    * a lone ``</think>`` with no opener (templates that put ``<think>`` in the
      prompt): everything before it is reasoning. While streaming that cannot be
      known until the closer arrives, so such text shows until then.

    With ``streaming`` a trailing partial ``<think`` tag is held back, so the
    first edit of a reply is never a stray ``<``. With ``show`` the reasoning is
    kept as a Markdown blockquote above the answer instead of being removed.
    """
    reasoning: list[str] = []

    close = _THINK_CLOSE_RE.search(text)
    first_open = _THINK_OPEN_RE.search(text)
    if close and (first_open is None or first_open.start() > close.start()):
        reasoning.append(text[: close.start()])
        text = text[close.end() :]

    def _take(m: re.Match[str]) -> str:
        reasoning.append(m.group(1))
        return ""

    text = _THINK_BLOCK_RE.sub(_take, text)
    dangling = _THINK_OPEN_RE.search(text)
    if dangling:
        reasoning.append(text[dangling.end() :])
        text = text[: dangling.start()]
    while True:  # stray tags (removing one can join another): never show them
        cleaned = _THINK_TAG_RE.sub("", text)
        if cleaned == text:
            break
        text = cleaned
    if streaming:
        held = _partial_tag_suffix(text, _THINK_OPEN)
        if held:
            text = text[:-held]

    if not show:
        return text.lstrip()
    # One quote block at the top: reasoning precedes the answer in practice.
    return "".join(_quote(r) for r in reasoning) + text.lstrip()


# -- splitting --------------------------------------------------------------------------

_FENCE_RE = re.compile(r"^( {0,3})(`{3,}|~{3,})([^\n]*)$", re.MULTILINE)
_SENTENCE_END = frozenset(".!?…。！？")
_MIN_MAX_BYTES = 64
_MAX_REOPEN_INFO = 40


@dataclass(frozen=True, slots=True)
class _Fence:
    start: int  # index of the opener line's first character
    body_start: int  # index after the opener line's newline
    body_end: int  # index of the closer line's first character, or len(text)
    end: int  # index after the closer line (and its newline), or len(text)
    opener: str  # the opener line, used to reopen a split fence
    marker: str  # the fence characters, used to close it


def _fences(text: str) -> list[_Fence]:
    fences: list[_Fence] = []
    pos = 0
    while True:
        m = _FENCE_RE.search(text, pos)
        if m is None:
            return fences
        marker = m.group(2)
        info = m.group(3)
        if marker[0] == "`" and "`" in info:  # not a fence: backticks in the info string
            pos = m.end() + 1
            continue
        closer = re.compile(
            rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$", re.MULTILINE
        )
        body_start = m.end() + 1
        c = closer.search(text, body_start) if body_start <= len(text) else None
        end = len(text) if c is None else min(len(text), c.end() + 1)
        body_end = len(text) if c is None else c.start()
        opener = m.group(1) + marker + info.strip()[:_MAX_REOPEN_INFO]
        fences.append(_Fence(m.start(), min(body_start, len(text)), body_end, end, opener, marker))
        if c is None:
            return fences
        pos = end


def _utf8_len(ch: str) -> int:
    o = ord(ch)
    return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4


def _fence_at(fences: list[_Fence], p: int) -> _Fence | None:
    """The fence that a cut at ``p`` would fall inside (fences are sorted, disjoint)."""
    i = bisect_left(fences, p, key=lambda f: f.start) - 1
    if i >= 0 and p < fences[i].end:
        return fences[i]
    return None


def _candidates(text: str, window: int) -> list[list[int]]:
    """Cut positions (cut before index p) inside ``text[:window]``, by preference."""
    para: list[int] = []
    line: list[int] = []
    sentence: list[int] = []
    word: list[int] = []
    for p in range(1, window + 1):
        prev = text[p - 1]
        if prev == "\n":
            (para if p >= 2 and text[p - 2] == "\n" else line).append(p)
        elif prev.isspace():
            if p >= 2 and text[p - 2] in _SENTENCE_END:
                sentence.append(p)
            else:
                word.append(p)
        elif prev in "。！？":  # CJK sentence ends carry no space
            sentence.append(p)
    return [para, line, sentence, word]


def _cut(text: str, max_bytes: int) -> tuple[str, str]:
    """One piece of at most ``max_bytes`` bytes and the rest (fences rebalanced)."""
    offsets = [0]  # offsets[i] = UTF-8 bytes in text[:i]
    for ch in text:
        nxt = offsets[-1] + _utf8_len(ch)
        if nxt > max_bytes:
            break
        offsets.append(nxt)
    window = len(offsets) - 1
    fences = _fences(text)

    def closing(p: int) -> str | None:
        """Text to append if cutting at p (``""`` outside fences; None: no room)."""
        f = _fence_at(fences, p)
        if f is None:
            return ""
        if len(f.opener) + len(f.marker) + 2 > max_bytes // 4:
            return ""  # an absurd fence: cut plainly rather than loop
        if p <= f.body_start or p >= f.body_end:
            return None  # in the opener or closer line, or before any code: no progress
        suffix = f.marker if text[p - 1] == "\n" else "\n" + f.marker
        return suffix if offsets[p] + len(suffix.encode()) <= max_bytes else None

    levels = _candidates(text, window)
    min_fill = window // 2

    def preferred() -> Iterator[list[int]]:  # lazily: most cuts stop at the first level
        for level in levels:
            yield [p for p in level if p >= min_fill and _fence_at(fences, p) is None]
        yield [p for p in levels[0] + levels[1] if p >= min_fill and closing(p)]
        for level in levels:
            yield [p for p in level if closing(p) is not None]

    for level in preferred():
        if level:
            p = max(level)
            break
    else:  # no boundary at all: a hard cut at a character boundary
        p = window
        while p > 1 and closing(p) is None:
            p -= 1
    suffix = closing(p) or ""
    piece, rest = text[:p], text[p:]
    if suffix:
        f = _fence_at(fences, p)
        assert f is not None
        return piece + suffix, f.opener + "\n" + rest
    return piece, rest


def split_message(text: str, max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """Split ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes each.

    Cuts prefer, in order: a paragraph break, a line break, a sentence end, a
    space — outside fenced code and not before half the piece is filled — then a
    line inside a fence, then any boundary, then a hard cut between characters
    (never inside a UTF-8 sequence). A fence that must be cut is closed at the
    end of one piece and reopened (same opener line) at the start of the next,
    so each piece renders on its own. Otherwise ``"".join(pieces) == text``:
    separators stay at the end of the piece they follow.
    """
    if max_bytes < _MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be at least {_MIN_MAX_BYTES}")
    pieces: list[str] = []
    rest = text
    while len(rest.encode("utf-8", "surrogatepass")) > max_bytes:
        piece, rest = _cut(rest, max_bytes)
        pieces.append(piece)
    if rest or not pieces:
        pieces.append(rest)
    return pieces


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def reply_pieces(
    text: str, piece_bytes: int = REPLY_PIECE_BYTES, max_pieces: int = MAX_REPLY_PIECES
) -> list[str]:
    """A reply as the messages that show it: split at sensible boundaries, at most
    ``max_pieces``; a longer reply is cut (and says so) at the end of the last one.

    Control characters go (they show as nothing and grow sixfold in JSON).
    Pieces only ever grow at the end as more text streams in: the cut of a
    piece depends on nothing after its own first ``piece_bytes`` bytes.
    """
    pieces = split_message(_CONTROL_RE.sub("", text), piece_bytes)
    if len(pieces) <= max_pieces:
        return pieces
    room = piece_bytes - len(REPLY_CUT_NOTE.encode())
    last = split_message(pieces[max_pieces - 1], room)[0].rstrip()
    return [*pieces[: max_pieces - 1], last + REPLY_CUT_NOTE]
