"""The benchmarks; ``python3 bench/bench_sandbox.py`` (``make bench``) runs them."""
