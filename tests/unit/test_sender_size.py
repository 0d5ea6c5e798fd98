"""The last guard before the homeserver: no content over the event size limit."""

from __future__ import annotations

from mautrix.types import MessageType, TextMessageEventContent

from hivebridge.matrix.content import MAX_CONTENT_BYTES, content_bytes
from hivebridge.matrix.sender import fitted


def build_edit(text: str, html: str | None) -> TextMessageEventContent:
    content = TextMessageEventContent(msgtype=MessageType.TEXT, body=text)
    if html:
        content.format = "org.matrix.custom.html"  # type: ignore[assignment]
        content.formatted_body = html
    content.set_edit("$original")  # type: ignore[arg-type]
    return content


def test_small_content_is_untouched() -> None:
    content = fitted(build_edit, "hello", "<b>hello</b>")
    assert content.serialize()["m.new_content"]["formatted_body"] == "<b>hello</b>"


def test_an_oversized_edit_loses_html_then_text_until_it_fits() -> None:
    text = "x" * 20_000
    assert content_bytes(build_edit(text, "<p>" + text + "</p>").serialize()) > 65_536
    content = fitted(build_edit, text, "<p>" + text + "</p>")
    data = content.serialize()
    assert content_bytes(data) <= MAX_CONTENT_BYTES
    assert "formatted_body" not in data["m.new_content"]
    assert data["m.new_content"]["body"] == text  # the text itself still fits
    worst = "\x01" * 20_000  # six bytes each in JSON
    data = fitted(build_edit, worst, None).serialize()
    assert content_bytes(data) <= MAX_CONTENT_BYTES and data["body"].endswith(" …")


def test_content_fitted_for_an_encrypted_room_still_fits_once_encrypted() -> None:
    """Megolm's ciphertext is base64 of the whole plain event: a third bigger."""
    import json

    import olm

    from hivebridge.matrix.sender import encrypted_bytes

    text = "ü😀" * 50_000  # escaped to six and twelve bytes in the JSON that is encrypted
    content = fitted(build_edit, text, None, encrypted_bytes)
    assert len(content.body) > 1000
    plain = {"room_id": "!" + "r" * 40 + ":example.org", "type": "m.room.message",
             "content": content.serialize()}  # fmt: skip
    ciphertext = olm.OutboundGroupSession().encrypt(json.dumps(plain))
    envelope = {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": ciphertext,
                "sender_key": "k" * 43, "session_id": "s" * 43, "device_id": "D" * 12}  # fmt: skip
    assert len(json.dumps(envelope)) <= MAX_CONTENT_BYTES
