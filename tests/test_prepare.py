"""embedtrain.prepare: the files written (names, sizes, pixels, captions) for each crop mode, flip and split,
the input folder left byte for byte as it was, the refusals, the skipped files, the focal point, the
auto-captioner (a fake one: no model is bundled or downloaded) and the CLI end to end."""

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from embedtrain import prepare
from embedtrain.data import DataError, fit, scan_folder
from embedtrain.prepare import PrepareError, crop_boxes, focal_point, prepare_folder, tile_offsets

ROOT = Path(__file__).resolve().parent.parent


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_source(folder: Path) -> Path:
    """square (80x80, caption file), wide (200x80 JPEG, 2.5:1, caption file), tall (60x120, 1:2, no caption
    file), near (112x80, 1.4:1: not split)."""
    folder.mkdir(parents=True, exist_ok=True)
    noise(80, 80, 1).save(folder / "square.png")
    (folder / "square.txt").write_bytes(b"a  red square\n")      # copied byte for byte, spaces and newline kept
    noise(200, 80, 2).save(folder / "wide.jpg", quality=95)
    (folder / "wide.txt").write_text("a wide view, tags")
    noise(60, 120, 3).save(folder / "tall.png")
    noise(112, 80, 4).save(folder / "near.png")
    (folder / "near.txt").write_text("near square")
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sizes(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as img:
            out[p.name] = img.size
    return out


@pytest.fixture
def src(tmp_path) -> Path:
    return make_source(tmp_path / "src")


def test_center_writes_one_square_per_image_the_trainers_own_crop(src, tmp_path):
    out = tmp_path / "out"
    result = prepare_folder(src, out, 64)
    assert sizes(out) == {n: (64, 64) for n in ("near.png", "square.png", "tall.png", "wide.png")}
    assert sorted(p.name for p in out.glob("*.txt")) == ["near.txt", "square.txt", "tall.txt", "wide.txt"]
    assert (out / "square.txt").read_bytes() == b"a  red square\n"
    assert (out / "wide.txt").read_text() == "a wide view, tags"
    assert (out / "tall.txt").read_text() == "tall"          # no caption file: the trainer's caption from the name
    assert {p.caption_from for p in result.prepared} == {"file", "name"}
    with Image.open(src / "wide.jpg") as im, Image.open(out / "wide.png") as got:
        assert np.array_equal(np.asarray(got), np.asarray(fit(im.convert("RGB"), 64)[0]))
    assert result.read == 4 and len(result.written) == 4 and not result.skipped


def test_crop_none_keeps_the_aspect_ratio(src, tmp_path):
    out = tmp_path / "out"
    prepare_folder(src, out, 64, crop="none")
    assert sizes(out) == {"near.png": (90, 64), "square.png": (64, 64), "tall.png": (64, 128), "wide.png": (160, 64)}


def test_flip_writes_a_mirrored_copy_of_each_output_with_its_caption(src, tmp_path):
    out = tmp_path / "out"
    result = prepare_folder(src, out, 32, flip=True)
    names = {"near", "square", "tall", "wide"}
    assert set(sizes(out)) == {f"{n}{s}.png" for n in names for s in ("", "-flip")}
    assert set(sizes(out).values()) == {(32, 32)}
    for n in names:
        with Image.open(out / f"{n}.png") as a, Image.open(out / f"{n}-flip.png") as b:
            assert np.array_equal(np.asarray(ImageOps.mirror(a)), np.asarray(b))
        assert (out / f"{n}-flip.txt").read_bytes() == (out / f"{n}.txt").read_bytes()
    assert len(result.written) == 8


def test_split_cuts_long_images_into_overlapping_tiles(src, tmp_path):
    out = tmp_path / "out"
    prepare_folder(src, out, 64, split=True, flip=True)
    # wide 200x80 -> 160x64 -> tiles at 0, 48, 96; tall 60x120 -> 64x128 -> 0, 32, 64; near (1.4:1) and square whole
    expected = {"square", "near"} | {f"{n}-{i}" for n in ("wide", "tall") for i in (1, 2, 3)}
    assert set(sizes(out)) == {f"{n}{s}.png" for n in expected for s in ("", "-flip")}
    assert set(sizes(out).values()) == {(64, 64)}
    for i in (1, 2, 3):
        assert (out / f"wide-{i}.txt").read_text() == "a wide view, tags"
        assert (out / f"tall-{i}-flip.txt").read_text() == "tall"
    with Image.open(src / "tall.png") as im:
        resized = np.asarray(im.convert("RGB").resize((64, 128), Image.Resampling.LANCZOS))
    for i, top in enumerate((0, 32, 64), start=1):
        with Image.open(out / f"tall-{i}.png") as tile:
            assert np.array_equal(np.asarray(tile), resized[top:top + 64])


@pytest.mark.parametrize("length", [97, 100, 128, 150, 160, 200, 300, 1000])
def test_tiles_cover_the_long_side_with_the_fewest_that_overlap_a_fifth(length):
    n = 64
    offsets = tile_offsets(length, n)
    assert offsets[0] == 0 and offsets[-1] == length - n
    overlaps = [n - (b - a) for a, b in zip(offsets, offsets[1:])]
    assert min(overlaps) >= 0.2 * n - 1          # rounding to whole pixels
    if len(offsets) > 2:                          # one tile fewer would overlap less than a fifth
        assert n - (length - n) / (len(offsets) - 2) < 0.2 * n


def test_focal_crop_moves_toward_a_detailed_region_off_centre(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = Image.new("RGB", (192, 64), (120, 120, 120))
    img.paste(noise(28, 28, 5), (150, 18))          # the detail, near the right edge
    img.save(src / "scene.png")
    tall = Image.new("RGB", (64, 192), (90, 90, 90))
    tall.paste(noise(24, 24, 6), (20, 10))          # near the top
    tall.save(src / "tall.png")
    out, centre = tmp_path / "focal", tmp_path / "centre"
    prepare_folder(src, out, 64, crop="focal")
    prepare_folder(src, centre, 64, crop="center")
    fx, fy = focal_point(img)
    assert fx > 0.6 and abs(fy - 0.5) < 0.05
    assert crop_boxes((192, 64), 64, "focal", False, (fx, fy))[0][0] > crop_boxes((192, 64), 64, "center", False)[0][0]
    assert focal_point(tall)[1] < 0.4
    for name in ("scene.png", "tall.png"):
        with Image.open(out / name) as f, Image.open(centre / name) as c:
            # the focal square holds the detail (high variance), the centre square only the flat background
            assert np.asarray(f, dtype=float).std() > 30 > np.asarray(c, dtype=float).std() + 20
    assert focal_point(Image.new("RGB", (100, 50), (9, 9, 9))) == (0.5, 0.5)   # nothing to find: the centre


def test_the_pull_to_the_centre_never_loses_the_detail():
    """On a 1:12 strip a quarter-way pull alone would move the square right off the detail near its end
    (76 px: more than the square); the pull is capped at a quarter of the square."""
    img = Image.new("RGB", (768, 64), (120, 120, 120))
    img.paste(noise(16, 16, 7), (680, 24))
    fx, fy = focal_point(img)
    assert abs(fx * 768 - 688) < 4
    left = crop_boxes(img.size, 64, "focal", False, (fx, fy))[0][0]
    assert left <= 680 and 696 <= left + 64 and left < 688 - 32          # holds the detail, pulled inwards
    assert crop_boxes((64, 64), 64, "focal", False, (0.9, 0.1)) == [(0, 0, 64, 64)]


def test_the_input_folder_is_byte_for_byte_unchanged(src, tmp_path):
    (src / "broken.png").write_bytes(b"not an image at all")
    before = hashes(src)
    prepare_folder(src, tmp_path / "a", 32, crop="focal", flip=True, split=True, captioner=lambda img: "fake")
    prepare_folder(src, tmp_path / "b", 32, crop="none")
    assert hashes(src) == before


@pytest.mark.parametrize("out, field", [
    (".", "out"),                    # the data folder itself
    ("./sub/prepared", "out"),       # inside it
    ("../full", "out"),              # not empty
    ("../afile", "out"),             # a file
    ("../afile/sub", "out"),         # under a file
])
def test_bad_output_folders_are_refused_before_anything_is_written(src, tmp_path, out, field):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "afile").write_text("a file")
    before, outside = hashes(src), hashes(tmp_path)
    with pytest.raises(PrepareError) as err:
        prepare_folder(src, src / out, 32)
    assert err.value.field == field and str(err.value).startswith("out ")
    assert "\n" not in str(err.value) and "new or empty folder" in str(err.value)
    assert hashes(src) == before and hashes(tmp_path) == outside


@pytest.mark.parametrize("resolution", [0, -8, 100, 4104, "abc", "", 12.5])
def test_bad_resolutions_are_refused(src, tmp_path, resolution):
    with pytest.raises(PrepareError) as err:
        prepare_folder(src, tmp_path / "out", resolution)
    assert err.value.field == "resolution" and "multiple of 8" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_crop_and_split_with_no_crop_are_refused(src, tmp_path):
    with pytest.raises(PrepareError, match="crop must be one of center, focal, none"):
        prepare_folder(src, tmp_path / "out", 32, crop="middle")
    with pytest.raises(PrepareError, match="split cuts square tiles") as err:
        prepare_folder(src, tmp_path / "out", 32, crop="none", split=True)
    assert err.value.field == "split" and not (tmp_path / "out").exists()


def test_running_twice_into_the_same_folder_is_refused(src, tmp_path):
    out = tmp_path / "out"
    prepare_folder(src, out, 32)
    first = hashes(out)
    with pytest.raises(PrepareError, match="is not empty"):
        prepare_folder(src, out, 32)
    assert hashes(out) == first


def test_skipped_files_are_reported_with_the_trainers_reasons(src, tmp_path):
    good = io.BytesIO()
    noise(64, 64, 9).save(good, format="PNG")
    (src / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (src / "notes.png").write_text("this is a text file with an image's name\n")
    (src / "notes.txt").write_text("caption of the text file")
    result = prepare_folder(src, tmp_path / "out", 32)
    reasons = {s.path.name: s.reason for s in result.skipped}
    assert set(reasons) == {"truncated.png", "notes.png"}
    assert reasons == {s.path.name: s.reason for s in scan_folder(src, 32)[1]}     # data.py's reasons
    assert "not an image" in reasons["notes.png"] and reasons["truncated.png"].startswith("unreadable")
    assert not list((tmp_path / "out").glob("notes*")) and not list((tmp_path / "out").glob("truncated*"))
    text = result.summary()
    assert "read 6 image files" in text and "wrote 4 images from 4 of them" in text and "skipped 2:" in text
    assert f"notes.png: {reasons['notes.png']}" in text and f"output folder: {tmp_path / 'out'}" in text


def test_two_sources_with_one_name_are_not_merged(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise(40, 40, 1).save(src / "a.png")
    noise(40, 40, 2).save(src / "a.jpg")
    noise(40, 80, 3).save(src / "b.png")
    noise(40, 40, 4).save(src / "b-1.png")           # b's first tile would be b-1.png
    result = prepare_folder(src, tmp_path / "out", 32, split=True)
    assert sorted(p.name for p in result.written) == ["a.png", "b-1.png"]   # from a.jpg and b-1.png (sorted first)
    assert {s.path.name for s in result.skipped} == {"a.png", "b.png"}
    assert all("same file name stem" in s.reason for s in result.skipped)


def test_no_usable_image_is_an_error_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.png").write_text("text")
    with pytest.raises(DataError, match="no usable image.*x.png"):
        prepare_folder(src, tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()


def test_the_trainers_image_hygiene_applies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = noise(80, 40, 1)
    exif = img.getexif()
    exif[0x0112] = 6                                  # rotate 90 degrees when shown
    img.save(src / "rotated.jpg", exif=exif)
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(src / "clear.png")
    Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(src / "deep.png")
    Image.new("RGB", (8, 2000), (1, 2, 3)).save(src / "strip.png")
    out = tmp_path / "out"
    result = prepare_folder(src, out, 512, crop="none")
    assert sizes(out)["rotated.png"] == (512, 1024)                           # EXIF rotation applied
    with Image.open(out / "clear.png") as a, Image.open(out / "deep.png") as b:
        assert a.getpixel((5, 5)) == (255, 255, 255) and b.getpixel((5, 5)) == (255, 255, 255)
    assert [s.path.name for s in result.skipped] == ["strip.png"] and "64 MP" in result.skipped[0].reason
    assert "upscaled 3 (short side under the resolution)" in result.summary()


def test_the_auto_captioner_writes_captions_only_where_none_existed(src, tmp_path):
    seen = []

    def fake(img):
        seen.append(img.size)
        return [{"generated_text": "  a  generated   caption "}]     # the pipeline's own answer shape

    out = tmp_path / "out"
    result = prepare_folder(src, out, 32, split=True, caption_model="no/such-model", captioner=fake)
    assert seen == [(60, 120)]                        # only tall.png has no caption file; the whole image
    assert [(out / f"tall-{i}.txt").read_text() for i in (1, 2, 3)] == ["a generated caption"] * 3
    assert (out / "square.txt").read_bytes() == b"a  red square\n" and (out / "near.txt").read_text() == "near square"
    assert {p.source.name: p.caption_from for p in result.prepared}["tall.png"] == "captioner"
    assert "1 by the captioner" in result.summary()
    assert not (src / "tall.txt").exists()


def test_a_captioner_that_fails_costs_that_image_only(src, tmp_path):
    def broken(img):
        raise RuntimeError("out of memory")

    result = prepare_folder(src, tmp_path / "out", 32, captioner=broken)
    assert [(s.path.name, s.reason) for s in result.skipped] == [
        ("tall.png", "the captioner failed (RuntimeError: out of memory)")]
    assert len(result.written) == 3


def test_the_caption_model_is_not_loaded_when_every_image_has_a_caption(src, tmp_path):
    (src / "tall.txt").write_text("tall one")
    prepare_folder(src, tmp_path / "out", 32, caption_model="/no/such/folder")   # would fail to load
    assert (tmp_path / "out" / "tall.txt").read_text() == "tall one"


def test_a_caption_model_that_is_no_path_or_id_says_what_to_give(src, tmp_path, monkeypatch):
    with pytest.raises(PrepareError) as err:
        prepare_folder(src, tmp_path / "out", 32, caption_model="/no/such/folder")
    assert err.value.field == "caption_model" and "image-to-text model such as a BLIP captioner" in str(err.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)              # not installed
    with pytest.raises(PrepareError, match="needs the transformers package"):
        prepare.load_captioner("Salesforce/blip-image-captioning-base")


@pytest.mark.slow
def test_a_caption_model_transformers_cannot_load_says_what_to_give(src, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(PrepareError) as err:
        prepare_folder(src, tmp_path / "out", 32, caption_model=str(empty))
    text = str(err.value)
    assert err.value.field == "caption_model" and "\n" not in text
    assert text.startswith(f"caption_model '{empty}' cannot be loaded as an image-to-text model")
    assert "give a local folder or hub id of an image-to-text model such as a BLIP captioner" in text
    assert not (tmp_path / "out").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "embedtrain", "prepare", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_cli_end_to_end(src, tmp_path):
    (src / "notes.png").write_text("text")
    out = tmp_path / "out"
    before = hashes(src)
    done = run_cli("--data", src, "--out", out, "--resolution", 32, "--flip", "--split", "--crop", "focal")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("read 5 image files in ") and "wrote 16 images from 4 of them" in done.stdout
    assert "skipped 1:\n  notes.png: not an image PIL can read" in done.stdout
    assert done.stdout.strip().endswith(f"output folder: {out}")
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.txt"))) == 16 and hashes(src) == before
    again = run_cli("--data", src, "--out", out)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("error: --out ") and "is not empty" in again.stderr
    assert again.stderr.count("\n") == 1


def test_the_cli_names_the_flag_of_a_bad_value(src, tmp_path, capsys):
    assert prepare.cli(["--data", str(src), "--out", str(tmp_path / "o"), "--resolution", "500"]) == 2
    assert capsys.readouterr().err.startswith("error: --resolution must be a multiple of 8")
    assert prepare.cli(["--data", str(src), "--out", str(src / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: --out ")
    assert prepare.cli(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert prepare.cli(["--data", str(src), "--out", str(tmp_path / "o"), "--crop", "middle"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_cli_help():
    done = run_cli("--help")
    assert done.returncode == 0
    for flag in ("--data", "--out", "--resolution", "--crop", "--flip", "--split", "--caption-model"):
        assert flag in done.stdout
    listed = subprocess.run([sys.executable, "-m", "embedtrain"], cwd=ROOT, capture_output=True, text=True)
    assert "prepare" in listed.stdout


def tiny_blip(folder: Path) -> Path:
    """A BLIP captioner with random weights and a 13-word vocabulary, made here (nothing downloaded): its
    output layer's bias makes it say "ball" at every position (random weights alone may say nothing at all),
    through transformers' real pipeline, loading and all."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "ball", "on", "table", "photo", "of"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = BlipConfig(text_config=dict(vocab_size=len(words), encoder_hidden_size=16, bos_token_id=5, pad_token_id=0,
                                         sep_token_id=3, max_position_embeddings=64, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.decoder.bias
        bias.fill_(-20.0)
        bias[words.index("ball")] = 20.0
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_real_image_to_text_pipeline_captions_the_images_without_a_caption_file(src, tmp_path):
    model = tiny_blip(tmp_path / "tiny-blip")
    result = prepare_folder(src, tmp_path / "out", 32, caption_model=str(model))
    assert {p.source.name: p.caption_from for p in result.prepared} == {
        "near.png": "file", "square.png": "file", "tall.png": "captioner", "wide.jpg": "file"}
    words = (tmp_path / "out" / "tall.txt").read_text().split()
    assert words == ["ball"] * prepare.CAPTION_MAX_TOKENS         # the length bound stops it
