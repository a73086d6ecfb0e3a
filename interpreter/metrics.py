"""Process metrics in the Prometheus text format (0.0.4): counters, a histogram, gauges read on scrape.

Small on purpose: a handful of families with bounded label values (routes are URL rules, not paths;
languages and statuses are closed sets), so the exposition never grows with traffic.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (f'{name}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for name, value in labels)  # fmt: skip
    return "{" + ",".join(escaped) + "}"


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=lambda: defaultdict(float))

    def inc(self, amount: float = 1, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {value:g}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = DURATION_BUCKETS_S
    counts: dict[Labels, list[int]] = field(default_factory=dict)
    sums: dict[Labels, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                yield f"{self.name}_bucket{_labels((*labels, ('le', le)))} {cumulative}"
            yield f"{self.name}_sum{_labels(labels)} {self.sums[labels]:g}"
            yield f"{self.name}_count{_labels(labels)} {cumulative}"


@dataclass
class Gauge:
    name: str
    help: str
    read: Callable[[], dict[Labels, float]]

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in sorted(self.read().items()):
            yield f"{self.name}{_labels(labels)} {value:g}"


@dataclass
class Metrics:
    requests: Counter = field(default_factory=lambda: Counter(
        "interpreter_http_requests_total", "HTTP requests by route and status"))  # fmt: skip
    runs: Counter = field(default_factory=lambda: Counter(
        "interpreter_runs_total", "Runs by language and status"))  # fmt: skip
    run_seconds: Histogram = field(default_factory=lambda: Histogram(
        "interpreter_run_duration_seconds", "Run duration by language"))  # fmt: skip
    store_errors: Counter = field(default_factory=lambda: Counter(
        "interpreter_store_errors_total", "Store calls that failed (answered 503)"))  # fmt: skip
    rate_limited: Counter = field(default_factory=lambda: Counter(
        "interpreter_rate_limited_total", "Requests refused with 429, by reason"))  # fmt: skip
    auth_failures: Counter = field(default_factory=lambda: Counter(
        "interpreter_auth_failures_total", "Failed authentications"))  # fmt: skip
    gauges: list[Gauge] = field(default_factory=list)
    counters: list[Counter] = field(default_factory=list)  # other parts' own (the egress proxy's)

    def render(self) -> str:
        families: list[Counter | Histogram | Gauge] = [
            self.requests, self.runs, self.run_seconds, self.store_errors, self.rate_limited, self.auth_failures,
            *self.counters, *self.gauges,
        ]  # fmt: skip
        return "\n".join(line for family in families for line in family.render()) + "\n"
