"""Errors the service turns into client (4xx) responses."""

from http import HTTPStatus

from datasets.images import ImageDecodeError

# An upload the service cannot use; ``status`` is the HTTP status to answer with.
InputError = ImageDecodeError


# Longer than any model or field name; a client's value is cut to it in messages.
MAX_SHOWN_CHARS = 64


def shown(value: str) -> str:
    """A client's value for a message: quoted, so that the prediction log masks it, and cut.

    Echoed whole, a 20 MB model name made a 20 MB answer.
    """
    return repr(value if len(value) <= MAX_SHOWN_CHARS else value[:MAX_SHOWN_CHARS] + "...")


class ModelLoadError(RuntimeError):
    """A registered model could not be found, downloaded or verified. The message says why.

    ``transient`` marks a failure a later attempt may not repeat (the registry or the artifact
    store unreachable), as opposed to a version that fails its checks and always will.
    ``missing`` marks the registry's answer that the model, version or alias does not exist.
    """

    def __init__(self, message: str, *, transient: bool = False, missing: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.missing = missing


class RequestError(ValueError):
    """A client mistake outside the upload itself (which model, which route, the body's form).

    ``status`` is the HTTP status to answer with (4xx).
    """

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status
