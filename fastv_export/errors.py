"""User-facing errors: one message naming what is wrong and what to do."""


class FastVError(ValueError):
    """An expected failure caused by bad input; the CLI prints its message in one line and exits 2."""
