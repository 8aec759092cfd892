"""govflow's benchmark: govflow and its peers side by side (``python -m benchmarks``).

See benchmarks/README.md for what is measured and how, and for the latest results.
"""
