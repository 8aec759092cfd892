"""``python -m benchmarks``: every scenario, every system; see ``--help``."""

from __future__ import annotations

from benchmarks.cli import main
from govflow.runtime.log import configure_logging

if __name__ == "__main__":
    # The harness's own govflow calls (publishing, reading leases) only speak up to warn.
    configure_logging(json=False, level="warning")
    main()
