"""Messy folders: every bad input gets one clear line, the run goes on, and no traceback ever reaches the user.

The headline test trains the real backbone on the bundled photos twice, once clean and once mixed with every kind
of bad file, and checks that the two models are the same. The other tests use the tiny stand-in backbone.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

import retrain
from conftest import SAMPLE_PHOTOS, TINY, make_image_folder
from retrain.data import TRAINING, which_split
from retrain.errors import DatasetError, SkippedFilesError

TESTS = Path(__file__).resolve().parent


# -- helpers ----------------------------------------------------------------------------------


def cli(main: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``retrain`` / ``label_image`` in a fresh interpreter (the tiny backbone is registered there too)."""
    return cli_many(main, [list(args)], cwd=cwd, env=env)[0]


def cli_many(main: str, arg_lists: list[list[str]], *, cwd: Path, env: dict | None = None, at_once: int = 4):
    """Several independent command lines, a few at a time (most of each is interpreter start-up)."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; "
        f"from retrain.cli import {main}; sys.exit({main}())"
    )
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    runs = []
    for start in range(0, len(arg_lists), at_once):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for args in arg_lists[start : start + at_once]
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            runs.append(
                subprocess.CompletedProcess(
                    proc.args, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
                )
            )
    for run in runs:
        assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    return runs


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG made by hand: a few kB on disk, width*height pixels once decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def add_bad_files(cls: Path, photo: Path) -> dict[str, str]:
    """Put every kind of unusable file into class folder ``cls``; returns {file name: expected reason (regex)}."""
    good = photo.read_bytes()
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cls / "notes.jpg").write_text("<html>this page was saved as .jpg</html>\n")
    (cls / "bomb.png").write_bytes(blank_png(30000, 30000))  # 900 megapixels, 110 kB on disk
    (cls / "huge.png").write_bytes(blank_png(10000, 10000))  # 100 MP: over our limit, under Pillow's own
    os.mkfifo(cls / "fifo.jpg")  # what an unreadable file looks like to root, who can read mode-000 files
    (cls / "broken.jpg").symlink_to(cls / "deleted.jpg")
    (cls / "loop_a.jpg").symlink_to(cls / "loop_b.jpg")
    (cls / "loop_b.jpg").symlink_to(cls / "loop_a.jpg")
    with open(os.fsencode(cls) + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 name, and not an image either
        f.write(b"GIF89a but cut short")
    return {
        "zero.jpg": r"empty file \(0 bytes\)",
        "truncated.jpg": "truncated or corrupt JPEG",
        "notes.jpg": r"not an image file \(unrecognised content\)",
        "bomb.png": r"too large: 900 megapixels \(limit 50 megapixels\)",
        "huge.png": r"too large: 10000x10000 pixels \(limit 50 megapixels\)",
        "fifo.jpg": "not a regular file",
        "broken.jpg": "broken symbolic link",
        "loop_a.jpg": "symbolic link loop",
        "loop_b.jpg": "symbolic link loop",
        "caf\\xe9.jpg": r"not an image file \(unrecognised content\)",
    }


def add_litter(root: Path, cls: Path) -> None:
    """Files that are not images and must be passed over quietly (or with one notice)."""
    (cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cls / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (cls / ".hidden.jpg").write_bytes(b"junk")
    (cls / "Thumbs.db").write_bytes(b"junk")
    (cls / "readme.txt").write_text("scraped from the web")
    (cls / "folder.jpg").mkdir()  # a directory named like an image is just a (here empty) sub-folder
    (root / ".DS_Store").write_bytes(b"junk")
    shutil.copy(sorted(cls.glob("[!.]*.jpg"))[0], root / "stray.jpg")
    (root / "empty_class").mkdir()
    (root / "junk_class").mkdir()
    (root / "junk_class" / "zero.jpg").write_bytes(b"")


def skipped_lines(stdout: str) -> dict[str, str]:
    """{path: reason} from the "Skipped PATH: REASON" lines."""
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"WARNING: Skipped (.+?\.\w+): (.+)$", line)
        if m:
            assert m[1] not in found, f"reported twice: {line}"
            found[m[1]] = m[2]
    return found


def final_accuracy(stdout: str) -> float:
    return float(re.search(r"^Final test accuracy = ([\d.]+)%", stdout, re.M)[1])


def head_weights(model_path: Path) -> np.ndarray:
    model = onnx.load(str(model_path))
    return next(
        numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "final_retrain_ops/weights"
    )


# -- the headline test: a messy copy of the sample photos trains exactly like the clean one ----------


def make_messy(root: Path) -> dict[str, str]:
    """Bad files in two classes, litter elsewhere; returns {path: expected reason} of the files to skip."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    expected = {}
    for cls in classes[:2]:
        photo = sorted(cls.glob("*.jpg"))[0]
        expected.update({f"{cls}/{name}": why for name, why in add_bad_files(cls, photo).items()})
    expected[f"{root}/junk_class/zero.jpg"] = r"empty file \(0 bytes\)"
    add_litter(root, classes[2])
    return expected


def training_name(cls: Path, name: str) -> str:
    """``name`` with a numeric suffix that puts it in the training split, so the test set stays the same."""
    stem, ext = os.path.splitext(name)
    return next(
        f"{stem}_{i}{ext}"
        for i in range(100)
        if which_split(f"{cls.name}/{stem}_{i}{ext}", 10, 10) == TRAINING
    )


def add_fine_oddities(root: Path) -> list[str]:
    """Odd-looking but fine copies of training photos, and one photo in two classes; returns their paths."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith("_class"))
    added = []

    def a_training_photo(cls: Path) -> Path:
        return next(
            cls / p.name
            for p in sorted((SAMPLE_PHOTOS / cls.name).glob("*.jpg"))
            if which_split(f"{cls.name}/{p.name}", 10, 10) == TRAINING
        )

    cls = classes[3]
    for name, data in odd_but_readable(Image.open(a_training_photo(cls)), size=(320, 240)).items():
        added.append(str(cls / training_name(cls, name)))
        Path(added[-1]).write_bytes(data)
    added.append(str(classes[1] / training_name(classes[1], "duplicate.jpg")))
    shutil.copy(a_training_photo(classes[0]), added[-1])
    return added


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory):
    """The bundled photos trained with the real backbone, sharing one bottleneck cache: clean; with every kind
    of unusable file and litter ("messy"); and messy plus odd-but-fine files and a duplicate ("everything")."""
    tmp = tmp_path_factory.mktemp("sample_runs")
    clean = shutil.copytree(SAMPLE_PHOTOS, tmp / "clean")
    messy = shutil.copytree(SAMPLE_PHOTOS, tmp / "messy")
    everything = shutil.copytree(SAMPLE_PHOTOS, tmp / "everything")
    expected = make_messy(messy)
    make_messy(everything)
    add_fine_oddities(everything)
    common = [
        "--how_many_training_steps",
        "300",
        "--seed",
        "3",
        "--quiet",
        "--bottleneck_dir",
        str(tmp / "bn"),
    ]
    runs = {}
    for name, folder in (("clean", clean), ("messy", messy), ("everything", everything)):
        runs[name] = cli(
            "retrain_main",
            "--image_dir",
            str(folder),
            "--output_dir",
            str(tmp / f"out_{name}"),
            *common,
            cwd=tmp,
        )
    runs["strict"] = cli(
        "retrain_main",
        "--image_dir",
        str(messy),
        "--output_dir",
        str(tmp / "out_strict"),
        "--strict",
        *common,
        cwd=tmp,
    )
    return tmp, runs, expected


def test_messy_folder_trains_to_the_same_model_as_the_clean_one(sample_runs):
    tmp, runs, expected = sample_runs
    clean, messy = runs["clean"], runs["messy"]
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert messy.returncode == 0, messy.stdout + messy.stderr
    assert final_accuracy(messy.stdout) == final_accuracy(clean.stdout) >= 85.0
    clean_labels = (tmp / "out_clean" / "output_labels.txt").read_text()
    assert (tmp / "out_messy" / "output_labels.txt").read_text() == clean_labels
    # Same images, split and seed: the very same new layer, bit for bit.
    assert np.array_equal(
        head_weights(tmp / "out_messy" / "output_graph.onnx"),
        head_weights(tmp / "out_clean" / "output_graph.onnx"),
    )
    metrics = json.loads((tmp / "out_messy" / "metrics.json").read_text())
    assert metrics["skipped_files"] == len(expected)


def test_folder_with_every_case_trains_to_the_same_accuracy(sample_runs):
    """Unusable files, litter, odd-but-fine formats and a photo in two classes, all in one folder."""
    tmp, runs, expected = sample_runs
    run, clean = runs["everything"], runs["clean"]
    assert run.returncode == 0, run.stdout + run.stderr
    # The same test images; the extra training copies may move the result by at most one test image.
    n_test = int(re.search(r"^Final test accuracy = [\d.]+% \(N=(\d+)", clean.stdout, re.M)[1])
    assert abs(final_accuracy(run.stdout) - final_accuracy(clean.stdout)) <= 100 / n_test + 0.1
    assert final_accuracy(run.stdout) >= 85.0
    assert (tmp / "out_everything" / "output_labels.txt").read_text() == (
        tmp / "out_clean" / "output_labels.txt"
    ).read_text()
    messy, everything = str(tmp / "messy"), str(tmp / "everything")
    assert sorted(skipped_lines(run.stdout)) == sorted(p.replace(messy, everything) for p in expected)
    assert f"Skipped {len(expected)} file(s) that could not be used" in run.stdout
    assert re.search(r"The same image is in 2 classes: animals/.*\.jpg, fish/duplicate_\d+\.jpg", run.stdout)
    # Only the training set grew (by the 11 odd-but-fine files and the duplicate).
    assert (
        json.loads((tmp / "out_everything" / "metrics.json").read_text())["train_count"]
        == json.loads((tmp / "out_clean" / "metrics.json").read_text())["train_count"] + 12
    )


def test_each_bad_file_gets_one_line_with_its_reason_and_a_summary(sample_runs):
    tmp, runs, expected = sample_runs
    out = runs["messy"].stdout
    reported = skipped_lines(out)
    assert sorted(reported) == sorted(expected)
    for path, reason in reported.items():
        assert re.fullmatch(expected[path], reason), (path, reason)
    assert f"Skipped {len(expected)} file(s) that could not be used" in out
    # The summary comes after every per-file line, and again at the very end of the run.
    assert out.rindex("Skipped /") < out.index(f"Skipped {len(expected)} file(s)")
    assert f"{len(expected)} file(s) could not be used and were skipped" in out.splitlines()[-2]


def test_litter_is_passed_over_with_notices_not_errors(sample_runs):
    tmp, runs, _ = sample_runs
    out = runs["messy"].stdout
    assert re.search(r"ignored 1 file\(s\) at the top level of .*messy .*stray\.jpg", out)
    assert "class 'empty_class' has no images; it is left out" in out
    assert "class 'junk_class' has no readable images; it is left out" in out
    assert "ignored 1 file(s) without an image extension" in out  # readme.txt; Thumbs.db is litter
    for name in (".DS_Store", "._IMG_0001.jpg", ".hidden.jpg", "folder.jpg"):
        assert name not in out


def test_strict_turns_skipped_files_into_a_failure(sample_runs):
    tmp, runs, expected = sample_runs
    run = runs["strict"]
    assert run.returncode == 3
    assert f"--strict: {len(expected)} file(s) could not be used" in run.stderr
    assert len(skipped_lines(run.stdout)) == len(expected)  # the list is still printed
    assert not (tmp / "out_strict" / "output_graph.onnx").exists()


@pytest.mark.slow
def test_decompression_bombs_do_not_cost_memory(tmp_path: Path):
    """900 and 100 megapixel images are refused from their header: the run's peak memory stays put."""
    images = make_image_folder(tmp_path / "images", per_class=4, size=32)

    def peak_mib(folder: Path, tag: str) -> float:
        code = (
            f"import sys, resource; sys.path.insert(0, {str(TESTS)!r}); import conftest; "
            "from retrain.cli import retrain_main; rc = retrain_main(); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)"
        )
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "--image_dir",
                str(folder),
                "--architecture",
                TINY,
                "--output_dir",
                str(tmp_path / tag),
                "--bottleneck_dir",
                str(tmp_path / "bn"),
                "--model_dir",
                str(tmp_path / "models"),
                "--how_many_training_steps",
                "20",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return float(re.search(r"^PEAK ([\d.]+)", run.stdout, re.M)[1]), run.stdout

    base, _ = peak_mib(images, "base")
    (images / "red" / "bomb.png").write_bytes(blank_png(30000, 30000))
    (images / "blue" / "huge.png").write_bytes(blank_png(10000, 10000))
    peak, out = peak_mib(images, "bombs")
    assert "bomb.png: too large: 900 megapixels" in out and "huge.png: too large: 10000x10000 pixels" in out
    # Decoding either one would take 100 to 2700 MiB.
    assert peak - base < 60, (base, peak)


# -- files that look odd but are fine: all of them are used -------------------------------------------


def odd_but_readable(base: Image.Image, size=(48, 40)) -> dict[str, bytes]:
    """Files that look odd but hold a fine picture of ``base``: {file name: content}."""
    small = base.convert("RGB").resize(size)
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    grey16 = np.asarray(small.convert("L"), np.uint16) * 257
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    return {
        "png_named.jpg": encode(small, "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "cmyk.jpg": encode(small.convert("CMYK"), "JPEG"),
        "grey16.png": encode(Image.fromarray(grey16), "PNG"),
        "rgb16.png": _png16_rgb(np.asarray(small)),
        "palette_alpha.png": encode(palette, "PNG", transparency=0),
        "la.png": encode(small.convert("LA"), "PNG"),
        "rgba.png": encode(small.convert("RGBA"), "PNG"),
        "one_bit.png": encode(small.convert("1"), "PNG"),
        "exif_rotated.jpg": encode(small.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif),
        os.fsdecode(b"b\xe4r.jpg"): encode(small, "JPEG"),  # a Latin-1 file name
    }


def _png16_rgb(rgb8: np.ndarray) -> bytes:
    h, w, _ = rgb8.shape
    px = rgb8.astype(">u2") * 257
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_odd_formats_are_all_used_and_duplicates_reported(
    tmp_path: Path, colour_dir: Path, fast_config, caplog
):
    red = Image.open(next((colour_dir / "red").glob("*.jpg")))
    names = odd_but_readable(red)
    for name, data in names.items():
        (colour_dir / "red" / name).write_bytes(data)
    shutil.copy(colour_dir / "red" / "img_000.jpg", colour_dir / "green" / "copy_of_red.jpg")
    caplog.set_level("INFO", logger="retrain")
    result = retrain.train(colour_dir, **fast_config)
    assert result.skipped == {}
    assert f"Found {36 + len(names) + 1} images in 3 classes" in caplog.text
    assert re.search(
        r"The same image is in 2 classes: green/copy_of_red\.jpg, red/img_000\.jpg|"
        r"red/img_000\.jpg, green/copy_of_red\.jpg",
        caplog.text,
    )
    assert result.test_accuracy is not None


def test_exif_rotation_is_applied_when_classifying(sample_runs, tmp_path: Path):
    """A photo stored sideways with an EXIF Orientation tag reaches the network upright."""
    tmp, runs, _ = sample_runs
    clf = retrain.load(tmp / "out_clean" / "output_graph.onnx")
    photo = Image.open(sorted((SAMPLE_PHOTOS / "animals").glob("*.jpg"))[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = photo.transpose(Image.Transpose.ROTATE_90)
    upright = clf.to_pixels(encode(photo, "JPEG", quality=95)).astype(int)
    tagged = clf.to_pixels(encode(sideways, "JPEG", quality=95, exif=exif)).astype(int)
    untagged = clf.to_pixels(encode(sideways, "JPEG", quality=95)).astype(int)
    assert np.abs(tagged - upright).mean() < 3 < np.abs(untagged - upright).mean()


# -- classes -------------------------------------------------------------------------------------------


def test_class_names_are_kept_exactly_and_never_merged(tmp_path: Path, fast_config):
    names = {
        "red roses": (220, 30, 30),
        "Grün 緑": (30, 200, 40),
        "sky": (30, 40, 220),
        "Sky": (200, 200, 40),
    }
    images = make_image_folder(tmp_path / "images", classes=names)
    result = retrain.train(images, **fast_config)
    assert result.labels == sorted(names)
    assert result.output_labels.read_text(encoding="utf-8").splitlines() == sorted(names)
    clf = retrain.load(result.output_graph)
    assert clf.labels == sorted(names)
    for name in names:
        assert clf.classify(images / name / "img_000.jpg")[0][0].label == name


def test_non_utf8_class_name_gets_an_escaped_label(tmp_path: Path, fast_config, caplog):
    images = make_image_folder(tmp_path / "images", per_class=6)
    os.rename(images / "red", os.fsencode(images) + b"/rouge \xe9")
    result = retrain.train(images, **fast_config)
    assert result.labels == ["blue", "green", "rouge \\xe9"]
    assert result.output_labels.read_text(encoding="utf-8").splitlines() == result.labels
    assert "its name is not valid UTF-8" in caplog.text
    assert retrain.load(result.output_graph).labels == result.labels


def test_empty_tiny_and_normal_classes(tmp_path: Path, fast_config, caplog):
    images = make_image_folder(
        tmp_path / "images", per_class=10, classes={"red": (220, 30, 30), "green": (30, 200, 40)}
    )
    make_image_folder(images, per_class=1, classes={"one": (30, 40, 220)}, seed=1)
    make_image_folder(images, per_class=2, classes={"two": (200, 200, 40)}, seed=2)
    (images / "empty").mkdir()
    caplog.set_level("INFO", logger="retrain")
    result = retrain.train(images, **fast_config)
    assert result.labels == ["green", "one", "red", "two"]
    assert "class 'empty' has no images; it is left out" in caplog.text
    assert "class 'one' has only 1 image(s): all are used for training" in caplog.text
    assert "class 'two' has only 2 image(s): all are used for training" in caplog.text
    assert result.test_count >= 2


def test_only_one_class_is_a_clear_error(tmp_path: Path, fast_config):
    images = make_image_folder(tmp_path / "images", classes={"cats": (200, 100, 50)})
    with pytest.raises(DatasetError, match=r"need images in at least 2 class folders .* found 1 \('cats'\)"):
        retrain.train(images, **fast_config)
    # Two classes, but one of them holds only unusable files: the same error, after the skipped list.
    (images / "dogs").mkdir()
    (images / "dogs" / "zero.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="found 1"):
        retrain.train(images, **fast_config)


def test_permission_denied_file_is_skipped(
    tmp_path: Path, colour_dir: Path, fast_config, monkeypatch, caplog
):
    """Root can read mode-000 files, so a refused open() is simulated; as another user chmod 000 is real."""
    secret = colour_dir / "red" / "secret.jpg"
    shutil.copy(colour_dir / "red" / "img_000.jpg", secret)
    secret.write_bytes(secret.read_bytes() + b"x")  # its own content, so no cached copy stands in for it
    secret.chmod(0)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.fsdecode(path) == str(secret):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    result = retrain.train(colour_dir, **fast_config)
    assert result.skipped == {str(secret): "permission denied"}
    assert f"Skipped {secret}: permission denied" in caplog.text
    with pytest.raises(SkippedFilesError, match="--strict: 1 file"):
        retrain.train(colour_dir, strict=True, **fast_config)


# -- the command line: a clear message and a documented exit code, never a traceback ------------------


@pytest.mark.slow
def test_command_line_errors_are_one_clear_line(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", per_class=4, size=32)
    one = make_image_folder(tmp_path / "one", per_class=4, classes={"cats": (200, 100, 50)}, size=32)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    base = [
        "--architecture",
        TINY,
        "--bottleneck_dir",
        str(tmp_path / "bn"),
        "--model_dir",
        str(tmp_path / "m"),
        "--how_many_training_steps",
        "10",
        "--quiet",
    ]
    cases = [
        (["--image_dir", str(tmp_path / "nope")], 2, "does not exist"),
        (["--image_dir", str(tmp_path / "a_file")], 2, "is a file"),
        (["--image_dir", str(tmp_path / "empty")], 2, "need images in at least 2 class folders"),
        (["--image_dir", str(one)], 2, r"found 1 \('cats'\)"),
        (["--image_dir", str(images), "--testing_percentage", "150"], 2, "between 0 and 100"),
        (["--image_dir", str(images), "--architecture", "resnet_9000"], 2, "unknown backbone"),
        (
            ["--image_dir", str(images), "--output_dir", str(tmp_path / "a_file" / "out")],
            2,
            "cannot write to",
        ),
        (
            ["--image_dir", str(images), "--bottleneck_dir", str(tmp_path / "a_file" / "bn")],
            2,
            "cannot use --bottleneck_dir",
        ),
        (["--image_dir", str(images), "--how_many_trainig_steps", "5"], 2, "did you mean"),
    ]
    runs = cli_many(
        "retrain_main",
        [[*base, "--output_dir", str(tmp_path / f"out{i}"), *extra] for i, (extra, _, _) in enumerate(cases)],
        cwd=tmp_path,
    )
    for (extra, code, message), run in zip(cases, runs):
        assert run.returncode == code, (extra, run.stdout, run.stderr)
        assert re.search(message, run.stderr), (extra, run.stderr)


@pytest.mark.slow
def test_label_image_reports_bad_models_and_bad_images(tmp_path: Path, colour_dir: Path, fast_config):
    result = retrain.train(colour_dir, **fast_config)
    model, labels = result.output_graph, result.output_labels
    good = colour_dir / "red" / "img_000.jpg"
    bad = tmp_path / "bad_images"
    bad.mkdir()
    expected = add_bad_files(bad, good)
    not_models = {
        "text.onnx": b"hello",
        "empty.onnx": b"",
        "photo.onnx": good.read_bytes(),
        "half.onnx": model.read_bytes()[: model.stat().st_size // 2],
    }
    for name, data in not_models.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "short_labels.txt").write_text("red\ngreen\n")
    cases = [
        (["--graph", str(tmp_path / "text.onnx")], "not an ONNX model written by retrain"),
        (["--graph", str(tmp_path / "empty.onnx")], r"is empty \(0 bytes\)"),
        (["--graph", str(tmp_path / "photo.onnx")], "not an ONNX model written by retrain"),
        (["--graph", str(tmp_path / "half.onnx")], "not an ONNX model written by retrain"),
        (["--graph", str(labels)], "not an ONNX model written by retrain"),
        (["--graph", str(tmp_path / "missing.onnx")], "does not exist"),
        (
            ["--graph", str(model), "--labels", str(tmp_path / "short_labels.txt")],
            r"has 2 line\(s\), but the model has 3 outputs",
        ),
        (["--graph", str(model), "--labels", str(tmp_path / "missing.txt")], "cannot read labels file"),
    ]
    runs = cli_many("label_image_main", [[*args, "--image", str(good)] for args, _ in cases], cwd=tmp_path)
    for (args, message), run in zip(cases, runs):
        assert run.returncode == 2, (args, run.stderr)
        assert re.search(message, run.stderr), (args, run.stderr)
    # Unreadable images: one line each, the others are still classified, exit code 3.
    run = cli(
        "label_image_main",
        "--graph",
        str(model),
        "--json",
        "--image",
        str(good),
        str(bad),
        str(tmp_path / "gone.jpg"),
        str(good),
        cwd=tmp_path,
    )
    assert run.returncode == 3, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    errors = {Path(r["image"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == set(expected) | {"gone.jpg"}
    assert errors["gone.jpg"] == "file not found"
    for name, reason in expected.items():
        assert re.fullmatch(reason, errors[name]), (name, errors[name])
    ok = [r for r in rows if "predictions" in r]
    assert len(ok) == 2 and all(r["predictions"][0]["label"] == "red" for r in ok)
    # `label_image ... | head -1` where head has already gone: exit 141, quietly.
    code = "import sys; from retrain.cli import label_image_main; sys.exit(label_image_main())"
    for flags in ([], ["--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "--graph", str(model), *flags, "--image", str(good), str(good)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 141, err
        assert err == "", err


@pytest.mark.slow
def test_unprintable_names_and_closed_pipes_never_show_a_traceback(tmp_path: Path):
    images = make_image_folder(
        tmp_path / "images", per_class=4, size=32, classes={"Grün 緑": (30, 200, 40), "red": (220, 30, 30)}
    )
    with open(os.fsencode(images) + b"/red/caf\xe9.jpg", "wb") as f:
        f.write(b"not an image")
    args = [
        "--image_dir",
        str(images),
        "--architecture",
        TINY,
        "--bottleneck_dir",
        str(tmp_path / "bn"),
        "--model_dir",
        str(tmp_path / "m"),
        "--output_dir",
        str(tmp_path / "out"),
        "--how_many_training_steps",
        "10",
        "--quiet",
    ]
    # A terminal that can only show ASCII: names are escaped, not fatal.
    run = cli("retrain_main", *args, cwd=tmp_path, env={"PYTHONIOENCODING": "ascii"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Gr\\xfcn \\u7dd1" in run.stdout and "caf\\xe9.jpg: not an image file" in run.stdout
    # `retrain ... | head -1`: the run still finishes and writes its model, quietly.
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; "
        "from retrain.cli import retrain_main; sys.exit(retrain_main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader went away before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert (tmp_path / "out" / "output_graph.onnx").exists()
