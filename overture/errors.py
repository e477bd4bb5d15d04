"""Ways a run ends early on purpose, each with its exit code (overture/cli.py prints the
message as one line; no traceback). Bad input is ``ConfigError`` (exit 2).
"""

from __future__ import annotations

EXIT_NONFINITE = 3


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line, for a cause quoted inside our own one-line
    message (transformers' and PyYAML's messages run to several lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def one_line(err: BaseException) -> str:
    """A whole message as one line (one listing several problems has a line each): what
    the command line prints, so that stderr's last line is the whole error."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


class ConfigError(ValueError):
    """Bad input: a recipe, override, option or file is invalid; the message names the
    key, option, file or line, and what to do (exit code 2)."""


class RunError(Exception):
    """A run stopped for a reason the user must see; ``exit_code`` is the process's."""

    exit_code = 1


class Interrupted(RunError):
    """SIGINT / SIGTERM: the run saved a checkpoint at the step it finished; running the
    same command again continues from there. Exit code 128 + the signal number (130 for
    Ctrl-C, 143 for SIGTERM), as shells report a signalled process."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class NonFiniteLoss(RunError):
    """The loss was NaN or infinite more often than ``train.max_nonfinite_steps`` allows;
    the step that caused it was not applied and no checkpoint was written after it."""

    exit_code = EXIT_NONFINITE


class SaveFailed(RunError):
    """A checkpoint or export could not be written (disk full, permissions); what was
    saved before is intact."""
