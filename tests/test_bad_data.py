"""Bad training data: every odd image is converted correctly (pixel values checked) or skipped with a
per-file reason in the run log, and the run goes on."""

from __future__ import annotations

import io
import json
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedtrain.data import DataError, open_image, scan_folder

RES = 32
RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)


def rgb(path, res=RES) -> np.ndarray:
    return np.asarray(open_image(Path(path), res)[0], dtype=np.int16)


def close(pixel, colour, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


# ---------------------------------------------------------------- EXIF orientation
def quadrants(size=RES) -> np.ndarray:
    a = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:] = RED, GREEN, BLUE, YELLOW
    return a


# How a viewer must transform the stored pixels for each EXIF orientation (EXIF 2.3, tag 0x0112),
# written with numpy only, independent of PIL.
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                       # mirrored left-right
    3: lambda a: a[::-1, ::-1],                    # rotated 180
    4: lambda a: a[::-1, :],                       # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),             # transposed
    6: lambda a: np.rot90(a, -1),                  # rotate 90 clockwise to view
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
    8: lambda a: np.rot90(a, 1),                   # rotate 90 counter-clockwise to view
}


def quadrant_colours(a: np.ndarray) -> list:
    q = a.shape[0] // 4
    return [tuple(int(v) for v in a[y, x]) for y, x in ((q, q), (q, 3 * q), (3 * q, q), (3 * q, 3 * q))]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_really_rotates(tmp_path, orientation, fmt):
    stored = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    Image.fromarray(stored).save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as im:
        assert im.getexif().get(0x0112) == orientation  # the tag really is in the file
    got = quadrant_colours(rgb(path))
    want = quadrant_colours(DISPLAY[orientation](stored))
    assert all(close(g, w, 40) for g, w in zip(got, want)), (orientation, got, want)
    if orientation != 1:  # and it is not the stored picture
        assert not all(close(g, w, 40) for g, w in zip(got, quadrant_colours(stored)))


# ---------------------------------------------------------------- modes
def png16(path, w, h, colour_type, pixel: tuple) -> Path:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour PNGs)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    row = b"\0" + struct.pack(f">{len(pixel)}H", *pixel) * w
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b""))
    return path


def test_cmyk_jpeg_becomes_the_right_rgb(tmp_path):
    Image.new("CMYK", (RES, RES), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # C0 M100 Y100 K0 = red
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    assert close(rgb(tmp_path / "cmyk.jpg")[5, 5], RED, 16)


def test_transparency_is_composited_on_white(tmp_path):
    a = np.zeros((RES, RES, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 255)        # opaque red
    a[:, 10:20] = (0, 0, 0, 0)          # fully transparent black: must become white, not black
    a[:, 20:] = (0, 0, 255, 128)        # half-transparent blue over white
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    out = rgb(tmp_path / "rgba.png")
    assert close(out[16, 4], RED) and close(out[16, 15], WHITE) and close(out[16, 27], (127, 127, 255), 4)

    la = np.zeros((RES, RES, 2), np.uint8)
    la[:, :16] = (0, 255)               # opaque black
    la[:, 16:] = (0, 0)                 # transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = rgb(tmp_path / "la.png")
    assert close(out[16, 4], (0, 0, 0)) and close(out[16, 28], WHITE)

    p = Image.new("P", (RES, RES), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (16, 0, RES, RES))       # right half: palette index 1 (green) ...
    p.save(tmp_path / "p_index.png", transparency=1)  # ... which is the transparent index
    out = rgb(tmp_path / "p_index.png")
    assert close(out[16, 4], RED) and close(out[16, 28], WHITE)

    p.save(tmp_path / "p_alpha.png", transparency=bytes([255, 64]))  # tRNS: per-entry alpha
    out = rgb(tmp_path / "p_alpha.png")
    assert close(out[16, 4], RED) and close(out[16, 28], (191, 255, 191), 4)  # 25% green over white

    Image.new("P", (RES, RES), 0).save(tmp_path / "p_plain.png")  # a palette without transparency stays as is
    assert close(rgb(tmp_path / "p_plain.png")[4, 4], (0, 0, 0))


def test_16_bit_images_keep_their_range(tmp_path):
    g = np.zeros((RES, RES), np.uint16)
    g[:, :10], g[:, 10:20], g[:, 20:] = 200, 32768, 65535
    Image.fromarray(g).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    out = rgb(tmp_path / "g16.png")
    assert tuple(out[16, 4]) == (1, 1, 1)        # 200 / 65535: nearly black, not 200
    assert close(out[16, 15], (128, 128, 128), 1) and tuple(out[16, 28]) == WHITE
    dark = np.full((RES, RES), 200, np.uint16)   # a wholly dark 16-bit picture stays dark
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert tuple(rgb(tmp_path / "dark16.png")[16, 16]) == (1, 1, 1)
    out = rgb(png16(tmp_path / "rgb16.png", RES, RES, 2, (65535, 32768, 0)))
    assert close(out[16, 16], (255, 128, 0), 1)
    out = rgb(png16(tmp_path / "rgba16.png", RES, RES, 6, (0, 0, 65535, 0)))  # transparent blue
    assert close(out[16, 16], WHITE, 1)


def test_grayscale_and_bilevel_become_grey_rgb(tmp_path):
    Image.new("L", (RES, RES), 77).save(tmp_path / "grey.png")
    assert tuple(rgb(tmp_path / "grey.png")[3, 3]) == (77, 77, 77)
    Image.new("1", (RES, RES), 1).save(tmp_path / "bw.png")
    assert tuple(rgb(tmp_path / "bw.png")[3, 3]) == WHITE
    Image.new("L", (RES, RES), 77).save(tmp_path / "grey.jpg")
    assert close(rgb(tmp_path / "grey.jpg")[3, 3], (77, 77, 77), 2)


def test_non_square_images_are_resized_and_centre_cropped(tmp_path):
    a = np.zeros((40, 120, 3), np.uint8)
    a[:, :40], a[:, 40:80], a[:, 80:] = RED, GREEN, BLUE
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = rgb(tmp_path / "wide.png")
    assert out.shape == (RES, RES, 3) and close(out[16, 16], GREEN)  # the middle third, scaled to 32 px


# ---------------------------------------------------------------- files that must be skipped
def fake_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels, with one tiny IDAT: a decompression bomb's shape."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_bad_folder(folder: Path) -> dict:
    """Good images plus every kind of bad one; returns {file name: words expected in its skip reason}."""
    from conftest import make_images
    make_images(folder, 4)
    buf = io.BytesIO()
    Image.fromarray(quadrants(64)).save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    buf = io.BytesIO()
    Image.fromarray(quadrants(64)).save(buf, "PNG")
    raw = buf.getvalue()
    (folder / "truncated.png").write_bytes(raw[: len(raw) - 30])
    Image.new("RGB", (1, 1), RED).save(folder / "one.png")
    Image.new("RGB", (200, 4), RED).save(folder / "sliver.png")
    (folder / "notes.jpg").write_text("shopping list: eggs, milk\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(fake_png(30_000, 30_000))      # 900 MP: PIL's own bomb error
    (folder / "big.png").write_bytes(fake_png(8_200, 8_200))         # 67 MP: over our 64 MP limit
    (folder / "readme.txt").write_text("not an image extension: ignored, not skipped")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # fine: converted
    return {"truncated.jpg": "runcated", "truncated.png": "unreadable", "one.png": "1x1",
            "sliver.png": "200x4", "notes.jpg": "not an image", "empty.png": "not an image",
            "bomb.png": "decompression-bomb", "big.png": "64 MP limit"}


def test_scan_skips_each_bad_file_with_its_reason_quickly(tmp_path):
    expected = make_bad_folder(tmp_path / "data")
    t0 = time.perf_counter()
    samples, skipped = scan_folder(tmp_path / "data", RES)
    assert time.perf_counter() - t0 < 10  # the bombs are refused from their headers, never decoded
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == set(expected), reasons
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    assert sorted(s.path.name for s in samples) == ["cmyk.jpg"] + [f"img{i:02d}.png" for i in range(4)]
    assert all(s.image.mode == "RGB" and s.image.size == (RES, RES) for s in samples)


def test_a_folder_of_only_bad_files_says_why(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("nope")
    Image.new("RGB", (1, 1)).save(folder / "b.png")
    with pytest.raises(DataError, match=r"no usable image.*a\.png: not an image.*b\.png: only 1x1"):
        scan_folder(folder, RES)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_fuzzed_files_never_escape_as_anything_but_a_skip(tmp_path, fmt):
    """Random byte flips in valid files (EXIF, palette, chunk lengths, ...): each one either loads as
    an RGB square or raises DataError; no other exception may reach the scan (it would end the run)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im = Image.fromarray(quadrants(40))
    (im.convert("P") if fmt == "GIF" else im).save(buf, fmt, **({"exif": exif.tobytes()} if fmt in ("JPEG", "PNG",
                                                                                               "WEBP") else {}))
    raw, rng = buf.getvalue(), random.Random(f"fuzz:{fmt}")
    path = tmp_path / f"fuzz.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
    loaded = 0
    for _ in range(60):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data[: rng.randint(len(data) // 2, len(data))] if rng.random() < 0.3 else data))
        try:
            img = open_image(path, RES)[0]
        except DataError:
            continue
        assert img.mode == "RGB" and img.size == (RES, RES)
        loaded += 1
    assert loaded < 60  # the damage was real for some


def test_the_run_goes_on_and_logs_each_skipped_file(tiny_cfg, tmp_path):
    from embedtrain.trainer import Trainer
    expected = make_bad_folder(tmp_path / "mixed")
    lines = []
    trainer = Trainer(tiny_cfg.replace(data=str(tmp_path / "mixed"), steps=2, batch_size=2), log=lines.append)
    result = trainer.run(tmp_path / "run")
    assert result.status == "finished" and result.updates == 2
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    skipped = {Path(e["file"]).name: e["reason"] for e in events if e["event"] == "skipped"}
    assert set(skipped) == set(expected)
    assert all(expected[name] in reason for name, reason in skipped.items())
    start = next(e for e in events if e["event"] == "start")
    assert "Images = 5 x 1 repeats = 5" in start["summary"] and f"skipped: {len(expected)}" in start["summary"]
    printed = "\n".join(lines)  # the console / job.log names each file too, not just a count
    assert all(name in printed for name in expected), printed


# ---------------------------------------------------------------- the web UI only looks (Hardening II)
def png16_grey(path: Path, width: int, height: int) -> Path:
    """A 16-bit greyscale PNG of mid grey, compressed row by row (64 MP in ~140 KB, never in memory)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80\x00" * width
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


MEASURE = r"""
import json, resource, sys, threading
from pathlib import Path
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import numpy, PIL.Image, PIL.PngImagePlugin
from embedtrain.ui import train_tab
folder = sys.argv[1]
base = peak_mb()
count = train_tab._count_images(folder)
after_count = peak_mb()
text, pics = train_tab.dataset_view(folder)
after_view = peak_mb()
threads = [threading.Thread(target=train_tab.dataset_view, args=(folder,)) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"count": count, "text": text, "sizes": [list(p[0].size) for p in pics],
                  "captions": [p[1] for p in pics], "count_mb": after_count - base, "view_mb": after_view - base,
                  "four_views_mb": peak_mb() - base}))
"""


def test_dataset_box_never_decodes_a_64_megapixel_png(tmp_path):
    """The dataset box (every keystroke) and the image count took the web server from 186 MB to 1.9 GB
    for one 140 KB 16-bit PNG of 8000x8000, four parallel calls to 6.4 GB. Now they read its header (and
    its chunk checksums), show a placeholder and a note, and count it: the trainer still loads it."""
    import subprocess
    import sys
    from conftest import ROOT
    folder = tmp_path / "data"
    folder.mkdir()
    png16_grey(folder / "huge.png", 8000, 8000)
    Image.new("RGB", (64, 64), RED).save(folder / "small.png")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT), env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Before: count 1712 MB, view 1713 MB, four views 6449 MB above the imports; now 2-3 MB.
    assert got["count_mb"] < 100 and got["view_mb"] < 100 and got["four_views_mb"] < 150, got
    assert got["count"] == 2 and got["text"].startswith("2 usable images"), got["text"]
    assert "huge.png" in got["text"] and "64 MP" in got["text"] and "16 MP" in got["text"], got["text"]
    assert got["sizes"] == [[96, 96], [96, 96]]          # a grey placeholder, and the real thumbnail
    assert "64 MP" in got["captions"][0] and got["captions"][1] == "small"


def test_the_dataset_box_skips_what_the_trainer_skips(tmp_path):
    """inspect_folder (the web UI: headers, checksums, reduced decoding) and scan_folder (the trainer:
    every image decoded) agree on which images are usable and why the others are not."""
    from embedtrain.data import inspect_folder
    expected = make_bad_folder(tmp_path / "data")
    trained, skipped = scan_folder(tmp_path / "data", RES)
    for thumbs in (24, 2, 0):
        seen, refused = inspect_folder(tmp_path / "data", 48, thumbs=thumbs)
        assert [s.path.name for s in seen] == [s.path.name for s in trained]
        reasons = {s.path.name: s.reason for s in refused}
        assert set(reasons) == set(expected), reasons
        assert all(words in reasons[name] for name, words in expected.items()), reasons
        assert [s.image is not None for s in seen] == [i < thumbs for i in range(len(seen))]
        assert all(s.image.size == (48, 48) and s.image.mode == "RGB" for s in seen[:thumbs])


def test_thumbnails_show_what_training_sees(tmp_path):
    """Thumbnails are decoded small (JPEG draft, subsampling, box reduction) but must still apply EXIF
    orientation, composite transparency on white and scale 16 bits like the trainer's open_image."""
    from embedtrain.data import look_at_image
    exif = Image.Exif()
    exif[0x0112] = 6
    big = np.kron(quadrants(4), np.ones((500, 750, 1), np.uint8))      # 2000 x 3000 quadrants
    Image.fromarray(big).save(tmp_path / "rot6.jpg", quality=92, exif=exif.tobytes())
    Image.fromarray(big).save(tmp_path / "rot6.png", exif=exif.tobytes())
    a = np.zeros((1200, 1200, 4), np.uint8)
    a[:, :600] = (255, 0, 0, 255)
    a[:, 600:] = (0, 0, 255, 0)                                         # transparent: white
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    p = Image.new("P", (1200, 1200), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (600, 0, 1200, 1200))
    p.save(tmp_path / "p.png", transparency=1)
    g = np.zeros((1200, 1200), np.uint16)
    g[:, :600], g[:, 600:] = 200, 65535
    Image.fromarray(g).save(tmp_path / "g16.png")
    png16(tmp_path / "rgba16.png", 900, 900, 6, (0, 0, 65535, 0))
    Image.new("CMYK", (900, 900), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    for name in ("rot6.jpg", "rot6.png", "rgba.png", "p.png", "g16.png", "rgba16.png", "cmyk.jpg"):
        thumb, note = look_at_image(tmp_path / name, RES)
        assert note == "" and thumb.size == (RES, RES) and thumb.mode == "RGB"
        want = quadrant_colours(rgb(tmp_path / name))
        got = quadrant_colours(np.asarray(thumb, dtype=np.int16))
        assert all(close(g_, w_, 24) for g_, w_ in zip(got, want)), (name, got, want)
    # Over the pixel budget nothing is decoded: no thumbnail, a note, and the header's checks still hold.
    thumb, note = look_at_image(tmp_path / "rgba.png", RES, max_pixels=1_000_000)
    assert thumb is None and "1200x1200" in note and "1 MP" in note


def test_a_huge_caption_file_is_never_read_and_its_image_is_skipped(tmp_path):
    """A 100 MB caption .txt took a 2-update run to 10.4 GB. A caption is at most 64 KB (CLIP reads ~75
    tokens): a bigger file is not a caption, so its image is skipped with the reason (visible in the
    dataset box and the run log) rather than trained on with a piece of whatever the file holds."""
    import tracemalloc
    from conftest import make_images
    from embedtrain.data import caption_for
    limit = 64 * 1024
    folder = make_images(tmp_path / "data", 3)
    with open(folder / "img01.txt", "r+b") as fh:
        fh.truncate(100_000_000)                                         # sparse: 100 MB, no disk used
    (folder / "img02.txt").write_text("tag, " * (60_000 // 5))           # 60 KB: a long caption, kept whole
    tracemalloc.start()
    try:
        text = caption_for(folder / "img01.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit + 100_000 and text.startswith("on a red background"), peak
    assert len(caption_for(folder / "img02.png")) > 50_000
    from embedtrain.data import inspect_folder
    for samples, skipped in (scan_folder(folder, RES), inspect_folder(folder, RES)):
        assert [s.path.name for s in samples] == ["img00.png", "img02.png"]
        assert [s.path.name for s in skipped] == ["img01.png"]
        assert "img01.txt" in skipped[0].reason and "100,000,000 bytes" in skipped[0].reason \
            and "64 KB" in skipped[0].reason, skipped[0].reason


def test_a_template_file_is_bounded_too(tmp_path):
    from embedtrain.data import load_templates
    big = tmp_path / "t.txt"
    big.write_text("a photo of [name]\n")
    with open(big, "r+b") as fh:
        fh.truncate(50_000_000)
    with pytest.raises(DataError, match="at most 256 KB"):
        load_templates(str(big))


def test_a_file_name_that_is_not_utf8_trains(tiny_cfg, tmp_path):
    """b'caf\\xe9 purple star.png' (Latin-1 bytes, legal on Linux) with no caption file: the caption comes
    from the name, which Python holds with a lone surrogate; the tokenizer raised TypeError and ended
    the run. The name now reads 'caf\\ufffd purple star' everywhere (caption, messages, dataset box)."""
    import os
    from conftest import make_images
    from embedtrain.data import caption_for
    from embedtrain.trainer import Trainer
    from embedtrain.ui.train_tab import dataset_view
    folder = make_images(tmp_path / "latin1", 3, captions=False)
    name = os.fsdecode(b"caf\xe9 purple star.png")
    try:
        Image.new("RGB", (48, 48), BLUE).save(folder / name)
        (folder / os.fsdecode(b"broken \xff.png")).write_bytes(b"not an image")
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses names that are not UTF-8")
    lines = []
    trainer = Trainer(tiny_cfg.replace(data=str(folder), steps=2, batch_size=2, template="object_filewords",
                                       val_split=0), log=lines.append)
    result = trainer.run(tmp_path / "run")
    assert result.status == "finished" and result.updates == 2, result.message
    assert any(s.caption == "caf\ufffd purple star" for s in trainer.train_samples)
    assert caption_for(folder / name) == "caf\ufffd purple star"
    text, pics = dataset_view(str(folder))
    json.dumps([text, [c for _, c in pics]], ensure_ascii=False).encode("utf-8")   # what Gradio must send
    assert "caf\ufffd purple star" in [c for _, c in pics] and "broken \ufffd.png" in text
