"""``python -m benchmarks``: every scenario, every system; see ``--help``."""

from __future__ import annotations

from benchmarks.run import main

if __name__ == "__main__":
    main()
