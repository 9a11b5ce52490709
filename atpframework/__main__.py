"""``python -m atpframework PLAN.json``: the same as the ``atpf`` command."""

from atpframework.cli import main

main()
