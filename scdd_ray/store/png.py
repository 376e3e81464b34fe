"""Images as PNG bytes: lossless, so what is read back equals what was written."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 CHW tensor -> PNG bytes (lossless, so a reread equals what was written)."""
    arr = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG (or any image PIL reads) bytes -> uint8 CHW RGB tensor."""
    return torch.from_numpy(decode_png_hwc(data)).permute(2, 0, 1).contiguous()


def decode_png_hwc(data: bytes) -> np.ndarray:
    """The (H, W, 3) RGB pixels of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))
