"""Every Prometheus metric of the contract (section 5), defined once.

Labels are bounded: directions, reasons, outcomes, routes (templates, not paths), never user ids.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_QUEUE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

WS_CONNECTIONS = Gauge("threadline_ws_connections", "Open WebSocket connections.")
WS_FRAMES = Counter(
    "threadline_ws_frames_total", "WebSocket frames by direction (in|out).", ["direction"]
)
WS_DISCONNECTS = Counter(
    "threadline_ws_disconnects_total",
    "WebSocket disconnects by reason (client, slow_consumer, heartbeat_timeout, rate_limited, "
    "too_large, shutdown, error, token_expired).",
    ["reason"],
)
WS_OUTBOUND_QUEUE_DEPTH = Histogram(
    "threadline_ws_outbound_queue_depth",
    "Frames in a connection's outbound queue, sampled when an op reply is queued and when its "
    "writer task starts (frames the kernel takes at once never queue).",
    buckets=_QUEUE_BUCKETS,
)
THREAD_ACTORS = Gauge("threadline_thread_actors", "Live thread actors.")
ACTOR_RESTARTS = Counter(
    "threadline_actor_restarts_total", "Actor restarts by the supervisor, by actor kind.", ["actor"]
)
HTTP_REQUESTS = Counter(
    "threadline_http_requests_total", "HTTP requests.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "threadline_http_request_duration_seconds",
    "HTTP request duration.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
RATE_LIMITED = Counter(
    "threadline_rate_limited_total", "Requests refused by the rate limiter.", ["transport"]
)
LLM_REQUESTS = Counter(
    "threadline_llm_requests_total",
    "Calls to the LLM provider by outcome (ok, error, retry, timeout, cancelled, circuit_open).",
    ["outcome"],
)
LLM_TOKENS = Counter(
    "threadline_llm_tokens_total", "LLM tokens by kind (prompt|completion).", ["kind"]
)
LLM_COST = Counter("threadline_llm_cost_usd_total", "LLM spend in USD.")
LLM_TTFT = Histogram(
    "threadline_llm_time_to_first_token_seconds",
    "Time from request to the first streamed token.",
    buckets=_LATENCY_BUCKETS,
)
LLM_CIRCUIT_STATE = Gauge(
    "threadline_llm_circuit_state", "LLM circuit breaker: 0 closed, 1 half-open, 2 open."
)
SUMMARIES = Counter(
    "threadline_summaries_total",
    "Summarisation runs by outcome (ok, skipped, failed).",
    ["outcome"],
)
DB_POOL_CONNECTIONS = Gauge(
    "threadline_db_pool_connections",
    "Database pool connections by state (idle|in_use|max).",
    ["state"],
)
DB_EMBEDDED_RESTARTS = Counter(
    "threadline_db_embedded_restarts_total",
    "Times this process started the embedded PostgreSQL again after it died.",
)
EVENT_DELIVERY = Histogram(
    "threadline_event_delivery_seconds",
    "Time from an event's commit to its frame being handed to every subscriber's socket "
    "(written, or queued behind earlier frames); one observation per event.",
    buckets=_LATENCY_BUCKETS,
)
CLUSTER_NODES = Gauge(
    "threadline_cluster_nodes",
    "Live nodes of the cluster as this node last saw them (itself included).",
)
BROKER_MESSAGES = Counter(
    "threadline_broker_messages_total",
    "Messages between nodes through the broker, by direction (in|out).",
    ["direction"],
)
BROKER_LAG = Histogram(
    "threadline_broker_lag_seconds",
    "Time from an event's commit (or an ephemeral event's publication) on any node to its "
    "arrival here through the broker.",
    buckets=_LATENCY_BUCKETS,
)

# Pre-create label sets we always want exported, so dashboards see zeros rather than gaps.
for _d in ("in", "out"):
    WS_FRAMES.labels(direction=_d)
    BROKER_MESSAGES.labels(direction=_d)
# The labelled child the fan-out path counts with (once per event, not once per frame).
WS_FRAMES_OUT = WS_FRAMES.labels(direction="out")
for _t in ("http", "ws"):
    RATE_LIMITED.labels(transport=_t)
for _k in ("prompt", "completion"):
    LLM_TOKENS.labels(kind=_k)
for _o in ("ok", "skipped", "failed", "dropped"):
    SUMMARIES.labels(outcome=_o)
for _s in ("idle", "in_use", "max"):
    DB_POOL_CONNECTIONS.labels(state=_s)
# Counters that alerts and panels take increase()/rate() of: a series that first appears at
# value N hides those N events from increase() (Prometheus sees no rise), so the first burst
# of slow consumers would never alert. Found by the live-Prometheus test (tests/ops).
for _r in (
    "client",
    "slow_consumer",
    "heartbeat_timeout",
    "rate_limited",
    "too_large",
    "shutdown",
    "error",
    "token_expired",
    "token_revoked",
    "protocol_error",
    "invalid_data",
):
    WS_DISCONNECTS.labels(reason=_r)
for _o in ("ok", "error", "retry", "timeout", "cancelled", "circuit_open"):
    LLM_REQUESTS.labels(outcome=_o)
for _o in ("ok", "skipped", "failed", "dropped"):
    SUMMARIES.labels(outcome=_o)
ACTOR_RESTARTS.labels(actor="thread")


def exposition() -> tuple[bytes, str]:
    """The text exposition of the default registry and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
