"""retrain.images: every messy file becomes upright RGB pixels or a short ImageError reason."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import retrain.images as images_module
from retrain.images import (
    DECODE_VERSION,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    decode_image,
    decode_image_full,
    is_image_file_name,
    load_image,
    read_image_bytes,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def halves(size=(40, 20), left=RED, right=BLUE, mode="RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    img = Image.new(mode, size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A hand-made PNG, so a huge one costs only its header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_jpeg(size=(256, 256)) -> bytes:
    return encode(Image.effect_noise(size, 60).convert("RGB"), "JPEG", quality=90)


def close(pixel, colour, tol=12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)) <= tol))


def check_output(arr: np.ndarray, size: int) -> None:
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


# -- names ---------------------------------------------------------------------------------


def test_constants():
    assert {
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".jfif",
        ".ppm",
    } <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert isinstance(DECODE_VERSION, str) and DECODE_VERSION
    assert DEFAULT_MAX_PIXELS == 50_000_000


@pytest.mark.parametrize(
    "name", ["a.jpg", "b.JPG", "c.Png", "d.jpeg", "e.TIFF", "dir/f.webp", "caf\udce9.jpg"]
)
def test_image_names(name):
    assert is_image_file_name(name)


@pytest.mark.parametrize(
    "name", [".DS_Store", "Thumbs.db", "._IMG_0001.JPG", ".hidden.jpg", "notes.txt", "jpg", "a.jpg.part", "x"]
)
def test_not_image_names(name):
    assert not is_image_file_name(name)


# -- reading files -------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty file \(0 bytes\)$"):
        read_image_bytes(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="empty file"):
        decode_image(b"", 8)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="^file not found$"):
        load_image(tmp_path / "nope.jpg", 8)


def test_directory(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="^is a directory$"):
        read_image_bytes(tmp_path / "dir.jpg")


def test_broken_symlink(tmp_path):
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="^broken symbolic link$"):
        read_image_bytes(tmp_path / "link.jpg")


def test_symlink_loop(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(ImageError, match="^symbolic link loop$"):
        read_image_bytes(tmp_path / "a.jpg")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match="^not a regular file$"):
        read_image_bytes(tmp_path / "pipe.jpg")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads mode-000 files")
def test_permission_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(noise_jpeg())
    path.chmod(0)
    with pytest.raises(ImageError, match="^permission denied$"):
        read_image_bytes(path)


def test_file_size_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(bytes(3 * 2**20))
    with pytest.raises(ImageError, match=r"file too large: 3 MiB \(limit 1 MiB\)"):
        read_image_bytes(tmp_path / "big.png", max_bytes=2**20)


def test_non_utf8_file_name(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, encode(Image.new("RGB", (30, 20), RED), "JPEG"))
    os.close(fd)
    for path in (raw, os.fsdecode(raw)):
        arr = load_image(path, 16)
        check_output(arr, 16)
        assert close(arr[8, 8], RED)
    assert is_image_file_name(os.fsdecode(raw))


# -- content, not extension ----------------------------------------------------------------


def test_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture\n" * 50)
    with pytest.raises(ImageError, match=r"^not an image file \(unrecognised content\)$"):
        load_image(tmp_path / "notes.jpg", 8)


def test_eps_is_not_handed_to_ghostscript():
    with pytest.raises(ImageError, match="not an image file"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 8)


def test_png_named_jpg(tmp_path):
    (tmp_path / "really_a.jpg").write_bytes(encode(Image.new("RGB", (10, 10), BLUE), "PNG"))
    arr = load_image(tmp_path / "really_a.jpg", 4)
    check_output(arr, 4)
    assert (arr == BLUE).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt):
    data = noise_jpeg() if fmt == "JPEG" else encode(Image.effect_noise((256, 256), 60), "PNG")
    with pytest.raises(ImageError, match=f"^truncated or corrupt {fmt}$"):
        decode_image(data[: len(data) // 2], 8)
    decode_image(data, 8)  # the whole file is fine


def test_garbage_after_valid_header():
    data = bytearray(noise_jpeg())
    data[400:] = os.urandom(len(data) - 400)
    try:
        check_output(decode_image(bytes(data), 8), 8)  # libjpeg may conceal some damage...
    except ImageError as e:  # ...or give up, but only ever as an ImageError
        assert e.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF"])
def test_formats_decode_by_content(fmt):
    if fmt == "AVIF" and ".avif" not in IMAGE_EXTENSIONS:
        pytest.skip("Pillow built without AVIF")
    data = encode(halves(size=(32, 16)), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP", "AVIF") else {}))
    arr = decode_image(data, 8)
    check_output(arr, 8)
    assert close(arr[4, 1], RED, tol=40) and close(arr[4, 6], BLUE, tol=40)


# -- decompression bombs -------------------------------------------------------------------


def test_huge_png_rejected_from_header():
    # 30000x30000 with just the start of its pixel data: Pillow's own bomb check
    # fires inside Image.open; we still answer with an ImageError quickly.
    bomb = png(30000, 30000, 1, 0, zlib.compress(bytes(3751) * 8))
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^too large: 900 megapixels \(limit 50 megapixels\)$"):
        decode_image(bomb, 224)
    with pytest.raises(ImageError, match="too large"):
        decode_image_full(bomb)
    assert time.perf_counter() - start < 2


def test_own_pixel_limit_checked_before_decoding():
    # 60 megapixels: under Pillow's global limit, over ours.  Valid and cheap (1 bit/px).
    data = png(10000, 6000, 1, 0, zlib.compress(bytes(1 + 10000 // 8) * 6000, 1))
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^too large: 10000x6000 pixels \(limit 50 megapixels\)$"):
        decode_image(data, 224)
    assert time.perf_counter() - start < 0.5
    small = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match=r"too large: 100x100 pixels \(limit 0.01 megapixels\)"):
        decode_image(small, 8, max_pixels=9_999)
    check_output(decode_image(small, 8, max_pixels=10_000), 8)


# -- modes ---------------------------------------------------------------------------------


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    arr = decode_image(data, 8)
    check_output(arr, 8)
    assert close(arr[4, 4], RED, tol=2)


def test_animated_webp_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (BLUE, RED)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert close(decode_image(data, 8)[4, 4], BLUE, tol=2)


def test_cmyk_jpeg():
    # Pillow writes CMYK JPEGs Adobe-style (inverted), so this covers the inverted case.
    data = encode(halves(mode="CMYK", left=(0, 255, 255, 0), right=(255, 255, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image_full(data)
    assert img.mode == "RGB"
    assert close(img.getpixel((5, 10)), RED, tol=20)
    assert close(img.getpixel((35, 10)), BLUE, tol=20)
    check_output(decode_image(data, 8), 8)


def test_16bit_png_scaled_not_clipped():
    gradient = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (4, 1))  # 0..65535 in 256 steps
    data = encode(Image.fromarray(gradient), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    row = np.asarray(decode_image_full(data))[0]
    assert (row[:, 0] == np.arange(256)).all()  # monotonic, full 0..255 range
    assert (row[:, 0] == row[:, 2]).all()
    small = decode_image(data, 16)
    check_output(small, 16)
    assert (np.diff(small[0, :, 0].astype(int)) > 0).all()


def test_16bit_rgb_png():
    rgb16 = np.zeros((2, 2, 3), ">u2")
    rgb16[..., 0] = 0xFF00  # red, top byte 255
    rgb16[..., 2] = 0x8000  # blue, top byte 128
    rows = b"".join(b"\x00" + r.tobytes() for r in rgb16)
    assert (decode_image(png(2, 2, 16, 2, zlib.compress(rows)), 2) == (255, 0, 128)).all()


def test_float_tiff():
    data = encode(Image.fromarray(np.tile(np.linspace(0, 1, 11, dtype=np.float32), (2, 1))), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    row = np.asarray(decode_image_full(data))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row.astype(int)) > 0).all()


def test_palette_png_with_transparency():
    img = Image.new("P", (20, 10), 1)
    img.putpalette([0, 0, 0, *BLUE])
    img.paste(0, (0, 0, 10, 10))  # left half: index 0, transparent below
    data = encode(img, "PNG", transparency=0)
    full = decode_image_full(data)
    assert full.getpixel((2, 5)) == WHITE
    assert full.getpixel((17, 5)) == BLUE


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_composited_onto_white(mode):
    black = (0, 255) if mode == "LA" else (0, 0, 0, 255)
    img = Image.new(mode, (30, 10), black)
    img.paste((0, 0) if mode == "LA" else (0, 0, 0, 0), (0, 0, 10, 10))  # fully transparent
    img.paste((0, 128) if mode == "LA" else (0, 0, 0, 128), (10, 0, 20, 10))  # half transparent
    full = decode_image_full(encode(img, "PNG"))
    assert full.getpixel((5, 5)) == WHITE
    assert close(full.getpixel((15, 5)), (127, 127, 127), tol=2)
    assert full.getpixel((25, 5)) == (0, 0, 0)
    check_output(decode_image(encode(img, "PNG"), 8), 8)


def test_one_bit():
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (0, 0, 8, 16))
    full = np.asarray(decode_image_full(encode(img, "PNG")))
    assert set(np.unique(full)) == {0, 255}
    arr = decode_image(encode(img, "PNG"), 4)
    assert (arr[:, 0] == 255).all() and (arr[:, -1] == 0).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "PPM", "BMP"])
def test_grayscale(fmt):
    arr = decode_image(encode(Image.new("L", (12, 12), 100), fmt), 6)
    check_output(arr, 6)
    assert close(arr, 100, tol=1)


def test_ycbcr_tiff():
    data = encode(Image.new("RGB", (8, 8), RED).convert("YCbCr"), "TIFF")
    assert close(decode_image(data, 4)[0, 0], RED, tol=4)


# -- orientation and resizing --------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "red_on_top"), [(6, True), (8, False)])
def test_exif_rotation(orientation, red_on_top):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves(), "JPEG", exif=exif, quality=95)
    full = decode_image_full(data)
    assert full.size == (20, 40)  # portrait after rotating the 40x20 landscape
    top, bottom = full.getpixel((10, 5)), full.getpixel((10, 35))
    assert close(top, RED if red_on_top else BLUE, tol=30)
    assert close(bottom, BLUE if red_on_top else RED, tol=30)
    arr = decode_image(data, 16)
    assert close(arr[2, 8], RED if red_on_top else BLUE, tol=30)


def test_mirrored_orientation_png():
    exif = Image.Exif()
    exif[0x0112] = 2  # mirrored left-right
    full = decode_image_full(encode(halves(), "PNG", exif=exif))
    assert full.getpixel((5, 10)) == BLUE and full.getpixel((35, 10)) == RED


def test_output_is_whole_image_squashed():
    arr = decode_image(encode(halves(size=(400, 100)), "PNG"), 10)
    check_output(arr, 10)
    assert (arr[:, :4] == RED).all() and (arr[:, 6:] == BLUE).all()  # aspect not kept, nothing cropped
    assert arr.flags.writeable


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_resample_filters(resample):
    check_output(decode_image(noise_jpeg(), 7, resample=resample), 7)


def test_bad_arguments_are_programming_errors():
    with pytest.raises(ValueError, match="resample"):
        decode_image(noise_jpeg(), 8, resample="cubic-ish")
    with pytest.raises(ValueError, match="size"):
        decode_image(noise_jpeg(), 0)


def test_jpeg_draft_decodes_at_reduced_scale(monkeypatch):
    """Pillow's filters: libjpeg decodes a big JPEG at 1/2, 1/4 or 1/8 scale via ``draft``."""
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    img = Image.new("RGB", (4000, 3000), BLUE)
    img.paste(RED, (0, 0, 2000, 3000))
    data = encode(img, "JPEG", quality=85)
    start = time.perf_counter()
    arr = decode_image(data, 224, resample="bilinear")
    assert time.perf_counter() - start < 1
    check_output(arr, 224)
    assert close(arr[100, 50], RED) and close(arr[100, 180], BLUE)
    assert drafted == [(500, 375)]  # 1/8 scale, still >= 224 both ways
    decode_image(data, 400, resample="bilinear")
    assert drafted[-1] == (1000, 750)  # 1/4: 1/8 would be smaller than 400
    assert decode_image_full(data).size == (4000, 3000)  # no draft there


def test_fast_path_decodes_big_jpeg_at_draft_scale(monkeypatch):
    """The default filter decodes with libjpeg-turbo at the same reduced scale that draft picks."""
    import simplejpeg

    shapes = []
    real = simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    img = Image.new("RGB", (4000, 3000), BLUE)
    img.paste(RED, (0, 0, 2000, 3000))
    data = encode(img, "JPEG", quality=85)
    arr = decode_image(data, 224)
    check_output(arr, 224)
    assert close(arr[100, 50], RED) and close(arr[100, 180], BLUE)
    assert shapes == [(375, 500, 3)]
    decode_image(data, 400)
    assert shapes[-1] == (750, 1000, 3)
    decode_image(encode(Image.new("RGB", (300, 300)), "JPEG"), 224)
    assert shapes[-1] == (300, 300, 3)  # not 3/4 scale: libjpeg-turbo decodes that slower than 1/1


def _without_turbo(monkeypatch, data: bytes, size: int) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(images_module, "_turbo_jpeg", lambda *a: None)
        return decode_image(data, size)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["rgb", "grey", "progressive", "444", "big"])
def test_fast_path_equals_pillow_decoding(monkeypatch, kind, orientation):
    """libjpeg-turbo via simplejpeg gives exactly Pillow's pixels, EXIF rotation included."""
    size = (1000, 700) if kind == "big" else (300, 200)
    img = Image.effect_noise(size, 50).convert("RGB")
    img.paste(RED, (0, 0, size[0] // 3, size[1] // 2))
    options = {"quality": 88}
    if kind == "grey":
        img = img.convert("L")
    if kind == "progressive":
        options["progressive"] = True
    if kind == "444":
        options["subsampling"] = 0
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", exif=exif.tobytes(), **options)
    fast = decode_image(data, 224)
    check_output(fast, 224)
    assert np.array_equal(fast, _without_turbo(monkeypatch, data, 224))
    # and upright: where Pillow's own resize and transpose put things, in 28 x 28 blocks
    slow = decode_image(data, 224, resample="bilinear")
    blocks = [a.reshape(8, 28, 8, 28, 3).mean(axis=(1, 3)) for a in (fast, slow)]
    assert np.abs(blocks[0] - blocks[1]).max() < 8


def test_numpy_transposes_match_pillow():
    a = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for orientation, transpose in images_module._UPRIGHT.items():
        want = np.asarray(Image.fromarray(a).transpose(transpose))
        assert np.array_equal(images_module._NUMPY_UPRIGHT[orientation](a), want), orientation


def test_fast_path_falls_back_to_pillow(monkeypatch):
    """CMYK JPEGs, and JPEGs that libjpeg-turbo's strict mode refuses, still decode (through Pillow)."""
    cmyk = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")
    assert close(decode_image(cmyk, 32)[16, 16], RED, tol=30)
    # Junk between markers is a libjpeg warning: strict simplejpeg refuses it, Pillow decodes it.
    good = encode(halves((64, 32)), "JPEG", quality=95)
    sos = good.index(b"\xff\xda")
    junk = good[:sos] + b"\x00\x00" + good[sos:]
    arr = decode_image(junk, 32)
    assert close(arr[16, 4], RED) and close(arr[16, 28], BLUE)


def test_fast_path_averages_when_shrinking_a_lot():
    """Shrinking a PNG (no draft) 10x must average, not skip: 1-px stripes become even grey."""
    stripes = np.zeros((2240, 2240, 3), np.uint8)
    stripes[::2] = 255
    arr = decode_image(encode(Image.fromarray(stripes), "PNG"), 224)
    assert abs(float(arr.mean()) - 127.5) < 2 and arr.std() < 2
    assert (
        abs(float(decode_image(encode(Image.fromarray(stripes[:300, :300]), "PNG"), 224).mean()) - 127.5) < 10
    )


def test_fast_bilinear_close_to_pillow_bilinear():
    data = encode(Image.linear_gradient("L").resize((300, 300)).convert("RGB"), "JPEG", quality=95)
    fast = decode_image(data, 224).astype(int)
    slow = decode_image(data, 224, resample="bilinear").astype(int)
    assert np.abs(fast - slow).mean() < 1.5


def test_thread_pool_matches_serial():
    blobs = [noise_jpeg(), encode(halves(mode="RGBA"), "PNG"), encode(Image.new("L", (50, 30), 7), "GIF")]
    blobs *= 4
    serial = [decode_image(b, 32) for b in blobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: decode_image(b, 32), blobs))
    assert all((s == p).all() for s, p in zip(serial, parallel, strict=True))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF
@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff",  # JPEG magic only
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,  # PNG magic, broken header
        b"GIF89a\x10\x00",
        b"BM" + b"\xff" * 60,
        b"II*\x00" + b"\xff" * 60,
        b"RIFF\x10\x00\x00\x00WEBPVP8 ",
    ],
)
def test_corrupt_headers_only_raise_image_error(data):
    with pytest.raises(ImageError):
        decode_image(data, 8)
