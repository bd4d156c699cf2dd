"""The project's error types, all derived from `DGAEError` so the CLI can catch them as one and
print one line without a traceback. Imports nothing from the project, so every layer can raise
them (the data modules included: they must not import jax)."""


class DGAEError(Exception):
    """An error the CLI reports as one line: bad input or a run that cannot go on."""


class ConfigError(DGAEError, ValueError):
    """A bad config field, flag or input path, found before the work it would spoil."""


class InceptionWeightsError(ConfigError):
    """The converted FID Inception weights are missing or do not fit the network."""


class LPIPSWeightsError(DGAEError, RuntimeError):
    """The pretrained LPIPS weights are unavailable or do not fit the model."""


class BadImage(DGAEError, ValueError):
    """An image that cannot be read; `path` names it (a file, or a dataset record)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path


class TooManyBadImages(DGAEError, RuntimeError):
    """More of the split is unreadable than `data.max_bad_fraction` allows."""


class CorruptCheckpoint(DGAEError):
    """A saved step that cannot be used: an item unreadable or not matching its checksums."""

    def __init__(self, step: int, item: str, reason: str):
        super().__init__(f"checkpoint {step}: item '{item}' {reason}")
        self.step, self.item, self.reason = step, item, reason


class NonFiniteSteps(DGAEError, FloatingPointError):
    """Too many train steps in a row had a non-finite loss or gradient."""


class CheckpointWriteError(DGAEError, OSError):
    """A checkpoint could not be written (full disk, permissions, storage errors); what it left
    half-written is removed."""
