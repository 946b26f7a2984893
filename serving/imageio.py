"""Untrusted image bytes -> a plain RGB ``PIL.Image``; plus stats and a stripped storage encoding.

Decoding (``decode_image``) refuses, with a message a person can act on (``ImageRejected.args[0]``):
files over ``max_bytes`` (checked before anything is parsed), empty files, things that are not images
(text, HTML, SVG, PDF, ZIP, HEIC/HEIF/AVIF, video), formats outside JPEG/PNG/GIF/WebP/BMP/TIFF, images
whose *header* declares more than ``max_pixels`` pixels (refused before any pixel memory is allocated),
and truncated or corrupt files (``LOAD_TRUNCATED_IMAGES`` stays off: half a photo is not a photo).
Degenerate but valid sizes (1x1, 1x20000) are accepted: the model's preprocessing resizes them.
Only the first frame of animated/multi-page files is used. EXIF orientation is applied exactly once and
all metadata (EXIF, GPS, ICC, text chunks) is dropped from the result.

Mode conversion (``to_rgb``) is deterministic and aims at "what a person sees on a white page":
  * alpha (RGBA, LA, PA, P/L/RGB with a ``transparency`` key, RGBA palettes) is composited over WHITE with
    ``out = round((c*a + 255*(255-a)) / 255)``; the Sketchpad's transparent background becomes white paper.
    Premultiplied RGBa/La: ``out = c + 255 - a``.
  * I;16 / I;16B / I;16L / I;16N: ``value >> 8`` (65535 -> 255, 256 -> 1). Pillow's own convert clips at 255,
    which turns almost every 16-bit image white.
  * I (32-bit int) is treated as 16-bit data (how 16-bit PNG/TIFF used to arrive): clipped to [0, 65535], >> 8.
  * F is taken to be on the 0-255 scale (as Pillow's F -> L is): NaN -> 0, clipped to [0, 255], rounded.
  * 1 -> 0/255; L -> replicated to 3 channels; P -> palette colours; CMYK, YCbCr, LAB, HSV -> Pillow's convert.
  ICC profiles are ignored (as fastai's ``PILImage.create`` ignores them at training time).
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_HINT = "Upload a JPEG, PNG, GIF, WebP, BMP or TIFF image."
_CORRUPT = "The file is truncated or corrupt, so the image cannot be read. Re-save or re-export it and upload again."
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"heif"}
_AVIF_BRANDS = {b"avif", b"avis"}
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_STATS_SIDE = 64

# warnings.catch_warnings mutates the process-wide filter list (Python < 3.14). The lock keeps our own
# concurrent decodes from interleaving save/restore (which could leave the "error" filter installed forever);
# it is held only while Pillow parses the header, which is fast.
_OPEN_LOCK = threading.Lock()


class ImageRejected(ValueError):
    """``args[0]`` is a user-facing message (safe to show): what was wrong and what to do."""


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, reduce_to: int | None = None) -> Image.Image:
    """Decode untrusted bytes into a metadata-free RGB image, or raise ``ImageRejected``.

    ``reduce_to``: the caller will shrink the image to fit ``reduce_to`` px anyway, so a JPEG may be decoded at
    1/2, 1/4 or 1/8 scale (DCT scaling: a fraction of the time and memory), keeping both sides >= ``reduce_to``.
    Other formats decode at full size.
    """
    if len(data) > max_bytes:  # before anything looks inside the bytes
        raise ImageRejected(
            f"This file is too large ({_mb(len(data))}; the limit is {_mb(max_bytes)}). "
            "Upload a smaller image, e.g. resized or saved as JPEG."
        )
    if not data:
        raise ImageRejected(f"This file is empty (0 bytes). {_HINT}")

    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    too_many = f"Resize it to at most {limit:,} pixels (width x height) and upload again."
    with _OPEN_LOCK, warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; here that is a refusal too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
        except UnidentifiedImageError:
            raise ImageRejected(_describe_non_image(data)) from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageRejected(f"This image declares too many pixels. {too_many}") from exc
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, struct.error) as exc:
            raise ImageRejected(_CORRUPT) from exc

    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(f"This image is {width} x {height} = {width * height:,} pixels. {too_many}")
    if reduce_to is not None:
        img.draft(None, (reduce_to, reduce_to))
    try:
        img.load()  # frame 0 only: animated GIF/WebP and multi-page TIFF are never seeked further
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError) as exc:
        raise ImageRejected(_CORRUPT) from exc
    if img.size[0] * img.size[1] > max_pixels:  # defence in depth: a plugin may settle the size while loading
        raise ImageRejected(f"This image is {img.size[0]} x {img.size[1]} pixels. {too_many}")
    return to_rgb(_apply_orientation(img))


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as exc:
        # A broken EXIF block does not make the pixels unreadable; browsers show such files unrotated too.
        log.warning("ignoring unreadable EXIF orientation: %r", exc)
        return img


def _describe_non_image(data: bytes) -> str:
    """Name what the bytes are, so the message tells people what to do instead."""
    head = data[:4096]
    if head[4:8] == b"ftyp":
        size = int.from_bytes(head[:4], "big")
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF images are not supported. Convert it to JPEG or PNG and upload again."
        if brands & _HEIF_BRANDS:
            return (
                "HEIC/HEIF photos (the iPhone default) are not supported. Convert it to JPEG or PNG and upload "
                "again (on an iPhone: Settings > Camera > Formats > Most Compatible)."
            )
        return f"This is a video (MP4/QuickTime), not an image. {_HINT}"
    if b"%PDF-" in head[:1024]:
        return "This is a PDF document, not an image. Export the page as PNG or JPEG and upload that."
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return f"This is a ZIP archive (or an Office document), not an image. Extract the image and upload it. {_HINT}"
    text = _as_text(head)
    if text is not None:
        start = text.lstrip("\ufeff \t\r\n").lower()
        if start.startswith("<") and "<svg" in start:
            return "SVG (vector) images are not supported. Export it as PNG and upload that."
        if start.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in start[:1024]:
            return (
                "This is a web page (HTML), not an image. In the browser, right-click the picture, choose "
                f"'Save image as', and upload that file. {_HINT}"
            )
        return f"This is a text file, not an image. {_HINT}"
    return f"This file is not a supported image (or it is damaged). {_HINT}"


def _as_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # a multi-byte character cut at the end of `head` is still text
            return None
        text = head[: exc.start].decode("utf-8")
    if any(ch < " " and ch not in "\t\r\n\f" for ch in text):
        return None
    return text


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> a new RGB image without metadata (rules in the module docstring)."""
    mode = img.mode
    if mode in _WIDE_GREY:
        raw = np.asarray(img)
        if mode == "F":
            grey = np.rint(np.clip(np.nan_to_num(raw, nan=0.0), 0, 255))
        else:
            grey = np.clip(raw.astype(np.int64), 0, 65535) >> 8
        rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        if "transparency" in img.info:  # Pillow's RGBA convert would clip these too, so mask ourselves
            alpha = np.where(raw == img.info["transparency"], 0, 255).astype(np.uint8)
            rgb = _over_white(np.dstack([rgb, alpha]))
    elif mode in ("RGBa", "La"):  # premultiplied (Pillow cannot convert La at all)
        arr = np.asarray(img).astype(np.int16)
        colour = arr[..., :-1] if mode == "RGBa" else np.repeat(arr[..., :1], 3, axis=2)
        rgb = np.clip(colour + 255 - arr[..., -1:], 0, 255).astype(np.uint8)
    elif img.has_transparency_data:
        rgb = _over_white(np.asarray(img.convert("RGBA")))
    else:
        rgb = np.asarray(img if mode == "RGB" else img.convert("RGB"))  # asarray copies: no need to convert RGB
    return Image.fromarray(np.ascontiguousarray(rgb))


def _over_white(rgba: np.ndarray) -> np.ndarray:
    # c*a + 255*(255-a) + 127 <= 65152: fits uint16 without overflow.
    colour = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def image_stats(img: Image.Image, *, brightness: bool = True) -> dict:
    """``{"width", "height", "brightness"}``; brightness = mean of the L channel / 255.

    Its cost does not grow with the image: images larger than 64 px on a side are sampled on a 64 x 64
    nearest-neighbour grid (4,096 pixels, within ~1% of the full mean on photos); smaller ones are measured
    exactly. ``brightness=False``: the size only, which costs nothing (the request path: the prediction log's
    writer measures brightness in the background).
    """
    width, height = img.size
    if not brightness:
        return {"width": width, "height": height}
    small = img
    if width > _STATS_SIDE or height > _STATS_SIDE:
        small = img.resize((min(width, _STATS_SIDE), min(height, _STATS_SIDE)), Image.Resampling.NEAREST)
    if small.mode != "RGB":
        small = to_rgb(small)  # after sampling: alpha over white etc. per pixel, on 4,096 pixels at most
    mean = float(np.asarray(small.convert("L")).mean() / 255.0)
    return {"width": width, "height": height, "brightness": mean}


# Images from a lossless source at most this large stay lossless: digits, sketches, icons (PNG stays small there).
LOSSLESS_PIXELS = 256 * 256
# Few-colour images from a lossless source (drawings, diagrams, screenshots) stay PNG: JPEG would smear them.
LOSSLESS_COLOURS = 256
JPEG_QUALITY = 90  # visually lossless for review; retraining augments far more than this changes


def encode_for_storage(img: Image.Image, *, max_side: int | None = None, lossless_source: bool = True) -> bytes:
    """What the image store keeps: RGB pixels and nothing else (no EXIF/GPS/ICC/text); same pixels -> same bytes.

    Shrunk to fit ``max_side`` (Lanczos), then, from a lossless source (``lossless_source``: PNG, GIF, BMP, TIFF,
    lossless WebP), a PNG (compress level 1) when the image is small or has few colours; otherwise (photos, and
    anything that arrived as a JPEG or lossy WebP) a baseline JPEG at quality 90, about a tenth of the PNG's size.
    A lossy source gains nothing from a lossless copy, and its PNG cost the server 10 % of its CPU under 8 clients
    sending 224 px JPEGs (py-spy; a JPEG encodes ~5x faster).
    """
    # to_rgb builds a fresh image: the writers would otherwise copy icc_profile/transparency/comment from .info.
    clean = to_rgb(img)
    if max_side is not None and max(clean.size) > max_side:
        clean.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    width, height = clean.size
    if lossless_source and (width * height <= LOSSLESS_PIXELS or clean.getcolors(LOSSLESS_COLOURS) is not None):
        # Level 1: measured ~0.6x the CPU of level 6 for ~9% larger files.
        clean.save(buf, format="PNG", compress_level=1)
    else:
        clean.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def decode_for_storage(data: bytes, *, max_bytes: int, max_pixels: int, max_side: int) -> tuple[Image.Image, bool]:
    """Upload bytes (accepted once already by ``decode_image``) -> (image, lossless_source) for
    ``encode_for_storage``; JPEGs decode at reduced scale. Raises ``ImageRejected`` like ``decode_image``."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, reduce_to=max_side)
    lossy = data[:3] == b"\xff\xd8\xff" or (data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8 ")
    return img, not lossy


def _mb(n: int) -> str:
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"
