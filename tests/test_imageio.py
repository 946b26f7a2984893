"""serving.imageio: every fixture is built here with Pillow or raw bytes (no files on disk, no network)."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from serving.imageio import ImageRejected, decode_image, encode_for_storage, image_stats, to_rgb

MB = 1 << 20
CORRUPT = "truncated or corrupt"
HINT = "Upload a JPEG, PNG, GIF, WebP, BMP or TIFF image."


def decode(data: bytes, *, max_bytes: int = 10 * MB, max_pixels: int = 40_000_000) -> Image.Image:
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


def rejected(data: bytes, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        decode(data, **kw)
    return info.value.args[0]


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def header_only_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (decoding it would need gigabytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def png_chunk_types(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


def noise_jpeg(size=(256, 256)) -> bytes:
    rng = np.random.default_rng(0)
    return save(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), "JPEG", quality=95)


def pixel(img: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(img.getpixel(xy))


# --- refusals before parsing ---------------------------------------------------------------------------


def test_image_rejected_is_a_value_error_carrying_the_message():
    err = ImageRejected("msg")
    assert isinstance(err, ValueError) and err.args[0] == "msg"


def test_zero_byte_file():
    assert rejected(b"") == f"This file is empty (0 bytes). {HINT}"


def test_file_over_size_limit_is_refused_before_parsing():
    data = save(Image.new("RGB", (8, 8)), "PNG")
    msg = rejected(data, max_bytes=len(data) - 1)
    assert msg.startswith("This file is too large") and f"the limit is {len(data) - 1} bytes" in msg
    # Bigger than the limit wins over any other diagnosis (here it would otherwise be "text").
    msg = rejected(b"hello " * 400_000, max_bytes=2 * MB)
    assert "too large (2.3 MB; the limit is 2 MB)" in msg


def test_file_exactly_at_size_limit_is_accepted():
    data = save(Image.new("RGB", (8, 8)), "PNG")
    assert decode(data, max_bytes=len(data)).size == (8, 8)


# --- things that are not images ------------------------------------------------------------------------

NON_IMAGES = {
    "text": (b"just some notes\nabout a cat\n", "This is a text file, not an image."),
    "html": (b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>", "This is a web page (HTML)"),
    "html-no-doctype": (b"\n  <html lang='en'><head></head></html>", "This is a web page (HTML)"),
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "This is a PDF document"),
    "zip": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(200)), "This is a ZIP archive"),
    "svg": (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        "SVG (vector) images are not supported",
    ),
    "svg-bare": (b'<svg viewBox="0 0 1 1"><rect/></svg>', "SVG (vector) images are not supported"),
    "heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100), "HEIC/HEIF photos"),
    "heif-mif1": (b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00heic" + bytes(100), "HEIC/HEIF photos"),
    "avif": (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(100), "AVIF images are not supported"),
    "mp4": (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(100), "This is a video"),
    "binary": (bytes(range(256)) * 4, "This file is not a supported image"),
}


@pytest.mark.parametrize("name", NON_IMAGES)
def test_non_image_is_named(name):
    data, expected = NON_IMAGES[name]
    msg = rejected(data)
    assert expected in msg
    if name in ("heic", "heif-mif1", "avif"):
        assert "Convert it to JPEG or PNG" in msg
    if name in ("text", "html", "zip", "binary", "mp4"):
        assert HINT in msg


def test_image_format_outside_the_allow_list_is_refused():
    ppm = save(Image.new("RGB", (4, 4), (1, 2, 3)), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"  # Pillow alone would open it
    assert "not a supported image" in rejected(ppm)


# --- corrupt files -------------------------------------------------------------------------------------


def test_truncated_jpeg():
    data = noise_jpeg()
    assert decode(data).size == (256, 256)
    assert CORRUPT in rejected(data[: len(data) * 6 // 10])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_with_damaged_pixel_data():
    data = bytearray(save(Image.new("RGB", (64, 64), (10, 20, 30)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 6 : idat + 14] = b"\xff" * 8  # breaks the zlib stream (and the CRC)
    assert CORRUPT in rejected(bytes(data))


# --- pixel caps (decompression bombs) ------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded (proves refusals happen from the header)."""

    def boom(self):
        raise AssertionError("decoded pixels of an image that should have been refused from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


def test_bomb_refused_from_header_by_own_cap(no_decoding):
    data = header_only_png(9000, 9000)  # 81 M pixels: below Pillow's own warning, above our 40 M cap
    assert len(data) < 200
    start = time.perf_counter()
    msg = rejected(data, max_pixels=40_000_000)
    assert time.perf_counter() - start < 0.5
    assert msg == (
        "This image is 9000 x 9000 = 81,000,000 pixels. "
        "Resize it to at most 40,000,000 pixels (width x height) and upload again."
    )


def test_huge_bomb_refused_fast_even_with_a_huge_cap(no_decoding):
    data = header_only_png(100_000, 100_000)
    start = time.perf_counter()
    msg = rejected(data, max_pixels=10**12)
    assert time.perf_counter() - start < 0.5
    assert msg.startswith("This image declares too many pixels.")


def test_pillow_bomb_warning_is_a_refusal_without_changing_global_warning_filters(no_decoding):
    data = header_only_png(10_000, 10_000)  # 100 M: Pillow only *warns* here; we refuse
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "too many pixels" in rejected(data, max_pixels=10**9)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters_before


def test_max_pixels_is_configurable():
    data = save(Image.new("RGB", (200, 200), (9, 9, 9)), "PNG")
    assert "200 x 200 = 40,000 pixels" in rejected(data, max_pixels=10_000)
    assert "at most 39,999 pixels" in rejected(data, max_pixels=39_999)
    assert decode(data, max_pixels=40_000).size == (200, 200)


@pytest.mark.parametrize("size", [(1, 1), (1, 20000), (20000, 1)])
def test_degenerate_sizes_are_accepted(size):
    img = decode(save(Image.new("RGB", size, (5, 6, 7)), "PNG"))
    assert img.size == size and img.mode == "RGB" and pixel(img) == (5, 6, 7)


# --- frames, orientation, metadata ---------------------------------------------------------------------

FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_multi_frame_file_gives_first_frame(fmt, kw):
    frames = [Image.new("RGB", (16, 12), c) for c in FRAME_COLOURS]
    data = save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = decode(data)
    assert img.size == (16, 12)
    assert {tuple(p) for p in np.asarray(img).reshape(-1, 3)} == {(255, 0, 0)}


def marked_image() -> Image.Image:
    """64 wide x 32 high, white, with a red 16x16 block in the stored top-left corner."""
    img = Image.new("RGB", (64, 32), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    return img


def red_corners(img: Image.Image) -> list[str]:
    w, h = img.size
    probes = {"top-left": (8, 8), "top-right": (w - 9, 8), "bottom-left": (8, h - 9), "bottom-right": (w - 9, h - 9)}
    return [name for name, xy in probes.items() if is_red(pixel(img, xy))]


def is_red(p: tuple) -> bool:
    return p[0] > 200 and p[1] < 60 and p[2] < 60  # JPEG/WebP are lossy: allow some drift


ORIENTATIONS = {
    1: ((64, 32), "top-left"),
    3: ((64, 32), "bottom-right"),
    6: ((32, 64), "top-right"),
    8: ((32, 64), "bottom-left"),
}


@pytest.mark.parametrize(
    "fmt,orientation", [("JPEG", 1), ("JPEG", 3), ("JPEG", 6), ("JPEG", 8), ("PNG", 6), ("WEBP", 8), ("TIFF", 6)]
)
def test_exif_orientation_applied_exactly_once(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(marked_image(), fmt, exif=exif, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    img = decode(data)
    size, corner = ORIENTATIONS[orientation]
    assert img.size == size
    assert red_corners(img) == [corner]
    again = decode(encode_for_storage(img))  # stored copy decoded again: must not rotate a second time
    assert again.size == size and again.tobytes() == img.tobytes()


def test_unreadable_exif_does_not_reject_the_image():
    data = save(Image.new("RGB", (8, 6), (1, 2, 3)), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\xff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow itself warns "Corrupt EXIF data"
        img = decode(data)
    assert img.size == (8, 6)


def camera_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 1.5)}  # GPS IFD: latitude
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = save(marked_image(), "JPEG", exif=exif, icc_profile=icc, comment=b"secret", dpi=(300, 300))
    original = Image.open(io.BytesIO(data))
    assert original.getexif().get_ifd(0x8825)[1] == "N" and "icc_profile" in original.info  # fixture is real
    return data


def test_decoded_image_is_plain_rgb_without_metadata():
    img = decode(camera_jpeg())
    assert img.mode == "RGB" and img.info == {} and len(img.getexif()) == 0
    png = save(Image.new("RGB", (4, 4)), "PNG", dpi=(72, 72), pnginfo=_text_chunk())
    img = decode(png)
    assert img.mode == "RGB" and img.info == {}


def _text_chunk():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "private")
    return info


def test_encode_for_storage_strips_exif_gps_icc():
    for img in (decode(camera_jpeg()), Image.open(io.BytesIO(camera_jpeg()))):  # also metadata-laden input
        stored = encode_for_storage(img)
        reopened = Image.open(io.BytesIO(stored))
        assert reopened.format == "PNG" and reopened.mode == "RGB"
        assert len(reopened.getexif()) == 0 and "icc_profile" not in reopened.info and "exif" not in reopened.info
        assert png_chunk_types(stored) == [b"IHDR"] + [b"IDAT"] * (len(png_chunk_types(stored)) - 2) + [b"IEND"]


def test_encode_for_storage_is_lossless_and_deterministic():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    plain = Image.fromarray(arr)
    tagged = Image.fromarray(arr)
    tagged.info.update({"icc_profile": b"x" * 10, "dpi": (300, 300), "exif": b"Exif\x00\x00"})
    stored = encode_for_storage(plain)
    assert stored == encode_for_storage(tagged) == encode_for_storage(plain)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), arr)


def test_a_small_image_stays_lossless_only_when_its_source_was():
    """A 224 px photo that arrived as a JPEG is kept as a JPEG (a lossless copy of lossy pixels buys nothing and its
    PNG encode was a tenth of the server's CPU under load); the same pixels from a PNG stay a lossless PNG."""
    arr = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    assert encode_for_storage(img, lossless_source=False)[:3] == b"\xff\xd8\xff"
    stored = encode_for_storage(img, lossless_source=True)
    assert stored[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), arr)


# --- mode conversion goldens ---------------------------------------------------------------------------


def row(mode: str, values, **info) -> Image.Image:
    img = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    img.info.update(info)
    return img


def pixels(img: Image.Image) -> list[tuple]:
    assert img.mode == "RGB"
    return [tuple(p) for p in np.asarray(img)[0].tolist()]


def over_white(c: int, a: int) -> int:
    return round((c * a + 255 * (255 - a)) / 255)


def test_rgba_composited_over_white():
    img = row("RGBA", [(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128), (100, 0, 200, 64)])
    expected = [(255, 255, 255), (255, 0, 0), (255, 127, 127), (216, 191, 241)]
    assert [tuple(over_white(c, 64) for c in (100, 0, 200))] == expected[3:]  # the formula, spelled out
    assert pixels(to_rgb(img)) == expected
    assert pixels(decode(save(img, "PNG"))) == expected  # same through a real file


def test_sketchpad_transparent_background_becomes_white_paper():
    sketch = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    sketch.paste((20, 20, 20, 255), (4, 0, 6, 10))  # a dark vertical stroke
    out = np.asarray(to_rgb(sketch))
    assert (out[:, :4] == 255).all() and (out[:, 4:6] == 20).all() and (out[:, 6:] == 255).all()


def test_la_composited_over_white():
    img = row("LA", [(0, 0), (77, 255), (0, 128)])
    assert pixels(to_rgb(img)) == [(255, 255, 255), (77, 77, 77), (127, 127, 127)]
    assert pixels(decode(save(img, "PNG"))) == [(255, 255, 255), (77, 77, 77), (127, 127, 127)]


def test_p_with_transparency_index_becomes_white():
    img = row("P", [0, 1, 0], transparency=1)
    img.putpalette([200, 10, 10, 10, 200, 10])
    assert pixels(to_rgb(img)) == [(200, 10, 10), (255, 255, 255), (200, 10, 10)]
    assert pixels(decode(save(img, "PNG"))) == [(200, 10, 10), (255, 255, 255), (200, 10, 10)]
    gif = decode(save(img, "GIF"))
    assert pixels(gif) == [(200, 10, 10), (255, 255, 255), (200, 10, 10)]


def test_p_with_per_entry_alpha():
    img = row("P", [0, 1], transparency=b"\x80\xff")
    img.putpalette([255, 0, 0, 0, 255, 0])
    assert pixels(to_rgb(img)) == [(255, over_white(0, 128), over_white(0, 128)), (0, 255, 0)]


def test_l_and_rgb_with_transparency_colour():
    assert pixels(to_rgb(row("L", [0, 77], transparency=0))) == [(255, 255, 255), (77, 77, 77)]
    rgb = row("RGB", [(0, 0, 0), (1, 2, 3)], transparency=(0, 0, 0))
    assert pixels(to_rgb(rgb)) == [(255, 255, 255), (1, 2, 3)]


def test_premultiplied_modes():
    assert pixels(to_rgb(row("RGBa", [(50, 0, 0, 128)]))) == [(177, 127, 127)]  # c + 255 - a
    la = Image.frombytes("La", (1, 1), bytes([50, 128]))
    assert pixels(to_rgb(la)) == [(177, 177, 177)]


def test_cmyk():
    img = row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (128, 0, 0, 128)])
    expected = [(255, 255, 255), (0, 255, 255), (0, 0, 0), (63, 127, 127)]
    assert pixels(to_rgb(img)) == expected
    assert pixels(decode(save(img, "TIFF"))) == expected


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16_bit_grey_scaled_not_clipped(mode, dtype):
    values = [0, 255, 256, 4096, 32768, 65535]
    img = Image.frombytes(mode, (len(values), 1), np.array(values, dtype).tobytes())
    expected = [(v, v, v) for v in (0, 0, 1, 16, 128, 255)]
    assert pixels(to_rgb(img)) == expected
    if mode == "I;16":
        assert pixels(decode(save(img, "PNG"))) == expected  # 16-bit greyscale PNG
    if mode == "I;16B":
        assert pixels(decode(save(img, "TIFF"))) == expected


def test_16_bit_grey_with_transparency():
    img = Image.frombytes("I;16", (2, 1), np.array([300, 4096], "<u2").tobytes())
    img.info["transparency"] = 300
    assert pixels(to_rgb(img)) == [(255, 255, 255), (16, 16, 16)]


def test_32_bit_int_treated_as_16_bit():
    img = row("I", [-5, 512, 65535, 70000])
    assert pixels(to_rgb(img)) == [(0, 0, 0), (2, 2, 2), (255, 255, 255), (255, 255, 255)]


def test_float_clipped():
    img = row("F", [-3.0, 300.0, 127.6, float("nan"), 10.2])
    assert pixels(to_rgb(img)) == [(0, 0, 0), (255, 255, 255), (128, 128, 128), (0, 0, 0), (10, 10, 10)]


def test_bilevel_grey_and_palette():
    assert pixels(to_rgb(row("1", [0, 1, 255]))) == [(0, 0, 0), (255, 255, 255), (255, 255, 255)]
    assert pixels(to_rgb(row("L", [77]))) == [(77, 77, 77)]
    pal = row("P", [1, 0])
    pal.putpalette([1, 2, 3, 4, 5, 6])
    assert pixels(to_rgb(pal)) == [(4, 5, 6), (1, 2, 3)]
    assert pixels(decode(save(row("1", [0, 1]), "PNG"))) == [(0, 0, 0), (255, 255, 255)]


def test_other_colour_spaces_via_pillow():
    assert pixels(to_rgb(row("HSV", [(0, 255, 255)]))) == [(255, 0, 0)]
    assert pixels(to_rgb(row("YCbCr", [(76, 85, 255)]))) == [(254, 0, 0)]
    assert pixels(to_rgb(row("LAB", [(255, 128, 128)]))) == [(254, 255, 254)]


def test_to_rgb_returns_a_fresh_image_without_metadata():
    src = Image.new("RGB", (3, 2), (9, 8, 7))
    src.info.update({"exif": b"Exif\x00\x00", "icc_profile": b"p"})
    out = to_rgb(src)
    assert out is not src and out.info == {} and out.mode == "RGB" and out.tobytes() == src.tobytes()
    out.putpixel((0, 0), (0, 0, 0))
    assert pixel(src) == (9, 8, 7)


# --- stats ---------------------------------------------------------------------------------------------


def test_image_stats_exact_on_small_image():
    assert image_stats(Image.new("RGB", (10, 6), (77, 77, 77))) == {"width": 10, "height": 6, "brightness": 77 / 255}
    assert image_stats(Image.new("RGB", (5, 5), (255, 0, 0)))["brightness"] == 76 / 255  # ITU-R 601 luma
    assert image_stats(Image.new("RGBA", (5, 5), (0, 0, 0, 0)))["brightness"] == 1.0  # transparent = white


def test_image_stats_on_large_image_is_cheap_and_close():
    arr = np.zeros((3000, 4000, 3), dtype=np.uint8)
    arr[:, :1000] = 255  # a quarter white
    img = Image.fromarray(arr)
    start = time.perf_counter()
    stats = image_stats(img)
    assert time.perf_counter() - start < 0.5
    assert (stats["width"], stats["height"]) == (4000, 3000)
    assert stats["brightness"] == pytest.approx(0.25, abs=0.01)
