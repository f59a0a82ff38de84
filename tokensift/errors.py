"""User-facing errors: each one is a single line that says what went wrong and what to do."""


class TokensiftError(Exception):
    """An error caused by the user's input (bad policy, budget, file, prompt...).

    The CLI prints ``str(error)`` on one line to stderr and exits with status 2.
    """
