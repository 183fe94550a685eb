"""The one error type a user can cause; the CLI prints it as one line, exit code 2."""


class PrefcliError(Exception):
    """A problem with the user's input: a bad file, option, artifact or name.

    `message` says what is wrong and where (file, line, option); `hint` says what
    to do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
