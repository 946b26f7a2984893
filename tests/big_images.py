"""Large, valid, photo-like JPEGs for the memory and storage tests (built in memory, deterministic per seed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_jpeg(width: int, height: int, *, seed: int = 0, noise: float = 4.4, quality: int = 90,
               exif: Image.Exif | None = None) -> bytes:
    """Smooth colour fields plus grain: compresses like a camera photo (6000 x 6600 at noise 4.4: ~8.5 MB)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 200), max(2, width // 200), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    arr = arr + rng.normal(0, noise, (height, width, 1)).astype(np.int16)
    buf = io.BytesIO()
    extra = {"exif": exif} if exif is not None else {}
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality, **extra)
    return buf.getvalue()
