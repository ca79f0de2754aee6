"""Turning client latencies and /proc samples into rows, medians and ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.loadgen import PhaseResult

__all__ = ["Measurement", "Summary", "measurement", "percentile", "summarize"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank; 0.0 if empty."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[rank])


@dataclass(frozen=True)
class Measurement:
    """One configuration at one concurrency in one window."""

    calls: int
    window_s: float
    calls_per_s: float
    p50_us: float
    p99_us: float
    server_cpu_us_per_call: float
    server_cpu_share: float  # CPU seconds of the server per wall second of the window
    client_cpu_share: float  # CPU seconds of the clients, helpers and orchestrator per wall second
    client_cpus_busy: float  # busy share of the clients' CPU(s) (NaN when unpinned)
    other_cpu_share: float  # busy CPU of everything else on the machine (not server, not clients)
    peak_rss_mb: float
    errors: int
    first_error: str
    pool_wrapped: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measurement(
    results: Iterable[PhaseResult],
    *,
    window_s: float,
    server_cpu_s: float,
    client_cpu_s: float,
    other_cpu_s: float,
    client_cpus_busy_s: float = float("nan"),
    peak_rss_mb: float,
) -> Measurement:
    """Merge the clients' results of one window with the server's CPU and memory."""
    lat: list[int] = []
    errors = 0
    first_error = ""
    wrapped = False
    for result in results:
        lat.extend(result.latencies_ns)
        errors += result.errors
        first_error = first_error or result.first_error
        wrapped = wrapped or result.pool_wrapped
    lat.sort()
    calls = len(lat)
    return Measurement(
        calls=calls,
        window_s=window_s,
        calls_per_s=calls / window_s,
        p50_us=percentile(lat, 0.50) / 1e3,
        p99_us=percentile(lat, 0.99) / 1e3,
        server_cpu_us_per_call=(server_cpu_s / calls * 1e6) if calls else 0.0,
        server_cpu_share=server_cpu_s / window_s,
        client_cpu_share=client_cpu_s / window_s,
        client_cpus_busy=client_cpus_busy_s / window_s,
        other_cpu_share=max(0.0, other_cpu_s / window_s),
        peak_rss_mb=peak_rss_mb,
        errors=errors,
        first_error=first_error,
        pool_wrapped=wrapped,
    )


@dataclass(frozen=True)
class Summary:
    """Medians over rounds of one configuration at one concurrency."""

    rounds: int
    calls_per_s: float
    calls_per_s_min: float
    calls_per_s_max: float
    p50_us: float
    p99_us: float
    server_cpu_us_per_call: float
    peak_rss_mb: float
    server_cpu_share: float
    client_cpu_share: float
    client_cpus_busy: float
    other_cpu_share: float
    errors: int
    pool_wrapped: bool

    @property
    def spread(self) -> float:
        """(max - min) / median of calls/s over the rounds."""
        if not self.calls_per_s:
            return 0.0
        return (self.calls_per_s_max - self.calls_per_s_min) / self.calls_per_s

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spread"] = self.spread
        return data


def summarize(samples: Sequence[Measurement]) -> Summary:
    """Median of each figure over ``samples`` (one per round); peak RSS is the maximum."""
    rates = [m.calls_per_s for m in samples]
    return Summary(
        rounds=len(samples),
        calls_per_s=statistics.median(rates),
        calls_per_s_min=min(rates),
        calls_per_s_max=max(rates),
        p50_us=statistics.median(m.p50_us for m in samples),
        p99_us=statistics.median(m.p99_us for m in samples),
        server_cpu_us_per_call=statistics.median(m.server_cpu_us_per_call for m in samples),
        peak_rss_mb=max(m.peak_rss_mb for m in samples),
        server_cpu_share=statistics.median(m.server_cpu_share for m in samples),
        client_cpu_share=statistics.median(m.client_cpu_share for m in samples),
        client_cpus_busy=statistics.median(m.client_cpus_busy for m in samples),
        other_cpu_share=statistics.median(m.other_cpu_share for m in samples),
        errors=sum(m.errors for m in samples),
        pool_wrapped=any(m.pool_wrapped for m in samples),
    )
