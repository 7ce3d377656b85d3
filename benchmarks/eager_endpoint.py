"""The baseline a hospital would otherwise build: FastAPI + eager PyTorch, one process.

Loads the same training run's network (best weights, fitted temperature, threshold) and serves
``POST /v1/screen`` with a multipart ``file``: Pillow decodes the PNG, eager PyTorch runs one
image per request under ``torch.inference_mode()``. The handler is ``async def`` and runs the
model inline, as most tutorials do, so one request computes at a time and torch's intra-op
threads do not fight each other.

Usage (benchmarks/serving.py starts it; MEDSCREEN_STATE_DIR selects the tracking store):
    python benchmarks/eager_endpoint.py --run-id RUN_ID [--port 3001] [--threads N]
"""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
import torch
import typer
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

from training.models import ProbabilityModel
from training.runs import load_run_context


def create_app(run_id: str) -> FastAPI:
    """Build the app around one training run's network, loaded once."""
    context = load_run_context(run_id)
    model = ProbabilityModel(context.network(), context.temperature).eval()
    channels, height, width = context.spec.image_shape
    mode = "L" if channels == 1 else "RGB"
    positive = list(context.spec.positive_classes)
    threshold = context.threshold
    app = FastAPI(title="eager baseline")

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/screen")
    async def screen(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        data = await file.read()
        try:
            image = Image.open(io.BytesIO(data)).convert(mode)
        except (UnidentifiedImageError, OSError) as error:
            raise HTTPException(status_code=415, detail="not an image") from error
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        with torch.inference_mode():
            probabilities = model(torch.from_numpy(np.ascontiguousarray(pixels))[None])[0]
        probability = float(probabilities[positive].sum())
        return {
            "run_id": run_id,
            "probability": probability,
            "threshold": threshold,
            "decision": "positive" if probability >= threshold else "negative",
            "class_probabilities": probabilities.tolist(),
        }

    return app


def main(
    run_id: Annotated[str, typer.Option(help="Training run whose network to serve.")],
    port: Annotated[int, typer.Option(help="TCP port.")] = 3001,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    threads: Annotated[
        int, typer.Option(help="torch intra-op threads (0: torch's default, as a hospital would).")
    ] = 0,
) -> None:
    """Serve the run's eager PyTorch network with FastAPI on uvicorn (one process)."""
    if threads > 0:
        torch.set_num_threads(threads)
    app = create_app(run_id)
    print(f"eager endpoint: torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    typer.run(main)
