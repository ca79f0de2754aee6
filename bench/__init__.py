"""The benchmark harness behind ``make bench`` (``python -m bench.run``).

It measures, on loopback, the Posts service in every verification mode next to
two references -- the bare thriftpy2 server (the limit) and the tutorial's HTTP
gateway architecture (the peer) -- with the server under test pinned to CPU 0
and the load-generating client processes pinned to CPU 1. See
``docs/benchmarks.md`` for how to run it and how to read the table.
"""

__all__: list[str] = []
