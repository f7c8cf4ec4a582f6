"""``python -m fastvar``: the ``fastvar`` command."""
import sys

from fastvar.cli import main

sys.exit(main())
