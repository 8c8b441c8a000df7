"""The one exception type for user mistakes: the CLI prints it as ``error: ...`` and exits 2."""


class NMTError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched checkpoint)."""
