"""Errors the service turns into client (4xx) responses."""

from http import HTTPStatus


class InputError(ValueError):
    """An upload the service cannot use. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class ModelLoadError(RuntimeError):
    """A registered model could not be found, downloaded or verified. The message says why."""
