"""The peers' side of the benchmark: run by the peers' own interpreter, not govflow's.

Nothing here imports govflow; only the peers' environment (``benchmarks/.peers/py``).
"""
