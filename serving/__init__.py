"""Serving: registered ONNX models behind HTTP, with no training code or torch inside.

Public face: :func:`load_served_model`, :class:`ServedModel`, :func:`decode_image` and the
BentoML service ``serving.service:Screening``. Attributes load lazily so that the command line
starts fast.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DecodedImage": "serving.inputs",
    "decode_image": "serving.inputs",
    "InputError": "serving.errors",
    "ModelLoadError": "serving.errors",
    "ModelReference": "serving.model",
    "ServedModel": "serving.model",
    "load_served_model": "serving.model",
    "tracking_uri": "serving.settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
