"""Errors the service turns into client (4xx) responses."""

from datasets.images import ImageDecodeError

# An upload the service cannot use; ``status`` is the HTTP status to answer with.
InputError = ImageDecodeError


class ModelLoadError(RuntimeError):
    """A registered model could not be found, downloaded or verified. The message says why."""
