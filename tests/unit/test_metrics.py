"""The metric families dashboards rely on, label caps, and the text output."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from hivebridge import metrics
from hivebridge.metrics import OTHER, REGISTRY, LabelLimiter, bounded

#: name -> (type, labels). Changing this is changing a public interface.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "hivebridge_matrix_transactions": ("counter", ("outcome",)),
    "hivebridge_matrix_events": ("counter", ("type",)),
    "hivebridge_matrix_replies_sent": ("counter", ("persona",)),
    "hivebridge_matrix_edits_sent": ("counter", ("persona",)),
    "hivebridge_matrix_send_errors": ("counter", ("kind",)),
    "hivebridge_homeserver_rate_limited": ("counter", ()),
    "hivebridge_replies_failed": ("counter", ("reason",)),
    "hivebridge_encrypted_messages_unanswered": ("counter", ()),
    "hivebridge_encrypted_room_notices": ("counter", ("trigger",)),
    "hivebridge_routing_decisions": ("counter", ("answer", "reason")),
    "hivebridge_routing_pingpong_suppressed": ("counter", ("persona",)),
    "hivebridge_routing_rate_limited": ("counter", ("scope",)),
    "hivebridge_inference_queue_depth": ("gauge", ("model",)),
    "hivebridge_inference_queue_wait_seconds": ("histogram", ("model",)),
    "hivebridge_inference_time_to_first_token_seconds": ("histogram", ("model",)),
    "hivebridge_inference_generation_seconds": ("histogram", ("model",)),
    "hivebridge_inference_completion_tokens": ("counter", ("model",)),
    "hivebridge_inference_prompt_tokens_evaluated": ("counter", ("model",)),
    "hivebridge_inference_prompt_tokens_reused": ("counter", ("model",)),
    "hivebridge_inference_active_sequences": ("gauge", ("model",)),
    "hivebridge_model_load_seconds": ("histogram", ("model",)),
    "hivebridge_model_loaded": ("gauge", ("model",)),
    "hivebridge_model_memory_bytes": ("gauge", ("model",)),
    "hivebridge_model_loads": ("counter", ("model",)),
    "hivebridge_model_unloads": ("counter", ("model",)),
    "hivebridge_model_offloaded_layers": ("gauge", ("model",)),
    "hivebridge_endpoint_errors": ("counter", ("endpoint", "kind")),
    "hivebridge_endpoint_failovers": ("counter", ("endpoint",)),
    "hivebridge_api_requests": ("counter", ("token", "status")),
    "hivebridge_api_tokens": ("counter", ("token", "kind")),
    "hivebridge_endpoint_up": ("gauge", ("endpoint",)),
    "hivebridge_tool_calls": ("counter", ("tool", "outcome")),
    "hivebridge_tool_duration_seconds": ("histogram", ("tool",)),
    "hivebridge_scenes_started": ("counter", ()),
    "hivebridge_scene_turns": ("counter", ("persona",)),
    "hivebridge_scenes_ended": ("counter", ("reason",)),
}


def _families() -> dict[str, str]:
    return {f.name: f.type for f in REGISTRY.collect()}


def test_every_family_exists_with_its_type() -> None:
    families = _families()
    for name, (kind, _labels) in EXPECTED.items():
        assert families.get(name) == kind, name


def test_no_unexpected_families() -> None:
    """A new metric must be added to EXPECTED and to docs/operations.md."""
    assert set(_families()) == set(EXPECTED)


def test_labels_and_help() -> None:
    collectors = {
        c._name: c
        for c in vars(metrics).values()
        if hasattr(c, "_labelnames") and hasattr(c, "_name")
    }
    for name, (_kind, labels) in EXPECTED.items():
        collector = collectors[name]
        assert collector._labelnames == labels, name
        assert len(collector._documentation) > 10, name


def test_names_are_prefixed_and_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for name, (kind, _labels) in EXPECTED.items():
        assert name.startswith("hivebridge_")
        exported = f"{name}_total" if kind == "counter" else name
        assert f"`{exported}`" in doc, exported


def test_limiter_caps_distinct_values() -> None:
    limiter = LabelLimiter(3)
    got = [limiter(f"p{i}") for i in range(10)]
    assert got[:3] == ["p0", "p1", "p2"]
    assert set(got[3:]) == {OTHER}
    assert limiter("p1") == "p1"  # admitted values stay themselves
    assert len(limiter) == 3


def test_limiter_preset_and_empty() -> None:
    limiter = LabelLimiter(0, preset={"local"})
    assert limiter("local") == "local"
    assert limiter("remote") == OTHER
    assert limiter(None) == OTHER  # "none" does not fit a zero cap


def test_limiter_cuts_long_values() -> None:
    limiter = LabelLimiter(5)
    assert len(limiter("x" * 1000)) == metrics.MAX_LABEL_LENGTH


def test_limiter_is_thread_safe() -> None:
    limiter = LabelLimiter(10)
    results: list[str] = []

    def work(n: int) -> None:
        results.extend(limiter(f"v{n}-{i}") for i in range(100))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results) - {OTHER}) == 10


def test_bounded_with_fixed_set() -> None:
    assert bounded("m.room.message", metrics.EVENT_TYPES) == "m.room.message"
    assert bounded("org.example.custom", metrics.EVENT_TYPES) == OTHER
    assert metrics.event_type_label("com.spam") == OTHER


@given(st.lists(st.text(max_size=80), max_size=200))
def test_bounded_never_exceeds_cap(values: list[str]) -> None:
    limiter = LabelLimiter(7)
    assert len({bounded(v, limiter) for v in values} - {OTHER}) <= 7


def test_metric_with_bounded_labels_has_bounded_series() -> None:
    limiter = LabelLimiter(4)
    for i in range(50):
        metrics.ROUTING_PINGPONG_SUPPRESSED.labels(persona=limiter(f"bot{i}")).inc()
    personas = {
        s.labels["persona"]
        for f in REGISTRY.collect()
        if f.name == "hivebridge_routing_pingpong_suppressed"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert {"bot0", "bot1", "bot2", "bot3", OTHER} <= personas
    assert not any(
        p.startswith("bot") and p not in {"bot0", "bot1", "bot2", "bot3"} for p in personas
    )


@pytest.mark.parametrize(
    ("helper", "limiter"),
    [
        ("persona_label", metrics.PERSONA_LABELS),
        ("model_label", metrics.MODEL_LABELS),
        ("endpoint_label", metrics.ENDPOINT_LABELS),
    ],
)
def test_shared_limiters_map_overflow_to_other(helper: str, limiter: LabelLimiter) -> None:
    fn = getattr(metrics, helper)
    saved = set(limiter._seen)
    try:
        out = {fn(f"{helper}-overflow-{i}") for i in range(500)}
    finally:  # other tests in this process use the shared limiters too
        limiter._seen = saved
    assert OTHER in out
    assert len(out) <= limiter.limit + 1


def test_render_parses() -> None:
    model = metrics.model_label("smollm2-135m")
    metrics.MATRIX_EVENTS.labels(type=metrics.event_type_label("m.room.message")).inc()
    metrics.INFERENCE_TIME_TO_FIRST_TOKEN.labels(model=model).observe(0.3)
    metrics.INFERENCE_QUEUE_DEPTH.labels(model=model).set(2)
    metrics.MODEL_MEMORY_BYTES.labels(model=model).set(123_456_789)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    parsed = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(EXPECTED) <= set(parsed)
    ttft = parsed["hivebridge_inference_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    count = [s for s in ttft.samples if s.name.endswith("_count") and s.labels["model"] == model]
    assert count and count[0].value >= 1
    depth = parsed["hivebridge_inference_queue_depth"].samples
    assert any(s.value == 2 and s.labels["model"] == model for s in depth)
