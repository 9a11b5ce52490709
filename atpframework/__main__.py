"""``python -m atpframework PLAN.json``: the same as the ``atpf`` command."""

from .cli import main

main()
