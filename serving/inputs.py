"""Uploads to model inputs: the shared decoder of the datasets package (no torch inside)."""

from datasets.images import MAX_UPLOAD_BYTES, DecodedImage, ImageDecodeError, decode_image

__all__ = ["MAX_UPLOAD_BYTES", "DecodedImage", "ImageDecodeError", "decode_image"]
