"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class SwarmspecError(Exception):
    """A mistake in the user's input or environment that the message explains how to fix."""


class ModelNotFoundError(SwarmspecError):
    """A model name that is neither registered, a local checkpoint, a GGUF file, nor loadable from the hub."""


class ModelIntegrityError(SwarmspecError):
    """Model weights whose checksum does not match the registry: corrupted or tampered files."""


class InvalidRequestError(SwarmspecError):
    """Invalid generation parameters or prompt."""
