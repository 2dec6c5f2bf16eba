"""Embedding and run names become file names, folder names and prompt words: hostile or odd ones are
refused with a message naming the field (or normalised), and nothing is written outside the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from embedtrain.config import ConfigError, TrainConfig, check_safe_name
from embedtrain.embedding import EmbeddingError, add_embedding, check_name, load_embedding, save_embedding

ROOT = Path(__file__).resolve().parent.parent

BAD_NAMES = {
    "../x": "may hold only", "..": "may hold only", "x/../../y": "may hold only", "/etc/passwd": "may hold only",
    "C:\\evil": "may hold only", "a\\b": "may hold only", "a/b": "may hold only", "": "must not be empty",
    "   ": "must not be empty", "x" * 65: "65 characters", "\U00020000" * 40: "160 bytes", "con": "reserved",
    "CON": "reserved", "nul.txt": "reserved", "lpt1": "reserved", "com9": "reserved", "abc.": "end with '.'",
    ".hidden": "may hold only", "-flag": "may hold only", "x\0y": "may hold only", "two\nlines": "may hold only",
    "a b": "may hold only", "zorb\u200b": "may hold only", "evil\u202etxt.exe": "may hold only",
    "x..y": "may hold only", "~root": "may hold only", "$HOME": "may hold only", "*": "may hold only",
    "COM¹": "reserved", "lpt³.txt": "reserved",   # Windows counts the superscripts ¹ ² ³ as device digits
}


@pytest.mark.parametrize("bad", sorted(BAD_NAMES), ids=lambda b: repr(b)[:24])
@pytest.mark.parametrize("field", ["name", "run_name"])
def test_bad_names_are_refused_by_the_config_naming_the_field(tmp_path, bad, field):
    values = dict(model="tiny", data=str(tmp_path), name="zorblat", out=str(tmp_path / "out"))
    values[field] = bad
    if field == "run_name" and not bad.strip():
        TrainConfig(**values).validate()  # an empty run_name means "NAME-timestamp"
        return
    with pytest.raises(ConfigError, match=BAD_NAMES[bad]) as err:
        TrainConfig(**values).validate()
    assert str(err.value).startswith(field + " ")
    with pytest.raises(EmbeddingError, match=BAD_NAMES[bad]):  # the engine's own check says the same
        check_name(bad)


@pytest.mark.parametrize("typed,stored", [(" zorb ", "zorb"), ("e\u0301toile", "\u00e9toile"), ("星空", "星空"),
                                          ("étoile_violette", "étoile_violette"), ("x" * 64, "x" * 64),
                                          ("é" * 64, "é" * 64), ("v1.5-style_2", "v1.5-style_2")])
def test_odd_but_fine_names_are_normalised(tmp_path, typed, stored):
    cfg = TrainConfig(model="tiny", data=str(tmp_path), name=typed, run_name=typed).validate()
    assert cfg.name == stored and cfg.run_name == stored
    assert unicodedata.is_normalized("NFC", cfg.name)


def test_a_decomposed_unicode_name_is_really_trained(tiny_cfg, tmp_path):
    """'étoile' typed as e + combining accent (macOS file names, some keyboards): the prompts, the token
    and the file must all use one form, or the embedding never appears in a prompt and never learns."""
    from embedtrain.trainer import Trainer
    t = Trainer(tiny_cfg.replace(name="e\u0301toile-x", steps=2))
    prompts = t.batch_inputs(0)[3]
    assert all("<emb" in t.token.expand(p) for p in prompts), prompts
    result = t.run(tmp_path / "run")
    assert result.status == "finished"
    assert not torch.allclose(t.token.vectors, t.init_vectors)  # it learned
    assert [p.name for p in result.files] == ["\u00e9toile-x.safetensors"]


def test_a_word_the_model_knows_is_refused(tiny_pipe):
    for word in ("circle", "Circle", "CIRCLE"):
        with pytest.raises(EmbeddingError, match="already a word of the model's vocabulary"):
            add_embedding(tiny_pipe.tokenizer, tiny_pipe.text_encoder, word, torch.zeros(1, 32))


def test_duplicate_names_are_refused_but_case_variants_are_distinct(tiny_pipe):
    tok, te = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    add_embedding(tok, te, "dupname", torch.zeros(1, 32))
    for again in ("dupname", " dupname"):
        with pytest.raises(EmbeddingError, match="already loaded"):
            add_embedding(tok, te, again, torch.ones(1, 32))
    add_embedding(tok, te, "\u00e9l\u00e9", torch.zeros(1, 32))
    with pytest.raises(EmbeddingError, match="already loaded"):  # the same word, decomposed
        add_embedding(tok, te, "e\u0301le\u0301", torch.zeros(1, 32))
    add_embedding(tok, te, "DupName", torch.ones(2, 32))  # gaST vs gast: both allowed (embedding.py's docstring)
    # a refused duplicate left nothing behind: tokenizer and token table still agree
    from embedtrain.embedding import install
    wrapper = install(tok, te)
    assert len(tok) == wrapper.first_id + wrapper.num_extra


@pytest.fixture(scope="module")
def tiny_pipe():
    from embedtrain.models import load_pipeline
    return load_pipeline("tiny")[0]


def test_a_hostile_name_inside_a_file_is_not_used(tmp_path):
    for inside in ("../../evil", "/etc/passwd", "con", "a b"):
        path = save_embedding(tmp_path / "honest.safetensors", torch.ones(1, 32), inside)
        assert load_embedding(path).name == "honest"
        save_embedding(tmp_path / "honest2.pt", torch.ones(1, 32), inside, fmt="a1111")
        assert load_embedding(tmp_path / "honest2.pt").name == "honest2"
    torch.save({"<../../x>": torch.ones(32)}, tmp_path / "learned_embeds.bin")
    assert load_embedding(tmp_path / "learned_embeds.bin").name == "learned_embeds"


def snapshot(folder: Path) -> set:
    return {p for p in folder.rglob("*")}


def test_a_run_writes_only_inside_its_run_folder(tiny_cfg, tmp_path, monkeypatch):
    """Snapshots, previews, all three formats, resume state, logs: every new file is under the run
    folder, nothing lands in the working directory or beside the data."""
    from embedtrain.trainer import train
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] == 3

    cfg = tiny_cfg.replace(name="星空-1", steps=4, save_every=1, preview_every=2, preview_steps=2,
                           save_formats="safetensors,a1111,diffusers", val_split=0.25, val_every=2)
    result = train(cfg, stop=stop, log=lambda s: None)
    assert result.status == "stopped"
    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "out" and run_dir.name.startswith("星空-1-")
    new = snapshot(tmp_path) - before
    outside = sorted(str(p) for p in new if p != tmp_path / "out" and run_dir not in (p, *p.parents))
    assert outside == []
    names = {p.name for p in new}
    assert {"星空-1.safetensors", "星空-1.pt", "星空-1-2.safetensors",
            "resume.pt", "log.csv", "events.jsonl", "config.json", "星空-1-2.png"} <= names, names
    assert (run_dir / "diffusers" / "星空-1.safetensors").is_file()   # named as the token in every client
    assert not any(n.endswith(".tmp") for n in names)  # atomic writes left no temp files behind
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("flag,bad", [("--name", "../../escaped"), ("--name", "/tmp/abs"), ("--run-name", "../up"),
                                      ("--name", "con"), ("--run-name", "a/b")])
def test_the_cli_refuses_hostile_names_before_writing_anything(tmp_path, flag, bad, images):
    out = tmp_path / "deep" / "out"
    args = ["--model", "tiny", "--data", str(images), "--out", str(out), "--name", "zorblat", flag, bad]
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "embedtrain", "train", *args], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr[-1500:]
    field = flag[2:].replace("-", "_")
    assert f"error: {field} " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert snapshot(tmp_path) == before
    assert not Path("/tmp/abs").exists() and not (tmp_path / "escaped").exists()


def test_the_job_manager_keeps_runs_inside_outputs(tiny_cfg, tmp_path):
    from embedtrain.ui.jobs import JobError, JobManager
    outputs = tmp_path / "outputs"
    jobs = JobManager(outputs)
    before = snapshot(tmp_path)
    for run_name in ("../escape", "/tmp/escape", "a/../../b"):
        with pytest.raises(ConfigError, match="run_name"):
            jobs.start(tiny_cfg.replace(run_name=run_name))
    with pytest.raises(ConfigError, match="name"):
        jobs.start(tiny_cfg.replace(name="../../x"))
    assert snapshot(tmp_path) == before  # nothing created, no process started
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "run").mkdir(parents=True)
    (elsewhere / "run" / "resume.pt").write_bytes(b"")
    (outputs / "link").symlink_to(elsewhere / "run")
    for resume_dir in (str(elsewhere / "run"), str(outputs / ".." / "elsewhere" / "run"), str(outputs / "link"),
                       "/etc"):
        with pytest.raises(JobError, match="not a run folder inside"):
            jobs.start(tiny_cfg, resume_dir=resume_dir)
    assert jobs.current() is None


def test_check_safe_name_is_the_single_rule():
    # the config and the engine share one rule: same answers on a spread of inputs
    for name in list(BAD_NAMES) + ["ok", "ok-2", "ok.v2", "Ünïcödé", "_under"]:
        try:
            a = check_safe_name(name)
        except ConfigError as e:
            a = ("refused", str(e))
        try:
            b = check_name(name)
        except EmbeddingError as e:
            b = ("refused", str(e))
        assert a == b, name
