"""Smoke test of the benchmark machinery: the bare server, one client, under half a second."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from bench.loadgen import ClientPool, Target, TokenSpec
from bench.procs import ServerProcess, all_cpus, stop_all
from bench.run import CONFIGS, Run, measure_phase, table


def test_bare_server_one_client_gives_a_sane_row(tmp_path: Path) -> None:
    started = time.monotonic()
    cpus = sorted(all_cpus())
    server_cpus = {cpus[0]} if len(cpus) > 1 else None
    client_cpus = {cpus[1]} if len(cpus) > 1 else None
    server = ServerProcess(
        "limit", [sys.executable, "-m", "bench.bare"], cpus=server_cpus,
        log_path=tmp_path / "bare.log", ready_prefix="bench-ready", ready_timeout_s=20,
    )
    try:
        server.start()
        port = int(server.ready_line.split("port=")[1].split()[0])
        with ClientPool(1, cpus=client_cpus) as pool:
            m = measure_phase(
                pool, server, Target("thrift", port=port), TokenSpec(fixed="any-token"), 1,
                warmup_s=0.1, window_s=0.4,
            )
    finally:
        stop_all([server])
    assert server.proc is not None and server.proc.returncode == 0  # stopped cleanly

    assert m.errors == 0, m.first_error
    assert m.calls > 10
    assert m.calls_per_s == pytest.approx(m.calls / 0.4)
    assert 0 < m.p50_us <= m.p99_us < 1_000_000
    assert m.server_cpu_us_per_call > 0
    assert 5 < m.peak_rss_mb < 500

    run = Run()
    run.add("pinned", "limit", 1, m)
    text, data = table(run, "pinned", CONFIGS)
    row = next(line for line in text.splitlines() if line.startswith("limit: bare thriftpy2"))
    assert f"{m.calls_per_s:,.0f}" in row
    assert data["limit"]["1"]["calls_per_s"] == m.calls_per_s
    assert time.monotonic() - started < 10
