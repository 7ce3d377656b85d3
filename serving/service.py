"""The BentoML service hospitals call: ``POST /v1/screen`` with a multipart ``file``.

Started by ``medscreen serve``, which sets ``MEDSCREEN_MODEL`` (``NAME@ALIAS_OR_VERSION``) and the
tracking URI. BentoML's ``/readyz``, ``/livez`` and ``/metrics`` stay on.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from serving.errors import InputError
from serving.inputs import MAX_UPLOAD_BYTES, decode_image
from serving.middleware import UploadContractMiddleware
from serving.model import ServedModel, load_served_model
from serving.settings import MODEL_ENV

logger = logging.getLogger("medscreen.serving")


def _configure_logging() -> None:
    """BentoML only configures its own loggers; give ours a handler of its own."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(levelname)s] [medscreen] %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_configure_logging()


SCREEN_ROUTE = "/v1/screen"


def error_body(request_id: str, status: HTTPStatus, message: str) -> dict[str, Any]:
    """The JSON body of a client error: ``error`` is a message an integrator can act on."""
    return {"error": message, "status": status.value, "request_id": request_id}


@bentoml.service(
    name="medscreen",
    workers=1,
    traffic={"timeout": 60},
)
class Screening:
    """Serves one registered screening model, loaded from the MLflow registry at start-up."""

    def __init__(self) -> None:
        reference = os.environ.get(MODEL_ENV)
        if not reference:
            raise RuntimeError(f"set {MODEL_ENV} to NAME@ALIAS or NAME@VERSION")
        self.model: ServedModel = load_served_model(reference)
        logger.info(
            "serving %s version %s (threshold %.6f)",
            self.model.name,
            self.model.version,
            self.model.threshold,
        )

    @bentoml.api(route=SCREEN_ROUTE)
    def screen(self, file: Path, ctx: bentoml.Context) -> dict[str, Any]:
        """Screen one image (PNG, JPEG or DICOM) for the model's positive finding.

        Returns the probability of the positive finding, the decision at the model's threshold,
        the threshold, and the model name and version that produced them.
        """
        request_id = str(uuid.uuid4())
        ctx.response.headers["X-Request-ID"] = request_id
        started = time.perf_counter()
        model = self.model
        card_input = model.card.input
        try:
            decoded = decode_image(
                Path(file).read_bytes(),
                channels=1 if card_input.channels == "grayscale" else 3,
                height=card_input.height,
                width=card_input.width,
            )
        except InputError as error:
            ctx.response.status_code = error.status.value
            logger.info("request %s rejected: %s %s", request_id, error.status.value, error)
            return error_body(request_id, error.status, str(error))
        probabilities = model.probabilities(decoded.pixels[None])
        probability = float(model.positive_probability(probabilities)[0])
        positive = probability >= model.threshold
        latency_ms = (time.perf_counter() - started) * 1000
        logger.info(
            "request %s model %s/%s score %.6f decision %s latency %.1f ms",
            request_id,
            model.name,
            model.version,
            probability,
            "positive" if positive else "negative",
            latency_ms,
        )
        return {
            "request_id": request_id,
            "model": {"name": model.name, "version": model.version, "alias": model.alias},
            "finding": model.card.positive_finding,
            "probability": probability,
            "threshold": model.threshold,
            "sensitivity_target": model.card.operating_point.sensitivity_target,
            "decision": "positive" if positive else "negative",
            "class_probabilities": dict(
                zip(
                    model.card.classes,
                    np.asarray(probabilities[0], dtype=float).tolist(),
                    strict=True,
                )
            ),
            "input": {
                "format": decoded.source_format,
                "height": decoded.source_shape[0],
                "width": decoded.source_shape[1],
            },
        }


Screening.add_asgi_middleware(
    UploadContractMiddleware, routes=(SCREEN_ROUTE,), max_bytes=MAX_UPLOAD_BYTES + 64 * 1024
)
