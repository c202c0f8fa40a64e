"""citer: Ray-distributed training pipeline for CITER token-level routers."""

__version__ = "0.1.0"


class CiterError(Exception):
    """A user-facing error: the message says what was wrong and where; the CLI exits non-zero."""
