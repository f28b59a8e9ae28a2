"""Turn image files into pixels: the only place in retrain that decodes images.

Every file ends up either as a correctly oriented RGB ``uint8`` array, or as an
:class:`ImageError` whose ``.reason`` is a short human sentence ("not an image
file (unrecognised content)", "truncated or corrupt JPEG", ...) that callers can
print next to the path.  Nothing else escapes, and memory stays bounded: the
pixel count is checked from the header before any pixel is decoded.

Policy decisions:

* Content decides the format, never the extension, and only common raster
  photo formats are decoded (no EPS/PDF, which Pillow would hand to Ghostscript).
* Transparent pixels are composited onto WHITE, the background transparent
  images (logos, product cut-outs, icons) are made to be seen on.
* 16-bit data keeps its top 8 bits (as Pillow already does for 16-bit RGB).
  Float ("F") data is taken as 0..1 if its maximum is <= 1, else as 0..255.
* Embedded ICC profiles are ignored, as TensorFlow's decoders did; CMYK is
  converted with Pillow's plain formula (Adobe-inverted CMYK is undone first).
* The default filter, ``fast_bilinear``, is built for throughput: baseline and
  progressive RGB/grey JPEGs are decoded by libjpeg-turbo (simplejpeg) straight
  into an array, at 1/2, 1/4 or 1/8 scale when the image is that much bigger
  than the target (the pixels equal Pillow's ``draft``), and resized by
  OpenCV: bilinear when shrinking by at most 2x, area averaging beyond that,
  so nothing aliases. About 4x faster than Pillow's decode + resize of a
  300 x 300 photo. Everything else, and every Pillow filter name, goes
  through Pillow.
* Truncated files are rejected; Pillow's global ``LOAD_TRUNCATED_IMAGES`` and
  ``MAX_IMAGE_PIXELS`` are never touched.  Pillow still applies its own bomb
  check (about 179 megapixels) at open time, so ``max_pixels`` above that has
  no effect.

All functions are thread-safe: no global state, one Image object per call.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat

import numpy as np
import PIL

# The *ImagePlugin imports are for their side effect: each registers its format
# once, here, rather than lazily inside Image.open while decoding threads race.
from PIL import (  # noqa: F401
    AvifImagePlugin,
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
    features,
)

# Formats Image.open may pick, by content.  Everything else is "not an image".
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp"}
    | {".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
    | ({".avif"} if features.check_module("avif") else set())
)


def _dist_version(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "none"


# Part of cache keys.  Pillow, simplejpeg and OpenCV (and the libjpeg they bundle)
# can change decoded or resized pixels between releases, so their versions are part of ours.
DECODE_VERSION: str = (
    f"2+pillow{PIL.__version__}+simplejpeg{_dist_version('simplejpeg')}"
    f"+opencv{_dist_version('opencv-python-headless', 'opencv-python', 'opencv-contrib-python-headless', 'opencv-contrib-python')}"
)

# The default filter: libjpeg-turbo + OpenCV (see the module docstring).
FAST_BILINEAR = "fast_bilinear"
RESAMPLE_FILTERS: tuple[str, ...] = (
    FAST_BILINEAR,
    "bilinear",
    "bicubic",
    "nearest",
    "lanczos",
    "box",
    "hamming",
)

DEFAULT_MAX_PIXELS: int = 50_000_000
DEFAULT_MAX_FILE_BYTES: int = 512 * 1024 * 1024

_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})

# EXIF Orientation value -> the transpose that makes the image upright
# (same table as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The same transposes on an (H, W, C) array.
_NUMPY_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


class ImageError(Exception):
    """A file that cannot become pixels; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_image_file_name(name: str | bytes | os.PathLike) -> bool:
    """True for names with an image extension (any case); hidden files are never images.

    Hidden covers macOS litter such as ``.DS_Store`` and ``._IMG_0001.JPG``
    (AppleDouble resource forks, which are not images despite the extension).
    """
    base = os.path.basename(os.fsdecode(name))
    if base.startswith(".") or base.lower() in _IGNORED_NAMES:
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def read_image_bytes(path: str | bytes | os.PathLike, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The whole file's bytes, or ImageError for anything that is not a readable, non-empty file."""
    try:
        # O_NONBLOCK: a FIFO left in a photo folder must not hang the loader.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as e:
        reason = "broken symbolic link" if os.path.islink(path) else "file not found"
        raise ImageError(reason) from e
    except IsADirectoryError as e:
        raise ImageError("is a directory") from e
    except PermissionError as e:  # Windows reports directories this way
        raise ImageError("is a directory" if os.path.isdir(path) else "permission denied") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("symbolic link loop") from e
        raise ImageError(f"cannot open file: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        if st.st_size > max_bytes:
            raise ImageError(f"file too large: {st.st_size // 2**20} MiB (limit {max_bytes // 2**20} MiB)")
        with open(fd, "rb", closefd=False) as f:
            # One byte more than expected tells us the file grew while we read it,
            # without ever reading more than max_bytes + 1.
            data = f.read(st.st_size + 1)
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise ImageError("file changed while being read")
    return data


def decode_image(
    data: bytes,
    size: int,
    *,
    resample: str = FAST_BILINEAR,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The whole image squashed to ``(size, size, 3)`` RGB uint8 (aspect not kept, like retrain.py).

    ``resample`` is ``"fast_bilinear"`` (the default, see the module docstring) or a Pillow
    filter name: "bilinear", "bicubic", "nearest", "lanczos", "box" or "hamming".
    The array is C-contiguous and writable.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(
            f"unknown resample filter {resample!r}; expected one of {', '.join(RESAMPLE_FILTERS)}"
        )
    if resample == FAST_BILINEAR:
        return _decode_fast(data, max_pixels, size)
    img = _decode(data, max_pixels, size, Image.Resampling[resample.upper()])
    # np.array (not asarray): asarray of a Pillow image is read-only, which breaks
    # in-place augmentation and torch.from_numpy; the copy is ~150 kB at 224 px.
    return np.array(img, dtype=np.uint8)


def load_image(
    path: str | bytes | os.PathLike,
    size: int,
    *,
    resample: str = FAST_BILINEAR,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """:func:`read_image_bytes` then :func:`decode_image`."""
    return decode_image(read_image_bytes(path), size, resample=resample, max_pixels=max_pixels)


def decode_image_full(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The upright RGB image at full size (no draft reduction), with the same checks as decode_image."""
    return _decode(data, max_pixels, None, Image.Resampling.BILINEAR)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open (header only) with the pixel limit applied; errors as ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    with _pillow_errors("image", max_pixels):
        img = Image.open(io.BytesIO(data), formats=_FORMATS)  # lazy: reads the header only
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"too large: {width}x{height} pixels (limit {_megapixels(max_pixels)} megapixels)")
    return img


def _load(img: Image.Image, size: int | None) -> tuple[Image.Image, int]:
    """Decode an opened image (at draft scale when ``size`` is given) to "L" or "RGB"; with its EXIF orientation."""
    if size is not None:
        # libjpeg can decode at 1/2, 1/4 or 1/8 scale almost for free; draft
        # picks the smallest of those that stays >= size in both dimensions.
        # The target is square, so an EXIF rotation (which swaps width and
        # height) cannot make the drafted image too small.  No-op for non-JPEG.
        img.draft("RGB", (size, size))
    img.load()  # decode now, so truncation errors surface here and not in getexif
    return _to_l_or_rgb(img), _exif_orientation(img)


def _decode(data: bytes, max_pixels: int, size: int | None, method: Image.Resampling) -> Image.Image:
    img = _open(data, max_pixels)
    with _pillow_errors(img.format or "image"):
        img, orientation = _load(img, size)
        if size is not None:
            img = img.resize((size, size), method)
        if img.mode != "RGB":
            img = img.convert("RGB")  # after resizing: grey resizes 3x cheaper
        # After resizing too: transposing the small image is cheaper, and for a
        # square target the result is the same.
        return img if orientation not in _UPRIGHT else img.transpose(_UPRIGHT[orientation])


def _decode_fast(data: bytes, max_pixels: int, size: int) -> np.ndarray:
    """``fast_bilinear``: libjpeg-turbo into an array where it can, Pillow otherwise; OpenCV resizes."""
    img = _open(data, max_pixels)
    pixels = None
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        pixels = _turbo_jpeg(data, img, size)
        orientation = _exif_orientation(img)  # a JPEG's EXIF is in its header: Pillow has read it already
    if pixels is None:
        with _pillow_errors(img.format or "image"):
            img, orientation = _load(img, size)
            pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    import cv2

    height, width = pixels.shape[:2]
    if (height, width) != (size, size):
        # Shrinking by more than 2x: average areas, as bilinear would skip pixels and alias.
        shrink = min(size / width, size / height) < 0.5
        pixels = cv2.resize(
            pixels, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
    if orientation in _UPRIGHT:  # square: turning after resizing gives the same pixels, cheaper
        pixels = _NUMPY_UPRIGHT[orientation](pixels)
    return np.array(pixels, dtype=np.uint8, order="C")  # own, writable copy


def _turbo_jpeg(data: bytes, img: Image.Image, size: int) -> np.ndarray | None:
    """Decode with simplejpeg at Pillow's draft scale, or None to let Pillow try (it explains errors better)."""
    import simplejpeg

    width, height = img.size
    # Pillow's draft rule, so both paths give the same pixels: the largest of 1, 2, 4, 8 that is
    # at most min(width // size, height // size). (simplejpeg alone would also pick scales such
    # as 3/4, which libjpeg-turbo decodes slower than full size.)
    scale = 1
    while scale < 8 and scale * 2 <= min(width // size, height // size):
        scale *= 2
    try:
        return simplejpeg.decode_jpeg(
            data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale), strict=True
        )
    except Exception:  # noqa: BLE001 - strict libjpeg warnings, odd markers: Pillow decides
        return None


class _pillow_errors(contextlib.AbstractContextManager):
    """Turns whatever Pillow raises while opening or decoding into an ImageError with a short reason."""

    def __init__(self, fmt: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.fmt, self.max_pixels = fmt, max_pixels

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, ImageError) or not isinstance(e, Exception):
            return False
        if isinstance(e, Image.UnidentifiedImageError):
            raise ImageError("not an image file (unrecognised content)") from e
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            # Pillow's own check fired inside Image.open, before we saw the size.
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = f"{_megapixels(int(found[1]))} megapixels" if found else "decompression bomb"
            raise ImageError(f"too large: {pixels} (limit {_megapixels(self.max_pixels)} megapixels)") from e
        if isinstance(e, MemoryError):
            raise ImageError("out of memory while decoding") from e
        # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        if isinstance(e, OSError) and "not available" in str(e):  # "decoder xyz not available"
            raise ImageError(f"unsupported {self.fmt} encoding") from e
        raise ImageError(f"truncated or corrupt {self.fmt}") from e


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f}".rstrip("0").rstrip(".")


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a damaged EXIF block should not cost us otherwise good pixels
        return 1


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    """Bring any mode to "L" or "RGB" at full size (alpha flattened, high bit depth reduced)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode))
    if mode.endswith(("A", "a")) or "transparency" in img.info:  # RGBA LA PA RGBa La, tRNS
        rgba = img.convert("RGBA")  # also applies palette / tRNS transparency
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)
        return white
    if mode == "1":
        return img.convert("L")  # resizing mode "1" would silently fall back to nearest
    return img.convert("RGB")  # P, CMYK, YCbCr, RGBX, LAB, HSV


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        a = np.nan_to_num(a)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return (np.clip(a, 0.0, 255.0) + 0.5).astype(np.uint8)
    # 16-bit data (PNG/PPM/TIFF give "I;16*", or "I" holding 16-bit values):
    # keep the top byte, so 0..65535 maps monotonically onto 0..255.
    return (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
