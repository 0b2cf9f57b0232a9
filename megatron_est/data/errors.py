"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad data or configuration. The message is a single line that names the offending file or flag."""

    def __init__(self, message: str) -> None:
        # Keep messages to one line so CLI tools can print them as-is to stderr.
        super().__init__(" ".join(str(message).split()))
