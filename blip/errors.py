"""User-facing errors: one clear line naming the file, structure and problem."""


class BlipError(Exception):
    """Base class for errors the CLI prints as a single line (no traceback)."""


class DataError(BlipError):
    """Bad input data: unreadable/empty file, missing or non-finite labels, unknown element."""

    def __init__(self, path, problem: str, index: int | None = None):
        where = f"{path}" if index is None else f"{path}: structure {index}"
        super().__init__(f"{where}: {problem}")
        self.path, self.index, self.problem = path, index, problem


class ConfigError(BlipError):
    """Invalid configuration (unknown key, bad value, inconsistent settings)."""


class CheckpointError(BlipError):
    """Model file that is corrupt, foreign or incompatible."""
