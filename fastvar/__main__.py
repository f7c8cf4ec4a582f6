"""``python -m fastvar``: the ``fastvar`` command (also what ``torchrun -m fastvar generate ...`` runs)."""
import sys

from fastvar.cli import main

sys.exit(main())
