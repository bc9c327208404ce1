"""The one exception type users see.

Every problem a user can fix (a bad file, a bad argument, a missing fold) is raised
as `PipelineError` with a message that names the file and the problem; the CLI
prints it as one line and exits 2. Anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing error: printed as one line by the CLI, never as a traceback."""
