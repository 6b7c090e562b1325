"""``python -m nsa_parallel.train``: the same as the ``nsa-train`` command."""
import sys

from .cli import main

sys.exit(main())
