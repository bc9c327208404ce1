"""The one exception type users see.

Every problem a user can fix (a bad file, a bad argument, a missing fold) is raised
as `PipelineError` with a message that names the file and the problem; the CLI
prints it as one line and exits 2. Anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing error: printed as one line by the CLI, never as a traceback."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message folded onto one line, for inclusion in a PipelineError."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]
