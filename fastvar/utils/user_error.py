"""The error the ``fastvar`` command reports to its user as one line, with exit status 2 (a wrong option, a file
that is not a checkpoint, ...), raised by every subcommand (``fastvar.cli``, ``fastvar.generate``)."""


class UserError(Exception):
    """A user error: printed as one line, exit status 2."""
