"""The steps-vs-GA study (embedtrain.study) on the tiny model: four runs, their grid, pairs and table, and one
decode of the images and one latent encoding per batch size for all four runs."""

import csv
import json

import pytest
import torch
from PIL import Image

STUDY_ARGS = ["--model", "tiny", "--name", "zorb", "--init-text", "circle", "--template", "object",
              "--val-split", "0.25", "--lr", "0.02", "--seed", "3", "--low", "2,1", "--high", "1,3",
              "--low-steps", "3", "--high-steps", "6", "--prompts", "a photo of {}", "--seeds", "5",
              "--sample-steps", "2"]


@pytest.mark.slow
def test_study_trains_four_runs_and_writes_grid_pairs_and_table(images, tmp_path, capsys):
    from embedtrain.calculator import study_table
    from embedtrain.study import cli as cli_study
    out = tmp_path / "outputs" / "study"
    rc = cli_study(["--model", "tiny", "--data", str(images), "--name", "zorb", "--init-text", "circle",
                    "--template", "object", "--val-split", "0.25", "--lr", "0.02", "--seed", "3",
                    "--low", "2,1", "--high", "1,3", "--low-steps", "3", "--high-steps", "6",
                    "--prompts", "a photo of {}", "--seeds", "5", "--sample-steps", "2", "--study-out", str(out),
                    "--progress", "json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rc == 0, lines[-1]
    done = lines[-1]
    assert done["event"] == "done" and any("training GAST" in x.get("message", "") for x in lines)

    with open(out / "study.csv", newline="") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    plan = {r.name: r for r in study_table(6, (2, 1), (1, 3), 3, 6, "batch")}   # 8 images - 25% validation
    assert set(rows) == {"gaST", "gast", "GAST", "GAst"}
    for name, r in rows.items():
        assert int(r["weight_updates"]) == plan[name].weight_updates
        assert float(r["epochs"]) == pytest.approx(plan[name].epochs, abs=0.01)
        assert float(r["final_loss"]) > 0 and float(r["val_loss"]) > 0 and r["status"] == "finished"
    assert [rows[n]["weight_updates"] for n in ("gaST", "gast", "GAST", "GAst")] == ["6", "3", "2", "1"]

    configs = [json.loads((out / n / "config.json").read_text()) for n in rows]
    assert len({(c["seed"], c["data"], c["val_split"], c["lr"]) for c in configs}) == 1
    from embedtrain.embedding import load_embedding
    vecs = {n: load_embedding(out / n / f"zorb-{n}.safetensors").vectors for n in rows}
    assert not torch.equal(vecs["gaST"], vecs["gast"]) and not torch.equal(vecs["GAST"], vecs["GAst"])

    grid = Image.open(out / "grid.png")
    spec = json.loads(grid.text["embedtrain"])
    assert [c["name"] for c in spec["columns"]] == ["zorb-gaST", "zorb-gast", "zorb-GAST", "zorb-GAst",
                                                    "baseline: circle"]
    assert spec["columns"][2]["details"][0] == "BS 1 · GA 3"
    for a, b in (("gaST", "GAst"), ("gaST", "GAST"), ("gast", "GAst"), ("gaST", "gast")):
        pair = Image.open(out / f"{a}-vs-{b}.png")
        assert f'X Values: "zorb-{a}, zorb-{b}"' in pair.text["parameters"]
    assert "| gaST | low GA, high steps | 2 | 1 | 6 | batch | 6 |" in (out / "study.md").read_text()


def _study_counting(images, out, monkeypatch, shared: bool):
    """Run the tiny study; (image files decoded, (images, batch) of each latent encoding, vectors by run)."""
    import contextlib

    from embedtrain import data
    from embedtrain.embedding import load_embedding
    from embedtrain.study import cli
    opened, encoded = [], []
    real_open, real_encode = data.open_image, data.LatentCache._encode

    def encode(self, vae, images_, *args):
        encoded.append((len(images_), args[-1]))
        return real_encode(self, vae, images_, *args)
    with monkeypatch.context() as m:
        m.setattr(data, "open_image", lambda path, res: opened.append(path.name) or real_open(path, res))
        m.setattr(data.LatentCache, "_encode", encode)
        if not shared:
            m.setattr(data, "shared_data", contextlib.nullcontext)
        assert cli([*STUDY_ARGS, "--data", str(images), "--study-out", str(out), "--progress", "json"]) == 0
    runs = ("gaST", "gast", "GAST", "GAst")
    return sorted(opened), sorted(encoded), {r: load_embedding(out / r / f"zorb-{r}.safetensors").vectors for r in runs}


def test_the_study_decodes_the_images_once_and_encodes_them_once_per_batch_size(images, tmp_path, monkeypatch):
    """Before: the study scanned the folder to count it and each of its four Trainers scanned and encoded it
    again (5 decodes of every image, 8 latent encodings); now 1 decode and 4 encodings (the training and the
    validation cache, for batch sizes 2 and 1). The four embeddings are bit-for-bit the same either way."""
    names = sorted(p.name for p in images.glob("*.png"))
    opened, encoded, vectors = _study_counting(images, tmp_path / "shared", monkeypatch, shared=True)
    assert opened == names                                       # each image decoded once
    assert encoded == [(2, 1), (2, 2), (6, 1), (6, 2)]           # 6 training + 2 validation images, BS 1 and 2
    opened, encoded, alone = _study_counting(images, tmp_path / "alone", monkeypatch, shared=False)
    assert opened == sorted(names * 5) and len(encoded) == 8     # what every study did before
    for run, v in vectors.items():
        assert torch.equal(v, alone[run]), run


class _StubVAE:
    """Just enough of an AutoencoderKL for LatentCache: counts its encode calls."""
    def __init__(self):
        from types import SimpleNamespace
        self.config, self.dtype, self.calls = SimpleNamespace(scaling_factor=0.5), torch.float32, 0

    def encode(self, x):
        from types import SimpleNamespace
        self.calls += 1
        mean = x[:, :, ::8, ::8].mean(1, keepdim=True).repeat(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.ones_like(mean)))


def test_shared_data_hands_out_one_scan_and_one_encoding_per_settings(images):
    from embedtrain import data
    vae = _StubVAE()
    first, skipped = data.scan_folder(images, 32)
    assert data.scan_folder(images, 32)[0][0].image is not first[0].image   # outside the block: every scan decodes
    with data.shared_data():
        a, skipped_a = data.scan_folder(images, 32)
        skipped_a.append("a caller's own")                           # the trainer extends its list
        b, skipped_b = data.scan_folder(str(images) + "/", 32)
        assert [s.image for s in b] == [s.image for s in a] and b[0].image is a[0].image and skipped_b == []
        assert data.scan_folder(images, 16)[0][0].image.size == (16, 16)   # another resolution is another scan
        ims = [s.image for s in a]
        c1 = data.LatentCache(vae, ims, "cpu", batch=4)
        c2 = data.LatentCache(vae, list(ims), "cpu", batch=4)
        assert vae.calls == 2 and c2.mean is c1.mean                 # 8 images in batches of 4, encoded once
        data.LatentCache(vae, ims, "cpu", batch=8)
        data.LatentCache(vae, ims, "cpu", flip=True, batch=4)
        data.LatentCache(vae, ims[:4], "cpu", batch=4)
        assert vae.calls == 2 + 1 + 4 + 1                            # another batch, flip or image set encodes
        with data.shared_data():                                     # nested: the outer block's store
            assert data.scan_folder(images, 32)[0][0] is a[0]
    calls = vae.calls
    data.LatentCache(vae, ims, "cpu", batch=4)
    assert vae.calls == calls + 2                                    # the block's store is gone
