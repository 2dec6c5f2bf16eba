"""Seed-locked grids on the tiny model: identical starting noise per row, labels from metadata, the PNG's
parameters, errors that name the file. The steps-vs-GA study: test_study.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedtrain.embedding import save_embedding
from embedtrain.grid import (GridError, GridSettings, grid_picture, compose, describe_meta, fill, infotext,
                             parse_seeds, render_grid)

META = {"batch_size": 13, "grad_accum": 2, "step": 3000, "step_unit": "batch", "updates": 1500,
        "epochs": "1500.0000", "lr": 0.005, "lr_schedule": "constant", "init_text": "star"}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    from embedtrain.models import load_pipeline
    return load_pipeline("tiny")


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = save_embedding(tmp_path / "emb" / "alpha.safetensors", torch.randn(2, 32, generator=g), "alpha", META)
    b = save_embedding(tmp_path / "emb" / "beta.pt", 3 * torch.randn(1, 32, generator=g), "beta", {}, fmt="a1111")
    return a, b


# ------------------------------------------------------------------ pure parts
def test_seeds_prompts_and_labels_by_hand():
    assert parse_seeds("1 2, 5-7") == [1, 2, 5, 6, 7]
    assert parse_seeds(["3", "4"]) == [3, 4]
    for bad in ("x", "-1", "7-5", ""):
        with pytest.raises(GridError, match="seeds"):
            parse_seeds(bad)
    assert fill("a photo of {} by [name]", "<t0> <t1>") == "a photo of <t0> <t1> by <t0> <t1>"
    assert describe_meta(META) == ["BS 13 · GA 2", "steps 3000 (batches)", "epochs 1500 · updates 1500", "LR 0.005"]
    assert describe_meta({"step": "500"}) == ["steps 500"]   # an A1111 .pt knows only its step
    assert describe_meta({}) == []
    assert infotext("a, b", "ugly", {"Steps": 20, "Model hash": "", "Y Values": "x, y"}) == \
        'a, b\nNegative prompt: ugly\nSteps: 20, Y Values: "x, y"'


def test_batches_hold_rows_of_one_column_chunked_alike():
    from embedtrain.grid import render_batches
    assert render_batches(3, 2, 2) == [[0, 2], [4], [1, 3], [5]]
    assert render_batches(2, 3, 8) == [[0, 3], [1, 4], [2, 5]]
    assert sorted(i for b in render_batches(5, 4, 3) for i in b) == list(range(20))


def test_settings_errors_name_the_field():
    for kw, field in [({"prompts": ["a photo"]}, "prompts"), ({"seeds": [-1]}, "seeds"),
                      ({"sample_steps": 0}, "sample_steps"), ({"sampler": "magic"}, "sampler"),
                      ({"width": 30}, "width"), ({"cfg_scale": float("nan")}, "cfg_scale")]:
        with pytest.raises(GridError, match=field):
            GridSettings(**kw).validate()


def test_compose_sizes_and_axes_swap():
    ims = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(6)]
    g = compose(ims, 3, margin=2, cell=64)
    assert g.size == (3 * 64 + 2 * 2, 2 * 64 + 2)
    # cell (row 1, col 2) is image 5, enlarged pixel for pixel
    assert g.getpixel((2 * 66 + 10, 66 + 10)) == (200, 0, 0)
    assert compose(ims, 3).size == (3 * 192, 2 * 192)   # small images are enlarged to MIN_CELL
    from embedtrain.grid import Column
    cols = [Column("a", "a"), Column("b", "b"), Column("c", "c")]
    rows = [("p {}", 1), ("p {}", 2)]
    s = GridSettings(legend=False, cell_size=32)
    assert grid_picture(ims, rows, cols, s).size == (96, 64)
    swapped = grid_picture(ims, rows, cols, GridSettings(legend=False, cell_size=32, swap_axes=True))
    assert swapped.size == (64, 96)
    # swapped: row = column c, column = row r, so image (r=1, c=2) = ims[5] sits at (x=1, y=2)
    assert swapped.getpixel((32 + 5, 64 + 5)) == (200, 0, 0)
    labelled = grid_picture(ims, rows, cols, GridSettings(cell_size=32))
    assert labelled.size[0] > 96 and labelled.size[1] > 64   # headers and row labels take room


def test_demo_scores_count_the_cells_the_judge_reads_as_a_purple_star():
    import random

    from embedtrain.demo.world import Spec, complete, render
    from embedtrain.grid import demo_score_lines
    rng = random.Random(0)
    star = [render(complete(Spec("star", "purple", bg), rng), i) for i, bg in enumerate(["green", "white", "blue"])]
    other = [render(complete(Spec("circle", "red", "blue"), rng), 9), render(complete(Spec("star", "yellow", "blue"),
                                                                                       rng), 8), star[2]]
    # two columns, three rows, row-major: column 0 = star images, column 1 = two others then a purple star
    cells = [im for pair in zip(star, other) for im in pair]
    assert demo_score_lines(cells, 2) == ["judge: purple star in 3/3", "judge: purple star in 1/3"]


# ------------------------------------------------------------------ rendering on the tiny model
@pytest.mark.slow
def test_grid_is_seed_locked_labelled_and_written(tiny, files, tmp_path):
    pipe, info = tiny
    a, b = files
    captured = []
    original = pipe.prepare_latents

    def spy(*args, **kwargs):  # the latents the pipeline really starts from
        lat = args[-1] if args else kwargs["latents"]
        captured.append(lat.detach().clone())
        return original(*args, **kwargs)

    pipe.prepare_latents = spy
    progress = []
    try:
        # a, b, a again, then the baseline: 4 columns; batch 3 splits rows across batches
        settings = GridSettings(prompts=["a photo of {}"], seeds=[1, 2], sample_steps=2, baseline="star",
                                batch_size=3)
        out = tmp_path / "outputs" / "grids" / "ab.png"
        r = render_grid(pipe, info, [a, b, a], settings, out, progress=lambda d, t, m: progress.append((d, t)))
    finally:
        del pipe.prepare_latents

    assert [c.name for c in r.columns] == ["alpha", "beta", "alpha", "baseline: star"]
    assert len(r.cells) == 8 and [(c.row, c.col, c.seed) for c in r.cells[:5]] == \
        [(0, 0, 1), (0, 1, 1), (0, 2, 1), (0, 3, 1), (1, 0, 2)]
    px = [np.asarray(im) for im in r.images]
    for row in range(2):
        same_a = px[row * 4], px[row * 4 + 2]
        assert np.array_equal(*same_a), "the same embedding in two columns must give identical pixels"
        assert not np.array_equal(px[row * 4], px[row * 4 + 1]), "a different embedding must change the image"
    assert not np.array_equal(px[0], px[4]), "different seeds must give different images"

    # one batch per column (batch 3 >= 2 rows), each starting from the rows' seeds' noise
    assert [c.shape[0] for c in captured] == [2, 2, 2, 2]
    for col, lat in enumerate(captured):
        for row, seed in enumerate([1, 2]):
            expect = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
            assert torch.equal(lat[row:row + 1], expect), f"column {col} row {row} did not start from seed {seed}"
    assert torch.equal(captured[0], captured[1]) and not torch.equal(captured[0][0], captured[0][1])

    # a cell is the image the pipeline draws alone from that seed (baseline: the init text itself),
    # up to float rounding: a batch of 2 and a batch of 1 round differently
    alone = pipe("a photo of star", generator=torch.Generator().manual_seed(2), num_inference_steps=2,
                 height=32, width=32).images[0]
    diff = np.abs(np.asarray(alone).astype(int) - px[7].astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.95, diff.max()

    assert r.columns[0].label == ["alpha", "BS 13 · GA 2", "steps 3000 (batches)", "epochs 1500 · updates 1500",
                                  "LR 0.005"]
    assert r.columns[1].label == ["beta", "steps 0"]
    assert progress[-1] == (8, 8) and len(progress) > 3

    grid = Image.open(out)
    params = grid.text["parameters"]
    assert params.startswith("a photo of alpha\n")
    for part in ("Steps: 2", "Sampler: DDIM", "CFG scale: 7.5", "Seed: 1", "Size: 32x32", "Model: tiny",
                 'X Values: "alpha, beta, alpha, baseline: star"'):
        assert part in params, (part, params)
    spec = json.loads(grid.text["embedtrain"])
    assert spec["settings"]["seeds"] == [1, 2] and spec["columns"][0]["meta"]["grad_accum"] == "2"
    cells = sorted((tmp_path / "outputs" / "grids" / "ab").glob("*.png"))
    assert len(cells) == 8
    one = Image.open(cells[5])
    assert "Seed: 2" in one.text["parameters"] and "Embedding: beta" in one.text["parameters"]
    assert np.array_equal(np.asarray(one.convert("RGB")), px[5])
    assert not list((tmp_path / "outputs").rglob("*.tmp")), "no temp files may be left behind"


def test_missing_or_incompatible_embedding_is_a_clear_error(tiny, tmp_path):
    pipe, info = tiny
    s = GridSettings(prompts=["a {}"], seeds=[1], sample_steps=1)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(GridError, match=f"embedding file {missing} does not exist"):
        render_grid(pipe, info, [missing], s)
    wide = save_embedding(tmp_path / "sd1.safetensors", torch.randn(1, 768), "sd1")
    with pytest.raises(GridError) as e:
        render_grid(pipe, info, [wide], s)
    msg = str(e.value)
    assert str(wide) in msg and "768" in msg and "SD 1.x" in msg and "32" in msg
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(Exception, match="junk.safetensors"):
        render_grid(pipe, info, [junk], s)


def test_columns_of_one_name_from_different_files_are_told_apart(tmp_path):
    from embedtrain.grid import Column, tell_apart
    out = tmp_path / "outputs"

    def col(name, rel):
        return Column(name, name, path=str(out / rel))
    cols = tell_apart([col("zorb", "zorb-20250101/zorb.safetensors"), col("zorb", "zorb-20250102/zorb.safetensors"),
                       col("gaST", "study/gaST/gaST.safetensors"), col("GAST", "study/GAST/GAST.safetensors"),
                       col("zorb", "zorb-20250101/zorb.safetensors"), Column("baseline: star", "star")])
    assert [c.title for c in cols] == ["zorb (zorb-20250101)", "zorb (zorb-20250102)", "gaST", "GAST",
                                       "zorb (zorb-20250101)", "baseline: star"]
    assert [c.name for c in cols][:2] == ["zorb", "zorb"]   # prompts still call it by its name
    # one run folder: its default file and its diffusers-format file; deeper folders with one name
    same_run = tell_apart([col("zorb", "run/zorb.safetensors"), col("zorb", "run/diffusers/zorb.safetensors")])
    assert [c.title for c in same_run] == ["zorb (zorb.safetensors)", "zorb (diffusers/zorb.safetensors)"]
    studies = tell_apart([col("s-gaST", "study-1/gaST/s-gaST.safetensors"),
                          col("s-gaST", "study-2/gaST/s-gaST.safetensors")])
    assert [c.title for c in studies] == ["s-gaST (study-1/gaST)", "s-gaST (study-2/gaST)"]
    # the same file twice (a control column) needs nothing
    assert [c.title for c in tell_apart([col("a", "r/a.pt"), col("a", "r/a.pt")])] == ["a", "a"]
    noted = Column("mystar", "x", path=str(out / "r1/mystar.pt"), note="file name; saved as purplestar")
    assert [c.title for c in tell_apart([noted, col("mystar", "r2/mystar.pt")])] == \
        ["mystar (r1; file name; saved as purplestar)", "mystar (r2)"]


def test_headers_say_when_a_file_was_renamed_and_which_run_it_is(tiny, tmp_path):
    import shutil

    from embedtrain.grid import load_columns
    pipe, info = tiny
    g = torch.Generator().manual_seed(1)
    a = save_embedding(tmp_path / "run-1" / "zorb.safetensors", torch.randn(1, 32, generator=g), "zorb", META)
    b = save_embedding(tmp_path / "run-2" / "zorb.safetensors", torch.randn(1, 32, generator=g), "zorb", META)
    saved = save_embedding(tmp_path / "dl" / "purplestar.pt", torch.randn(1, 32, generator=g), "purplestar",
                           fmt="a1111")
    renamed = tmp_path / "dl" / "mystar.pt"
    shutil.copy(saved, renamed)
    cols = load_columns(pipe, [renamed, saved])
    assert [c.title for c in cols] == ["mystar (file name; saved as purplestar)", "purplestar"]
    s = GridSettings(prompts=["a {}"], seeds=[1], sample_steps=1, batch_size=4, width=32, height=32)
    r = render_grid(pipe, info, [a, b, renamed], s, tmp_path / "grids" / "g.png")
    assert [c.label[0] for c in r.columns] == ["zorb (run-1)", "zorb (run-2)",
                                               "mystar (file name; saved as purplestar)"]
    assert 'X Values: "zorb (run-1), zorb (run-2), mystar (file name; saved as purplestar)"' in r.parameters
    assert r.cells[0].prompt == "a zorb"   # the prompt names the embedding as A1111 would
    assert [f.name for f in r.files[:2]] == ["0000-zorb_run-1-seed1.png", "0001-zorb_run-2-seed1.png"]
    assert "Embedding: zorb (run-2)" in Image.open(r.files[1]).text["parameters"]


def test_cfg_scale_defaults_to_the_models_and_a_typed_value_wins():
    import argparse
    from embedtrain.config import TrainConfig, apply_preset
    from embedtrain.grid import add_grid_arguments, settings_from_args
    p = argparse.ArgumentParser()
    add_grid_arguments(p)
    assert settings_from_args(p.parse_args([]), None, "demo").cfg_scale == 5.0     # the demo model's (its card)
    assert settings_from_args(p.parse_args([]), None, "tiny").cfg_scale == 7.5
    assert settings_from_args(p.parse_args(["--cfg-scale", "9"]), None, "demo").cfg_scale == 9.0
    assert apply_preset(TrainConfig(model="demo"), set()).preview_cfg == 5.0          # previews too
    assert apply_preset(TrainConfig(model="demo", preview_cfg=7.0), {"preview_cfg"}).preview_cfg == 7.0


def test_grid_cli_refuses_a_missing_file_before_loading_the_model(tmp_path, capsys):
    from embedtrain.grid import cli_grid
    rc = cli_grid(["--model", "tiny", "--embeddings", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "g.png"),
                   "--progress", "json"])
    out = capsys.readouterr().out
    assert rc == 2 and json.loads(out.splitlines()[-1]) == {
        "event": "error", "message": f"embedding file {tmp_path / 'gone.pt'} does not exist"}
