"""Counters of the server, as JSON or Prometheus text (written here: no client library needed).

Per (endpoint, model): requests, errors (4xx and 5xx apart), prompt and completion tokens,
and latency (sum, count and a histogram). Thread-safe: requests finish on worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

#: latency histogram buckets, seconds (Prometheus ``le``)
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Series:
    __slots__ = (
        "buckets",
        "client_errors",
        "completion_tokens",
        "latency_sum",
        "prompt_tokens",
        "requests",
        "server_errors",
    )

    def __init__(self):
        self.requests = self.client_errors = self.server_errors = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.latency_sum = 0.0
        self.buckets = [0] * len(BUCKETS)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.client_errors + self.server_errors,
                "client_errors": self.client_errors, "server_errors": self.server_errors,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_seconds_sum": round(self.latency_sum, 6),
                "latency_seconds_mean": round(self.latency_sum / self.requests, 6) if self.requests else None}


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = defaultdict(_Series)
        self.started = time.time()

    def record(self, endpoint: str, model: str | None, status: int, seconds: float, *,
               prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self._lock:
            s = self._series[(endpoint, model or "")]
            s.requests += 1
            if 400 <= status < 500:
                s.client_errors += 1
            elif status >= 500:
                s.server_errors += 1
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion_tokens
            s.latency_sum += seconds
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    s.buckets[i] += 1

    def snapshot(self) -> dict:
        with self._lock:
            rows = [{"endpoint": e, "model": m or None, **s.as_dict()} for (e, m), s in sorted(self._series.items())]
        totals = {k: sum(r[k] for r in rows) for k in ("requests", "errors", "client_errors", "server_errors",
                                                        "prompt_tokens", "completion_tokens")}
        return {"uptime_seconds": round(time.time() - self.started, 3), "totals": totals, "series": rows}

    def prometheus(self, gauges: list[tuple[str, str, dict, float]] = ()) -> str:
        """The exposition format: counters per endpoint/model, then ``gauges``
        (name, help, labels, value)."""
        with self._lock:
            items = [((e, m), _copy(s)) for (e, m), s in sorted(self._series.items())]
        lines = []

        def family(name, kind, help_text):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        for name, attr, help_text in (
                ("petune_requests_total", "requests", "requests handled"),
                ("petune_errors_total", None, "requests answered with an error status"),
                ("petune_prompt_tokens_total", "prompt_tokens", "prompt tokens read"),
                ("petune_completion_tokens_total", "completion_tokens", "tokens generated")):
            family(name, "counter", help_text)
            for (endpoint, model), s in items:
                if attr is None:
                    for kind, value in (("client", s.client_errors), ("server", s.server_errors)):
                        lines.append(f"{name}{_labels(endpoint=endpoint, model=model, kind=kind)} {value}")
                else:
                    lines.append(f"{name}{_labels(endpoint=endpoint, model=model)} {getattr(s, attr)}")
        family("petune_request_latency_seconds", "histogram", "time from request to the last byte of the answer")
        for (endpoint, model), s in items:
            for bound, count in zip(BUCKETS, s.buckets):
                lines.append(f"petune_request_latency_seconds_bucket{_labels(endpoint=endpoint, model=model, le=str(bound))}"
                             f" {count}")
            lines.append(f"petune_request_latency_seconds_bucket{_labels(endpoint=endpoint, model=model, le='+Inf')}"
                         f" {s.requests}")
            lines.append(f"petune_request_latency_seconds_sum{_labels(endpoint=endpoint, model=model)} {s.latency_sum:.6f}")
            lines.append(f"petune_request_latency_seconds_count{_labels(endpoint=endpoint, model=model)} {s.requests}")
        seen = set()
        for name, help_text, labels, value in gauges:
            if name not in seen:
                family(name, "gauge", help_text)
                seen.add(name)
            lines.append(f"{name}{_labels(**labels)} {value}")
        return "\n".join(lines) + "\n"


def _copy(s: _Series) -> _Series:
    c = _Series()
    for slot in _Series.__slots__:
        value = getattr(s, slot)
        setattr(c, slot, list(value) if isinstance(value, list) else value)
    return c


def _labels(**labels) -> str:
    def escape(value: str) -> str:
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"
