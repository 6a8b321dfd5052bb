"""lmforge's own error types. The CLI turns each into one line and exit code 2 (``--debug`` shows the traceback)."""


class LMForgeError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(LMForgeError):
    """A config file, preset or override is invalid."""


class DataError(LMForgeError):
    """Input data is missing, malformed or inconsistent."""


class CheckpointError(LMForgeError):
    """A checkpoint or model folder is missing, corrupt or does not match."""


class ExportError(LMForgeError):
    """A model cannot be converted to or from another format."""


class TrainingError(LMForgeError):
    """Training cannot continue (for example, repeated non-finite steps with no checkpoint to return to)."""
