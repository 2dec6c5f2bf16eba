"""What the web UI may read and hand out (Hardening II): folders typed into the page only inside the
outputs folder, the bundled assets, --data and --allow-dir (UIContext.allowed_folder), the same refusal
whether or not a path exists; files handed to a page only when they are regular files inside outputs
(UIContext.servable); no public share link unless --share, and never one without --auth."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, make_images


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An outputs folder, the default dataset, an --allow-dir folder, and a secret folder beside them whose
    caption holds a token that must never come back."""
    from embedtrain.ui.context import UIContext
    secret = make_images(tmp_path / "secret", 2)
    (secret / "img00.txt").write_text("SECRET-TOKEN-123")
    ctx = UIContext(outputs=tmp_path / "outputs", data=str(make_images(tmp_path / "data", 3)),
                    allow=[str(make_images(tmp_path / "more", 2))])
    return ctx, tmp_path, secret


def refusal(ctx, path) -> str:
    from embedtrain.ui.context import NotAllowed
    with pytest.raises(NotAllowed) as e:
        ctx.allowed_folder(path)
    return str(e.value)


def test_allowed_folders_and_one_refusal_for_everything_else(site):
    from embedtrain.ui.context import ASSETS
    ctx, tmp, secret = site
    for ok in (ctx.outputs, ctx.outputs / "run" / "x", tmp / "data", tmp / "more" / "sub", ASSETS / "templates",
               str(tmp / "data") + "/", f"{tmp}/outputs/a/../b"):
        assert ctx.allowed_folder(ok) == Path(os.path.abspath(ok))
    (ctx.outputs / "link").symlink_to(secret)          # inside as written, outside once followed
    (tmp / "data" / "up").symlink_to(tmp)
    msg = refusal(ctx, secret)
    assert "--allow-dir" in msg and str(ctx.outputs) in msg and str(tmp / "more") in msg and str(ASSETS) in msg
    # The same words whether the path exists, is a file, does not exist, or escapes by .. or a symlink:
    # the page learns nothing about the server's files outside the allowed folders.
    for bad in (tmp / "nope", secret / "img00.txt", "/etc", f"{ctx.outputs}/../secret", ctx.outputs / "link",
                ctx.outputs / "link" / "deeper", tmp / "data" / "up" / "secret", "", "~", "relative/dir"):
        assert refusal(ctx, bad).replace(repr(str(bad).strip()), "P") == msg.replace(repr(str(secret)), "P"), bad


def test_dataset_box_and_count_read_only_allowed_folders(site, monkeypatch):
    """/dataset_view returned thumbnails and sidecar text of any folder on the server (a planted secret
    came back) and told whether any path exists."""
    from embedtrain import EmbedtrainError
    from embedtrain.ui.train_tab import _count_images, dataset_view
    ctx, tmp, secret = site
    text, pics = dataset_view(str(secret), ctx)
    assert pics == [] and "SECRET" not in text and "not one the web UI may read" in text
    assert dataset_view(str(tmp / "nope"), ctx)[0].replace("nope", "secret") == text
    with pytest.raises(EmbedtrainError, match="--allow-dir"):
        _count_images(str(secret), ctx)
    assert dataset_view(str(tmp / "more"), ctx)[0].startswith("2 usable images")
    assert _count_images(str(tmp / "data"), ctx) == 3
    assert dataset_view(str(secret))[0].startswith("2 usable images")         # a library call: no limits
    # The Train tab's checks, the calculator's "Read the Train tab" use the same count, with the page's ctx.
    from embedtrain.ui.calculator_tab import from_train
    assert from_train(str(secret), 1, 1, 10, "update", 0, ctx=ctx)["images"] == 0
    assert from_train(str(tmp / "data"), 1, 1, 10, "update", 0, ctx=ctx)["images"] == 3


def test_servable_files_are_regular_files_inside_the_root(tmp_path):
    from embedtrain.ui.context import servable_files
    root = tmp_path / "outputs"
    (root / "run").mkdir(parents=True)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    real = root / "run" / "emb.safetensors"
    real.write_text("x")
    (root / "run" / "x.json").symlink_to("/etc/passwd")
    (root / "run" / "y.csv").symlink_to(outside)
    (root / "run" / "z.pt").symlink_to(real)            # a symlink to a file inside: what it reaches is served
    (root / "run" / "sub.json").mkdir()
    (root / "run" / "dangling.json").symlink_to(tmp_path / "gone")
    os.mkfifo(root / "run" / "fifo.csv")
    paths = sorted(str(p) for p in (root / "run").iterdir()) + [str(outside), None]
    assert servable_files(paths, root) == [str(real), str(root / "run" / "z.pt")]


def _app_handler(ctx, name):
    from embedtrain.ui.app import build_app
    demo = build_app(ctx)
    fns = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]
    assert len(fns) == 1, name
    return fns[0]


def test_open_run_hands_out_no_symlink_out_of_outputs(tmp_path):
    """Run history's "Run to resume / open" copied x.json -> /etc/passwd into Gradio's cache and served it."""
    from embedtrain.ui.context import UIContext
    ctx = UIContext(outputs=tmp_path / "outputs")
    secret = make_images(tmp_path / "secret", 1)
    run = ctx.outputs / "zorb-20250101-000000"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": "zorb"}))
    (run / "zorb.safetensors").write_bytes(b"x")
    (run / "x.json").symlink_to("/etc/passwd")
    (run / "y.csv").symlink_to(secret / "img00.txt")
    open_run = _app_handler(ctx, "open_run")
    shown, files = open_run(run.name)
    assert shown == str(run)
    assert sorted(Path(f).name for f in files) == ["config.json", "zorb.safetensors"]
    assert open_run("../secret")[0].startswith("Error")


def _load_app_module():
    spec = importlib.util.spec_from_file_location("embedtrain_app_main", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_share_link_unless_asked_and_never_without_auth(tmp_path, monkeypatch, capsys):
    """GRADIO_SHARE=true (and Colab or Kaggle, where Gradio turns share on by itself) opened a public
    gradio.live link with no auth: app.py now always passes share=, False unless --share, and --share
    is refused without --auth like a non-local --host."""
    import gradio as gr

    from embedtrain.ui import app as ui_app, context
    built, build = [], ui_app.build_app
    monkeypatch.setattr(ui_app, "build_app", lambda ctx: built.append(ctx) or build(ctx))   # the served context
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    monkeypatch.setenv("GRADIO_SHARE", "true")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    app = _load_app_module()
    out = ["--outputs", str(tmp_path / "outputs")]
    assert app.main(out) == 0
    assert calls[-1]["share"] is False and calls[-1]["auth"] is None
    assert "GRADIO_SHARE=true is ignored" in capsys.readouterr().err
    assert app.main(out + ["--share"]) == 2 and len(calls) == 1
    assert "--share link without --auth" in capsys.readouterr().err
    assert app.main(out + ["--share", "--auth", "ann:pw"]) == 0
    assert calls[-1]["share"] is True and calls[-1]["auth"] == [("ann", "pw")]
    assert app.main(out + ["--share", "--insecure"]) == 0 and calls[-1]["share"] is True
    # --allow-dir reaches the served context's rule
    assert app.main(out + ["--allow-dir", str(tmp_path / "a"), "--allow-dir", str(tmp_path / "b")]) == 0
    served = built[-1]
    assert served.allowed_folder(tmp_path / "b" / "x") == tmp_path / "b" / "x"
    with pytest.raises(context.NotAllowed):
        served.allowed_folder(tmp_path / "c")


def test_jobs_and_every_tab_read_only_allowed_folders(tmp_path):
    """/train, the LR finder, the study and the live status apply the same rule as the dataset box."""
    from embedtrain.config import TrainConfig
    from embedtrain.ui.context import DEMO_DATASET, NotAllowed, UIContext
    from embedtrain.ui.grid_tab import study_command
    from embedtrain.ui.jobs import JobStatus
    from embedtrain.ui.train_tab import status_view
    ctx = UIContext(outputs=tmp_path / "outputs", data=str(DEMO_DATASET))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "notes.txt").write_text("SECRET-TOKEN-123\n")
    cfg = TrainConfig(model="demo", data=str(secret), name="zorb")
    with pytest.raises(NotAllowed, match="data folder"):
        ctx.jobs.start(cfg)
    with pytest.raises(NotAllowed, match="template file"):   # its lines would come back in preview captions
        ctx.jobs.start(cfg.replace(data=str(DEMO_DATASET), template=str(secret / "notes.txt")))
    with pytest.raises(NotAllowed):
        study_command(ctx, {"data": str(secret), "low": "2,1", "high": "1,2"}, {})
    assert [p.name for p in ctx.outputs.iterdir() if not p.name.startswith(".")] == []
    run = ctx.outputs / "zorb-1"
    run.mkdir()
    (run / "zorb.safetensors").write_bytes(b"x")
    (run / "x.json").symlink_to(secret / "notes.txt")
    v = status_view(JobStatus("finished", run_dir=str(run), name="zorb"))
    assert [Path(f).name for f in v["files"]] == ["zorb.safetensors"]
