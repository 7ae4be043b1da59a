"""The server's Prometheus metrics (GET /metrics), in a registry of their own so that two apps in one process
(the tests) do not share counters. Names follow Prometheus' conventions: a `serve_` prefix, `_total` counters,
`_seconds` histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "serve_request_latency_seconds",
            "time from request to last byte, by endpoint",
            ["endpoint"],
            buckets=LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "serve_time_to_first_token_seconds",
            "time from request to the first streamed text",
            buckets=LATENCY,
            registry=r,
        )
        self.prompt_tokens = Counter("serve_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("serve_completion_tokens", "tokens generated", registry=r)
        self.rejections = Counter("serve_rejections", "requests refused, by reason", ["reason"], registry=r)
        self.moderation = Counter(
            "serve_moderation_decisions",
            "moderation decisions by direction (input: the "
            "prompt, output: the reply, endpoint: /v1/moderations) and outcome",
            ["direction", "flagged"],
            registry=r,
        )
        self.moderation_categories = Counter(
            "serve_moderation_flags", "flagged categories by direction", ["direction", "category"], registry=r
        )
        self.finished = Counter(
            "serve_choices_finished",
            "choices ended, by finish reason (cancelled: the client went away)",
            ["reason"],
            registry=r,
        )
        self.batch = Histogram(
            "serve_decode_batch_rows",
            "rows decoded together per engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.running = Gauge("serve_running_rows", "rows (choices) being generated now", registry=r)
        self.waiting = Gauge("serve_waiting_requests", "requests waiting for a row", registry=r)
        self.ready = Gauge(
            "serve_model_ready", "1 once the model is loaded (0 again while the engine restarts)", registry=r
        )
        self.engine_restarts = Counter(
            "serve_engine_restarts", "times the generation engine died and was started again", registry=r
        )
