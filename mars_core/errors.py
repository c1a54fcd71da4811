"""Exception types. Every message names the problem and the fix."""


class MarsError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedArchitectureError(MarsError, ValueError):
    """The model's architecture has no registered family."""


class InputError(MarsError, ValueError):
    """Prompts, images or videos that cannot be used as given."""


class IncompatibleModelError(MarsError, ValueError):
    """A saved artifact (direction, offset) does not fit the model (d_model, layer count)."""


class ArtifactError(MarsError, OSError):
    """A saved file is missing, unreadable or not what it claims to be."""
