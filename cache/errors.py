"""Error types shared by every stage.

`InputError` is raised for anything the user can fix (a bad file, a missing image, a cache that does
not fit the head). Its message must name the file (and row or line where there is one) and what is
wrong; the CLI prints it as one line and exits with status 2.
"""


class InputError(ValueError):
    """Bad user input: the message names the file/row and the problem."""


class CacheMismatchError(InputError):
    """A cache file does not match what the caller (a head, a backbone, a resume) expects."""


class IncompleteCacheError(InputError):
    """A cache file was not finished (an interrupted extraction) or fails validation."""
