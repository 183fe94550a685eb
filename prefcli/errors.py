"""The errors prefcli reports as one line: bad input (exit 2) and runtime failures (exit 1)."""


class PrefcliError(Exception):
    """A problem with the user's input: a bad file, option, artifact or name (exit code 2).

    `message` says what is wrong and where (file, line, option); `hint` says what
    to do about it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RuntimeFailure(PrefcliError):
    """Work that started and then failed: training diverged, the disk filled up, a user
    function raised (exit code 1). The workspace keeps no half-written artifact."""

    exit_code = 1
