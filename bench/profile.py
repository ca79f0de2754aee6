"""``python -m bench.profile``: where a configuration's server spends its time.

Runs one configuration of ``bench.run`` (default ``hs256-warm``) with its
server under cProfile (every connection thread profiled, the profiles merged),
loads it with 8 pinned clients for a few seconds, stops it, and prints the top
functions by own time and by cumulative time. cProfile slows Python code
several-fold: read the shares, not the absolute times. The raw stats are kept
in ``bench/out/profile-<config>.pstats`` (open with ``python -m pstats``).

``--py-spy PATH`` samples the server with py-spy instead (no slow-down of the
server: the figures are those of the real run; only the thread holding the
GIL is sampled, so waiting in ``recv`` does not show): the top functions by own samples and by
samples anywhere in the stack; the collapsed stacks are kept in
``bench/out/profile-<config>.pyspy.txt``.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import ClientPool, Target
from bench.procs import ServerProcess, all_cpus, stop_all
from bench.run import (
    CONFIGS,
    OUT_DIR,
    READY,
    Env,
    _ensure_auth,
    _ensure_peer_auth,
    _make_keys,
    _ready_fields,
    measure_phase,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("config", nargs="?", default="hs256-warm")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--py-spy", metavar="PATH", help="sample with this py-spy binary")
    args = parser.parse_args(argv)
    config = next((c for c in CONFIGS if c.id == args.config), None)
    # A Posts configuration (bench.posts_sut): local, remote (needs the Auth service) or pyjwt.
    if config is None or config.needs not in ("posts", "auth"):
        raise SystemExit(f"choose a Posts configuration: "
                         f"{', '.join(c.id for c in CONFIGS if c.needs in ('posts', 'auth'))}")
    cpus = sorted(all_cpus())
    server_cpus = {cpus[0]} if len(cpus) > 1 else None
    client_cpus = {cpus[1]} if len(cpus) > 1 else None
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"profile-{config.id}.{'pyspy.txt' if args.py_spy else 'pstats'}"
    env = Env(work=work, logs=OUT_DIR / "logs", server_cpus=server_cpus,
              client_cpus=client_cpus, window_s=args.seconds, warmup_s=0.5)
    try:
        _make_keys(env)
        if config.needs == "auth":
            _ensure_auth(env)
        if config.family == "peer":
            _ensure_peer_auth(env)
        extra = [] if args.py_spy else ["--profile", str(out)]
        server = ServerProcess(
            f"profile-{config.id}", [*config.argv(env), *extra],
            cpus=server_cpus, log_path=env.logs / f"profile-{config.id}.log", ready_prefix=READY,
        ).start()
        port = int(_ready_fields(server.ready_line)["port"])
        with ClientPool(args.clients, cpus=client_cpus) as pool:
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [args.py_spy, "record", "--pid", str(server.pid), "--rate", "250",
                     "--duration", str(int(env.warmup_s + args.seconds + 1)), "--format", "raw",
                     "--nonblocking", "--gil", "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    preexec_fn=(lambda: os.sched_setaffinity(0, client_cpus))
                    if client_cpus else None,
                )
            m = measure_phase(
                pool, server, Target("thrift", port=port),
                config.tokens(env, args.clients, f"profile-{config.id}"), args.clients,
                warmup_s=env.warmup_s, window_s=args.seconds,
            )
            if spy is not None:
                spy.wait(timeout=60)
        server.stop()
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    tool = "py-spy (samples of the thread holding the GIL)" if args.py_spy else "cProfile"
    print(f"{config.label}, {args.clients} clients under {tool}: {m.calls_per_s:,.0f} calls/s, "
          f"{m.server_cpu_us_per_call:.0f} us server CPU per call ({m.calls:,} calls)")
    if args.py_spy:
        _print_collapsed(out, args.top)
        return 0
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buf = io.StringIO()
        stats = pstats.Stats(str(out), stream=buf)
        stats.sort_stats(key).print_stats(args.top)
        text = buf.getvalue()
        body = text[text.index("   ncalls"):] if "   ncalls" in text else text
        print(f"\nTop {args.top} by {title}:\n{body.rstrip()}")
    print(f"\nRaw stats: {out}")
    return 0


def _print_collapsed(path: Path, top: int) -> None:
    """Top functions of py-spy's collapsed stacks by own and by total samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    for title, counter in (("own samples", own), ("samples anywhere in the stack", total)):
        print(f"\nTop {top} by {title} (of {samples:,} samples):")
        for frame, count in counter.most_common(top):
            print(f"  {count / samples:6.1%}  {frame}")
    print(f"\nCollapsed stacks: {path}")


if __name__ == "__main__":
    sys.exit(main())
