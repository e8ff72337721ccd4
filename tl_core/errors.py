"""Errors a user can cause. Jobs catch `UserError` once and print it as one line (exit 2)."""


class UserError(Exception):
    """A mistake in the user's input: reported as one line, never as a traceback."""


class ConfigError(UserError):
    """A config value is missing, of the wrong type, or out of range."""


class DataError(UserError):
    """The dataset is missing, empty, or unusable."""


class StorageError(UserError):
    """A storage location, checkpoint or weights file is missing or unreadable."""


class CheckpointError(StorageError):
    """A checkpoint directory is incomplete or fails its checksums."""


class TrainingDiverged(Exception):
    """The loss became non-finite: the run stops with one line naming the epoch (a failed run, exit 1)."""
