"""``python -m nsa_parallel.eval``: the same as the ``nsa-eval`` command."""
import sys

from .cli import main

sys.exit(main())
