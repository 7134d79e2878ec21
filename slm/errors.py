"""One error family, so callers can catch slm's own failures and users read a fix, not a trace."""


class SlmError(Exception):
    """A problem the user can fix; the message names the file/field and the fix."""


class ConfigError(SlmError):
    """A config file or override is wrong (unknown key, wrong type, bad value)."""


class VocabError(SlmError):
    """An id or token string is outside the vocabulary, or two vocabularies disagree."""


class CheckpointError(SlmError):
    """A checkpoint is missing, incompatible with the current config, or unreadable."""


class AdapterBaseError(CheckpointError):
    """An adapters-only checkpoint's base differs from the parameters it was trained on."""


class TrainingDivergedError(SlmError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


class TrainingInterrupted(SlmError):
    """A run stopped by SIGTERM short of train.steps; its checkpoint resumes it."""


class ShardingError(SlmError):
    """A mesh or parameter layout does not fit the devices (e.g. too much replication)."""


class AudioError(SlmError):
    """An audio file is missing, truncated, corrupt, silent or in an unsupported format."""


class TaskError(SlmError):
    """A model is asked for a task it was not trained to do (e.g. transcription)."""


class DataError(SlmError):
    """A corpus record is unusable (empty or non-UTF-8 transcript, mismatched alignment, ...)."""


class MissingToolError(SlmError):
    """A system tool or optional package is not installed; the message says how to install it."""
