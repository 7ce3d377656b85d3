"""Training: recipes, MONAI networks in Lightning, MLflow tracking, ONNX export and registration.

Public face: :func:`load_recipe`, :func:`train`, :func:`export_and_register` and the model card.
Attributes load lazily so that the command line starts fast.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Recipe": "training.recipe",
    "RecipeError": "training.recipe",
    "load_recipe": "training.recipe",
    "train_recipe": "training.train",
    "TrainingResult": "training.train",
    "export_and_register": "training.export",
    "ExportError": "training.export",
    "ExportResult": "training.export",
    "ModelCard": "training.card",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
