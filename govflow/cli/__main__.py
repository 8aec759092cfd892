"""``python -m govflow.cli``: the same program as the ``govflow`` script."""

from govflow.cli import main

main()
