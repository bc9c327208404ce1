"""The one exception type users see.

Every problem a user can fix (a bad file, a bad argument, a missing fold) is raised
as `PipelineError` with a message that names the file and the problem; the CLI
prints it as one line and exits 2. Anything else is a bug and keeps its traceback.
`Terminated` is the other way a command stops early: a SIGTERM (pipeline/stopping.py).
"""


class PipelineError(Exception):
    """A user-facing error: printed as one line by the CLI, never as a traceback.

    The message is kept on one line whatever it quotes: an id or a file name read from a
    damaged file may hold a newline or another control character, which is shown escaped
    ("\\n") rather than breaking the line.
    """

    def __init__(self, message: object = "", *args: object):
        super().__init__(printable(str(message)), *args)


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (`kill`, `docker stop`, a SLURM time limit, torchrun
    stopping its workers). A KeyboardInterrupt, so every path that cleans up after Ctrl-C
    (finally blocks, locks, fold processes, the log's exit line) runs for it too, and no
    `except Exception` swallows it; the CLI exits 143 (128 + SIGTERM) with one line."""

    def __init__(self) -> None:
        super().__init__("terminated (SIGTERM)")


def printable(text: str) -> str:
    """`text` with every non-printable character (line breaks, tabs, controls) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message folded onto one line, for inclusion in a PipelineError."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: a user value echoed in a message (a huge list, a
    long string) never grows the message past one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
