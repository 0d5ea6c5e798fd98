"""Every Prometheus metric of hivebridge, in one place.

Metrics live in a dedicated :data:`REGISTRY` (not prometheus-client's global one)
so tests can read exactly what the bridge exports and nothing that a library
registered. Names are a public interface — dashboards and alerts depend on
them — so keep them stable and documented in docs/operations.md.

Label values that come from users (persona names, model names, endpoint names)
are unbounded, and every distinct value is a new time series held forever. Pass
them through :func:`persona_label`, :func:`model_label` or :func:`endpoint_label`
(or :func:`bounded` with a fixed set): past a cap they collapse into ``"other"``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class GenerationFigures(Protocol):
    """What :func:`observe_generation` reads of a finished generation's stats."""

    queue_wait_s: float | None
    ttft_s: float | None
    total_s: float
    completion_tokens: int
    evaluated_tokens: int
    cached_tokens: int


__all__ = [
    "OTHER",
    "REGISTRY",
    "LabelLimiter",
    "bounded",
    "count_endpoint_error",
    "count_failover",
    "endpoint_label",
    "event_type_label",
    "model_label",
    "observe_generation",
    "persona_label",
    "reason_label",
    "render",
    "watch_endpoints",
    "watch_engines",
]

log = logging.getLogger("hivebridge.metrics")

#: The label value that every value beyond a cap is mapped to.
OTHER = "other"
#: Longer label values are cut; a label is an identifier, not a message.
MAX_LABEL_LENGTH = 64


class LabelLimiter:
    """Admits the first ``limit`` distinct values of a label; later ones become ``"other"``.

    First come, first served, so the series that exist never change their
    meaning; ``preset`` values are always admitted and do not count to the cap.
    Thread-safe because the llama.cpp worker threads record metrics too.
    """

    def __init__(self, limit: int, preset: Iterable[str] = ()) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._preset = frozenset(preset)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = _clean(value)
        if text == OTHER or text in self._preset:
            return text
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) < self.limit:
                self._seen.add(text)
                return text
        return OTHER

    def __contains__(self, value: object) -> bool:
        text = _clean(value)
        return text in self._preset or text in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def reset(self) -> None:
        """Forget admitted values (tests only: existing series keep their labels)."""
        with self._lock:
            self._seen.clear()


def _clean(value: object) -> str:
    text = "" if value is None else str(value)
    return text[:MAX_LABEL_LENGTH] or "none"


def bounded(value: object, allowed: Collection[str] | LabelLimiter) -> str:
    """``value`` if it is allowed (a fixed set, or a limiter with room left), else ``"other"``."""
    if isinstance(allowed, LabelLimiter):
        return allowed(value)
    text = _clean(value)
    return text if text in allowed else OTHER


# Label limiters ---------------------------------------------------------------

#: Personas with their own series; a big hive lumps the rest into "other".
PERSONA_LABELS = LabelLimiter(50)
#: Models (local GGUF files and remote model names).
MODEL_LABELS = LabelLimiter(20)
#: Remote OpenAI-compatible endpoints (their configured names, never URLs with keys).
ENDPOINT_LABELS = LabelLimiter(20)
#: Routing reasons: a small enum in code, capped in case a bug passes free text.
REASON_LABELS = LabelLimiter(32)

#: Event types with their own series; anything else a homeserver sends is "other".
EVENT_TYPES: frozenset[str] = frozenset(
    {
        "m.room.message",
        "m.room.member",
        "m.room.redaction",
        "m.reaction",
        "m.room.encrypted",
        "m.room.create",
        "m.room.name",
        "m.room.topic",
        "m.room.power_levels",
        "m.typing",
        "m.receipt",
        "m.presence",
    }
)
#: Why a send to the homeserver failed.
SEND_ERROR_KINDS: frozenset[str] = frozenset(
    {"rate_limited", "forbidden", "not_found", "http", "network", "timeout"}
)
#: Why a remote endpoint call failed.
ENDPOINT_ERROR_KINDS: frozenset[str] = frozenset(
    {"timeout", "connect", "http_4xx", "http_5xx", "rate_limited", "auth", "bad_response"}
)
#: Which limit refused a request.
RATE_LIMIT_SCOPES: frozenset[str] = frozenset(
    {"user", "room", "persona", "daily_budget", "turn_cap", "global"}
)
#: What became of a transaction the homeserver pushed.
TRANSACTION_OUTCOMES: frozenset[str] = frozenset({"new", "duplicate", "rejected"})
#: Why a persona's reply ended in an error notice: the backend failed, or said nothing.
REPLY_FAILURE_REASONS: frozenset[str] = frozenset({"inference_error", "empty"})
#: What made a persona (or the bot) say it cannot read an encrypted room (encryption
#: off: a message or a join), or a message in one (encryption on: its key never came).
ENCRYPTED_NOTICE_TRIGGERS: frozenset[str] = frozenset({"message", "join", "unreadable"})


def persona_label(name: object) -> str:
    return PERSONA_LABELS(name)


def model_label(name: object) -> str:
    return MODEL_LABELS(name)


def endpoint_label(name: object) -> str:
    return ENDPOINT_LABELS(name)


def reason_label(reason: object) -> str:
    return REASON_LABELS(reason)


def event_type_label(event_type: object) -> str:
    return bounded(event_type, EVENT_TYPES)


# The registry -----------------------------------------------------------------

REGISTRY = CollectorRegistry(auto_describe=True)

#: What a source of engine load reports: model name -> (requests waiting, sequences active).
EngineLoads = Callable[[], Mapping[str, tuple[int, int]]]


class _EngineGauges(Collector):
    """Sets queue depth and active sequences from the watched engines at every collection.

    The engines know these numbers (``LocalEngine.load``, lock-free) and must not
    import this module; reading them when Prometheus scrapes costs nothing between
    scrapes and is never stale. Registered before the gauges it sets, so the
    registry collects fresh values in the same scrape. Exports no family itself.
    """

    def __init__(self) -> None:
        self._sources: dict[int, EngineLoads] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._shown: set[str] = set()

    def watch(self, source: EngineLoads) -> Callable[[], None]:
        key = next(self._ids)
        with self._lock:
            self._sources[key] = source

        def unwatch() -> None:
            with self._lock:
                self._sources.pop(key, None)

        return unwatch

    def refresh(self) -> None:
        with self._lock:
            sources = list(self._sources.values())
            totals: dict[str, list[int]] = {}
            for source in sources:
                try:
                    loads = dict(source())
                except Exception as e:  # a scrape must answer even if an engine cannot
                    log.debug("engine load unavailable: %s", type(e).__name__)
                    continue
                for model, (waiting, active) in loads.items():
                    total = totals.setdefault(model_label(model), [0, 0])
                    total[0] += waiting
                    total[1] += active
            for label in self._shown - totals.keys():  # stopped since: nothing queued
                totals[label] = [0, 0]
            for label, (waiting, active) in totals.items():
                INFERENCE_QUEUE_DEPTH.labels(label).set(waiting)
                INFERENCE_ACTIVE_SEQUENCES.labels(label).set(active)
            self._shown = set(totals)

    def collect(self) -> Iterable[Metric]:
        self.refresh()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


_ENGINE_GAUGES = _EngineGauges()
REGISTRY.register(_ENGINE_GAUGES)


def watch_engines(source: EngineLoads) -> Callable[[], None]:
    """Feed queue depth and active sequences from ``source`` at each scrape; returns the undo.

    ``source`` is called on the scraping thread and must be cheap and non-blocking.
    """
    return _ENGINE_GAUGES.watch(source)


#: Seconds, for latencies users feel (queueing, first token, whole generations).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
#: Seconds, for loading a model from disk (small GGUF: under a second; 70B: minutes).
_LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Matrix side ------------------------------------------------------------------

MATRIX_TRANSACTIONS = Counter(
    "hivebridge_matrix_transactions",
    "Appservice transactions pushed by the homeserver (duplicates counted as such).",
    ["outcome"],  # new | duplicate | rejected
    registry=REGISTRY,
)
MATRIX_EVENTS = Counter(
    "hivebridge_matrix_events",
    "Events received in appservice transactions, by event type.",
    ["type"],
    registry=REGISTRY,
)
MATRIX_REPLIES_SENT = Counter(
    "hivebridge_matrix_replies_sent",
    "Persona replies sent to Matrix (first message of each answer).",
    ["persona"],
    registry=REGISTRY,
)
MATRIX_EDITS_SENT = Counter(
    "hivebridge_matrix_edits_sent",
    "m.replace edits sent while streaming or finishing a reply.",
    ["persona"],
    registry=REGISTRY,
)
MATRIX_SEND_ERRORS = Counter(
    "hivebridge_matrix_send_errors",
    "Failed sends to the homeserver, by kind of failure.",
    ["kind"],
    registry=REGISTRY,
)
HOMESERVER_RATE_LIMITED = Counter(
    "hivebridge_homeserver_rate_limited",
    "HTTP 429 (M_LIMIT_EXCEEDED) answers from the homeserver.",
    registry=REGISTRY,
)
REPLIES_FAILED = Counter(
    "hivebridge_replies_failed",
    "Persona replies that ended in an error notice instead of an answer, by reason.",
    ["reason"],  # inference_error | empty
    registry=REGISTRY,
)

ENCRYPTED_UNANSWERED = Counter(
    "hivebridge_encrypted_messages_unanswered",
    "Encrypted messages addressed to a persona (or in a DM with one) that it could not read.",
    registry=REGISTRY,
)
ENCRYPTED_NOTICES = Counter(
    "hivebridge_encrypted_room_notices",
    "Notices saying a persona or the bot cannot read an encrypted room (once per room each), "
    "or a message in one whose key never came (once per sender session).",
    ["trigger"],  # message | join | unreadable
    registry=REGISTRY,
)

# Routing ----------------------------------------------------------------------

ROUTING_DECISIONS = Counter(
    "hivebridge_routing_decisions",
    "Per-persona dispatch decisions on incoming messages, by answer and reason.",
    ["answer", "reason"],  # answer: yes | no
    registry=REGISTRY,
)
ROUTING_PINGPONG_SUPPRESSED = Counter(
    "hivebridge_routing_pingpong_suppressed",
    "Persona turns suppressed because bots were answering each other in a loop.",
    ["persona"],
    registry=REGISTRY,
)
ROUTING_RATE_LIMITED = Counter(
    "hivebridge_routing_rate_limited",
    "Requests refused by the bridge's own rate limits or budgets, by scope.",
    ["scope"],
    registry=REGISTRY,
)

# Scenes -----------------------------------------------------------------------

#: How a scene ended: its turns spent, nobody able to speak, a !scene stop by the
#: person who started it or by someone else, the room stopped (!stop).
SCENE_END_REASONS: frozenset[str] = frozenset(
    {"turns", "nobody", "stopped_by_starter", "stopped_by_other", "room_stopped"}
)
SCENES_STARTED = Counter(
    "hivebridge_scenes_started",
    "Scenes started with !scene start.",
    registry=REGISTRY,
)
SCENE_TURNS = Counter(
    "hivebridge_scene_turns",
    "Scene turns taken, per persona (a skipped persona takes none).",
    ["persona"],
    registry=REGISTRY,
)
SCENES_ENDED = Counter(
    "hivebridge_scenes_ended",
    "Scenes ended, by reason (turns, nobody, stopped_by_starter, stopped_by_other, room_stopped).",
    ["reason"],
    registry=REGISTRY,
)

# Inference --------------------------------------------------------------------

INFERENCE_QUEUE_DEPTH = Gauge(
    "hivebridge_inference_queue_depth",
    "Generation requests waiting for a slot in the local engine, per model.",
    ["model"],
    registry=REGISTRY,
)
INFERENCE_QUEUE_WAIT = Histogram(
    "hivebridge_inference_queue_wait_seconds",
    "Time a request waited in the queue before its generation started.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_TIME_TO_FIRST_TOKEN = Histogram(
    "hivebridge_inference_time_to_first_token_seconds",
    "From the start of a generation (after queueing) to its first token.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_GENERATION_DURATION = Histogram(
    "hivebridge_inference_generation_seconds",
    "Wall time of whole generations (first to last token included).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_COMPLETION_TOKENS = Counter(
    "hivebridge_inference_completion_tokens",
    "Tokens generated; rate() of it over generation time gives tokens per second.",
    ["model"],
    registry=REGISTRY,
)
INFERENCE_PROMPT_TOKENS_EVALUATED = Counter(
    "hivebridge_inference_prompt_tokens_evaluated",
    "Prompt tokens the engine had to evaluate (not found in the KV cache).",
    ["model"],
    registry=REGISTRY,
)
INFERENCE_PROMPT_TOKENS_REUSED = Counter(
    "hivebridge_inference_prompt_tokens_reused",
    "Prompt tokens served from a cached KV prefix instead of being evaluated.",
    ["model"],
    registry=REGISTRY,
)
INFERENCE_ACTIVE_SEQUENCES = Gauge(
    "hivebridge_inference_active_sequences",
    "Sequences the local engine is working on: admitted requests, prefilling or generating.",
    ["model"],
    registry=REGISTRY,
)
MODEL_LOAD_DURATION = Histogram(
    "hivebridge_model_load_seconds",
    "Time to load a model into memory.",
    ["model"],
    buckets=_LOAD_BUCKETS,
    registry=REGISTRY,
)
MODEL_LOADED = Gauge(
    "hivebridge_model_loaded",
    "1 while a model is loaded and ready, 0 otherwise.",
    ["model"],
    registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "hivebridge_model_loads",
    "Local models loaded (at start, on first use, or with !load / the admin API).",
    ["model"],
    registry=REGISTRY,
)
MODEL_UNLOADS = Counter(
    "hivebridge_model_unloads",
    "Local models unloaded (!unload, the admin API, the memory budget, a changed file).",
    ["model"],
    registry=REGISTRY,
)
MODEL_OFFLOADED_LAYERS = Gauge(
    "hivebridge_model_offloaded_layers",
    "Layers of a loaded model on a GPU (0 on a CPU-only build).",
    ["model"],
    registry=REGISTRY,
)
MODEL_MEMORY_BYTES = Gauge(
    "hivebridge_model_memory_bytes",
    "Memory held by a loaded model: weights plus KV cache and compute buffers.",
    ["model"],
    registry=REGISTRY,
)
ENDPOINT_ERRORS = Counter(
    "hivebridge_endpoint_errors",
    "Failed calls to a remote OpenAI-compatible endpoint, by kind.",
    ["endpoint", "kind"],
    registry=REGISTRY,
)
ENDPOINT_FAILOVERS = Counter(
    "hivebridge_endpoint_failovers",
    "Requests moved off an endpoint to the next one in line (label: the one left).",
    ["endpoint"],
    registry=REGISTRY,
)

#: What a source of endpoint health reports: endpoint name -> up.
EndpointHealth = Callable[[], Mapping[str, bool]]


class _EndpointGauge(Collector):
    """Sets ``hivebridge_endpoint_up`` from the endpoint pool at every collection, so
    the metric says what ``!endpoints`` and the admin API say at that moment."""

    def __init__(self) -> None:
        self._source: EndpointHealth | None = None
        self._shown: set[str] = set()
        self._lock = threading.Lock()

    def watch(self, source: EndpointHealth) -> Callable[[], None]:
        with self._lock:
            self._source = source

        def unwatch() -> None:
            with self._lock:
                if self._source is source:
                    self._source = None

        return unwatch

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                health = dict(self._source()) if self._source is not None else {}
            except Exception as e:  # a scrape must answer
                log.debug("endpoint health unavailable: %s", type(e).__name__)
                health = {}
            labels = {endpoint_label(name): up for name, up in health.items()}
            for label in self._shown - labels.keys():  # removed since
                ENDPOINT_UP.remove(label)
            for label, up in labels.items():
                ENDPOINT_UP.labels(label).set(1 if up else 0)
            self._shown = set(labels)
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


_ENDPOINT_GAUGE = _EndpointGauge()
REGISTRY.register(_ENDPOINT_GAUGE)

ENDPOINT_UP = Gauge(
    "hivebridge_endpoint_up",
    "1 while a remote endpoint is up, 0 while it is down (a request or a probe failed "
    "on it) or being probed; the same status as !endpoints and the admin API.",
    ["endpoint"],
    registry=REGISTRY,
)


def watch_endpoints(source: EndpointHealth) -> Callable[[], None]:
    """Feed ``hivebridge_endpoint_up`` from ``source`` at each scrape; returns the undo."""
    return _ENDPOINT_GAUGE.watch(source)


# Tools ------------------------------------------------------------------------

#: What became of a tool call (personas/tools/runner.py).
TOOL_OUTCOMES: frozenset[str] = frozenset(
    {"ok", "error", "timeout", "invalid", "unknown", "denied"}
)
TOOL_CALLS = Counter(
    "hivebridge_tool_calls",
    "Tool calls made by personas, by tool and outcome (ok, error, timeout, invalid, "
    "unknown, denied).",
    ["tool", "outcome"],
    registry=REGISTRY,
)
TOOL_DURATION = Histogram(
    "hivebridge_tool_duration_seconds",
    "Wall time of tool calls (approval waits included), per tool.",
    ["tool"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)


def _create_known_series() -> None:
    """Create every series of a fixed label set at 0, before anything happens.

    A labelled series exists only from its first use, and Prometheus does not
    count a series' first appearance as an increase: the first rejected
    transaction or failed send would be invisible to rate() and to the alerts,
    and the dashboard would show "No data" where the truth is 0.
    """
    for outcome in TRANSACTION_OUTCOMES:
        MATRIX_TRANSACTIONS.labels(outcome)
    for kind in SEND_ERROR_KINDS:
        MATRIX_SEND_ERRORS.labels(kind)
    for scope in RATE_LIMIT_SCOPES:
        ROUTING_RATE_LIMITED.labels(scope)
    for reason in REPLY_FAILURE_REASONS:
        REPLIES_FAILED.labels(reason)
    for trigger in ENCRYPTED_NOTICE_TRIGGERS:
        ENCRYPTED_NOTICES.labels(trigger)
    for reason in SCENE_END_REASONS:
        SCENES_ENDED.labels(reason)


_create_known_series()


def render() -> tuple[bytes, str]:
    """The registry in Prometheus text format, and the Content-Type to serve it with."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


API_REQUESTS = Counter(
    "hivebridge_api_requests",
    "Requests to the OpenAI-compatible API, by token name and HTTP status (499: client left).",
    ["token", "status"],
    registry=REGISTRY,
)
API_TOKENS = Counter(
    "hivebridge_api_tokens",
    "Tokens used through the OpenAI-compatible API, by token name (kind: prompt, completion).",
    ["token", "kind"],
    registry=REGISTRY,
)
API_TOKEN_LABELS = LabelLimiter(20)
API_STATUSES = frozenset({"200", "400", "401", "404", "429", "499", "500", "503"})


def count_api_request(token: str, status: int) -> None:
    """One API request ended with ``status``; ``token`` is the configured token's name."""
    API_REQUESTS.labels(API_TOKEN_LABELS(token), bounded(str(status), API_STATUSES)).inc()


def count_api_tokens(token: str, prompt: int, completion: int) -> None:
    label = API_TOKEN_LABELS(token)
    API_TOKENS.labels(label, "prompt").inc(prompt)
    API_TOKENS.labels(label, "completion").inc(completion)


def count_endpoint_error(endpoint: str, kind: str) -> None:
    """One failed call to a remote endpoint, labelled by its name (never its URL or key)."""
    ENDPOINT_ERRORS.labels(endpoint_label(endpoint), bounded(kind, ENDPOINT_ERROR_KINDS)).inc()


def count_failover(endpoint: str) -> None:
    """A request moved off ``endpoint`` to the next one in line."""
    ENDPOINT_FAILOVERS.labels(endpoint_label(endpoint)).inc()


def observe_generation(stats: GenerationFigures, model: str) -> None:
    """Record one finished generation (replies and ``!ask`` call this once each).

    Done where a request finishes rather than in every backend, so local, remote
    and routed generations are counted once, under the catalogue's model name.
    Prompt tokens are split only when the backend reported the split: a backend
    that says nothing about its cache would otherwise skew the reuse ratio. Queue
    wait likewise comes only from a backend with a queue (the local engine).
    """
    label = model_label(model)
    if stats.queue_wait_s is not None:
        INFERENCE_QUEUE_WAIT.labels(label).observe(max(0.0, stats.queue_wait_s))
    if stats.ttft_s is not None:
        INFERENCE_TIME_TO_FIRST_TOKEN.labels(label).observe(stats.ttft_s)
    if stats.total_s > 0:
        INFERENCE_GENERATION_DURATION.labels(label).observe(stats.total_s)
    if stats.completion_tokens > 0:
        INFERENCE_COMPLETION_TOKENS.labels(label).inc(stats.completion_tokens)
    if stats.evaluated_tokens > 0 or stats.cached_tokens > 0:
        INFERENCE_PROMPT_TOKENS_EVALUATED.labels(label).inc(max(0, stats.evaluated_tokens))
        INFERENCE_PROMPT_TOKENS_REUSED.labels(label).inc(max(0, stats.cached_tokens))
