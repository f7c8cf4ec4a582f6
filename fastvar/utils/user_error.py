"""The error the ``fastvar`` command reports to its user as one line, with exit status 2 (a wrong option, a file
that is not a checkpoint, ...), raised by every subcommand (``fastvar.cli``, ``fastvar.generate``), and the checks
of options those subcommands share."""


class UserError(Exception):
    """A user error: printed as one line, exit status 2."""


def check_seed_option(seed, name: str, meaning: str) -> int:
    """``seed`` (an int from argparse) in ``[0, 2**63)``, the seeds a command line takes (a negative one would
    wrap in ``torch.Generator.manual_seed``), else a :class:`UserError` that ends with ``meaning``: what the seed
    seeds."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise UserError(f"{name} must be an int in [0, 2**63), got {seed!r}: {meaning}")
    return seed
