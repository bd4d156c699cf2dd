"""The project's error types. Imports nothing from the project, so every layer can raise them."""


class ConfigError(ValueError):
    """A bad config field, flag or input path; the CLI prints it as one line, no traceback."""


class CorruptCheckpoint(Exception):
    """A saved step that cannot be used: an item unreadable or not matching its checksums. The
    CLI prints it as one line."""

    def __init__(self, step: int, item: str, reason: str):
        super().__init__(f"checkpoint {step}: item '{item}' {reason}")
        self.step, self.item, self.reason = step, item, reason


class NonFiniteSteps(FloatingPointError):
    """Too many train steps in a row had a non-finite loss or gradient. The CLI prints it as one
    line."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions, storage errors); what it left
    half-written is removed. The CLI prints it as one line."""
