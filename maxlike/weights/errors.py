"""The error every checkpoint reader raises (kept apart so the readers and the loader import it, not each other)."""


class WeightsError(ValueError):
    """A checkpoint is missing, truncated, corrupt or of a kind we do not read."""
