"""The project's error types. Imports nothing from the project, so every layer can raise them."""


class ConfigError(ValueError):
    """A bad config field, flag or input path; the CLI prints it as one line, no traceback."""
