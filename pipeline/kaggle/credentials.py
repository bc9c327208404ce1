"""Reaching Kaggle: where the credentials are, and the official `kaggle` CLI run as a subprocess.

Never `import kaggle`: importing it authenticates (and may exit the process) at import time,
and a subprocess lets the tests put a fake `kaggle` first on PATH. Credentials are checked
here first so a missing token is one clear line instead of the CLI's help page, and a damaged
kaggle.json (not JSON, no "username"/"key", unreadable) is one line naming the file instead of
the traceback or help page the kaggle library prints for it.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.errors import PipelineError
from pipeline.kaggle import RULES_URL

NO_CREDENTIALS = (
    "no Kaggle credentials: put kaggle.json in ~/.kaggle/ (chmod 600) or set KAGGLE_USERNAME "
    "and KAGGLE_KEY (or KAGGLE_API_TOKEN)"
)
NO_EXECUTABLE = (
    "the `kaggle` command was not found: install the project (`pip install -e .` in the "
    "repository, or ./run.sh) so the kaggle CLI is on PATH"
)
_HTTP_HINTS = {
    401: "check your Kaggle credentials (kaggle.json / KAGGLE_KEY / KAGGLE_API_TOKEN)",
    403: f"accept the competition rules on the website first: {RULES_URL}",
    404: "check the competition name or the kernel id (user/slug) in kernel-metadata.json",
    429: "rate limited by Kaggle: wait a little and retry",
}
# Lines the kaggle CLI prints after an error that say nothing about the error itself.
_BOILERPLATE = ("If this is unexpected", "traceback. If you think", "If you think this is a bug")
NEW_TOKEN = ("replace it with a new token from https://www.kaggle.com/settings/api, or remove it and set "
             "KAGGLE_API_TOKEN")
_VENV_BIN = Path(sys.executable).parent  # `.venv/bin/python -m pipeline` without an activated venv


def kaggle_config_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the kaggle CLI looks for kaggle.json: $KAGGLE_CONFIG_DIR, else ~/.kaggle when it
    exists, else $XDG_CONFIG_HOME/kaggle (the order of kaggle 2.2's KaggleApi.config_dir)."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"]).expanduser()
    home_dir = Path("~/.kaggle").expanduser()
    if home_dir.exists():
        return home_dir
    xdg = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(xdg) / "kaggle"


def find_credentials(env: Mapping[str, str] = os.environ) -> str | None:
    """A short description of the first Kaggle credential found, or None."""
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config_dir = kaggle_config_dir(env)
    home_dir = Path("~/.kaggle").expanduser()
    # access_token is read from ~/.kaggle by kagglesdk whatever the config dir; credentials.json
    # is what `kaggle auth login` (OAuth) leaves there.
    candidates = [config_dir / "kaggle.json", config_dir / "access_token",
                  home_dir / "access_token", home_dir / "access_token.txt", home_dir / "credentials.json"]
    if os.path.lexists(candidates[0]):  # the file the CLI reads first: a damaged one is named, not skipped
        check_kaggle_json(candidates[0])
        return str(candidates[0])
    for path in candidates[1:]:
        if path.is_file():
            return str(path)
    return None


def check_kaggle_json(path: Path) -> None:
    """PipelineError naming `path` unless it is a JSON object with non-empty string "username" and
    "key": what the kaggle CLI needs of it. It reads the file before anything else and answers a
    damaged one with a traceback (a list, a folder, bytes that are not UTF-8) or its help page (not
    JSON, a field missing), so this runs before the CLI does."""
    from pipeline import fileio  # lazily: the package's top levels stay standard library (see __init__)

    try:
        content = fileio.read_json(path)
    except PipelineError as exc:
        raise PipelineError(f"{exc} — the Kaggle credentials file: {NEW_TOKEN}") from None
    for field in ("username", "key"):
        value = content.get(field)
        if field not in content:
            raise PipelineError(f"{path}: no {field!r} field — {NEW_TOKEN}")
        if not isinstance(value, str) or not value.strip():  # its kind only: the value may be the secret
            kind = "empty" if isinstance(value, str) else f"a JSON {_JSON_KINDS.get(type(value), 'value')}"
            raise PipelineError(f"{path}: {field!r} is {kind}, expected a non-empty string — {NEW_TOKEN}")


_JSON_KINDS = {bool: "true/false", int: "number", float: "number", list: "array", dict: "object", type(None): "null"}


def require_credentials() -> str:
    found = find_credentials()
    if found is None:
        raise PipelineError(NO_CREDENTIALS)
    return found


def kaggle_executable() -> str:
    found = shutil.which("kaggle")
    if found:
        return found
    beside_python = _VENV_BIN / "kaggle"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise PipelineError(NO_EXECUTABLE)


def error_line(output: str) -> str:
    """The line of the kaggle CLI's output that says what went wrong.

    An HTTP status line ("403 Client Error: Forbidden for url: ...") wins; else the last
    non-empty line that is not the CLI's generic "re-run with --debug" boilerplate.
    """
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    for line in lines:
        if re.match(r"^\d{3} (Client|Server) Error\b", line):
            return line
    if any(line.startswith("Authentication required") for line in lines):
        return "Authentication required (the Kaggle API rejected or found no credentials)"
    meaningful = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return meaningful[-1] if meaningful else "(no output)"


def _hint(line: str) -> str:
    match = re.match(r"^(\d{3}) ", line)
    if match and int(match.group(1)) in _HTTP_HINTS:
        return f" — {_HTTP_HINTS[int(match.group(1))]}"
    if line.startswith("Authentication required"):
        return f" — {_HTTP_HINTS[401]}"
    return ""


def run_kaggle(args: Sequence[str], *, echo: bool = True) -> str:
    """Run `kaggle ARGS...` after checking credentials; returns its (merged) output.

    The output is echoed as it arrives (downloads show their progress bar). A non-zero
    exit becomes a one-line PipelineError quoting the line that explains it.
    """
    require_credentials()
    executable = kaggle_executable()
    argv = [executable, *args]
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise PipelineError(f"{executable}: cannot run ({exc.strerror or exc})") from None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks: list[str] = []
    assert process.stdout is not None
    while True:
        # raw chunks, not lines: tqdm redraws its bar with "\r" and never ends the line
        block = os.read(process.stdout.fileno(), 8192)
        if not block:
            break
        text = decoder.decode(block)
        chunks.append(text)
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()
    process.stdout.close()
    returncode = process.wait()
    output = "".join(chunks) + decoder.decode(b"", final=True)
    if returncode != 0:
        line = error_line(output)
        command = " ".join(args[:2])
        raise PipelineError(f"kaggle {command} failed (exit {returncode}): {line[:300]}{_hint(line)}")
    return output
