"""nsa-eval's one error type (a module of its own so the command can name it before Megatron loads)."""


class RunError(ValueError):
    """A run directory, checkpoint or argument that cannot be evaluated; the message names it."""
