"""The demo world: deterministic renders, the held-out concept, the judge, the vocabulary."""

import random

import numpy as np
import pytest

from embedtrain.demo import world
from embedtrain.demo.judge import agrees, clean_accuracy, colour_class, judge, score_images
from embedtrain.demo.world import HELD_OUT, PALETTE, Spec, complete, pretraining_sample, render


def test_render_is_deterministic_and_seed_dependent():
    a, b = render(Spec(), seed=3), render(Spec(), seed=3)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(render(Spec(), seed=4)))


def test_render_uses_the_given_fields():
    spec = Spec("cross", "yellow", "blue", 32, 32, 30)
    img = np.asarray(render(spec, seed=0))
    assert tuple(img[32, 32]) == PALETTE["yellow"]
    assert tuple(img[1, 1]) == PALETTE["blue"]


def test_held_out_concept_never_in_pretraining_samples():
    rng = random.Random(0)
    purple, star = 0, 0
    for _ in range(3000):
        spec, text = pretraining_sample(rng)
        assert (spec.colour, spec.shape) != HELD_OUT
        words = text.split()
        assert " ".join(HELD_OUT) not in text
        if HELD_OUT[0] in words and HELD_OUT[1] in words:   # only as the background of a star
            assert spec.background == HELD_OUT[0] and f"{HELD_OUT[0]} background" in text, text
        purple += spec.colour == HELD_OUT[0]
        star += spec.shape == HELD_OUT[1]
    assert purple > 100 and star > 100   # each half of the concept is seen on its own


def test_captions_are_true_and_varied():
    rng = random.Random(1)
    forms = set()
    for _ in range(500):
        spec, text = pretraining_sample(rng)
        words = text.split()
        assert spec.shape in words or "shape" in words
        for c in world.COLOURS:
            if c in words and not text.endswith(f"{c} background") and f"{c} background with" not in text:
                assert c == spec.colour, text
        forms.add(" ".join("X" if w in world.COLOURS + world.SHAPES else w for w in words))
    assert len(forms) > 40


def test_complete_refuses_impossible_specs():
    with pytest.raises(ValueError):
        complete(Spec("star", "purple"), random.Random(0), allow_held_out=False)
    with pytest.raises(ValueError):
        complete(Spec("star", "red", "red"), random.Random(0))


def test_judge_accuracy_on_clean_renders():
    acc = clean_accuracy(n=300, seed=7)
    assert acc["all"] >= 0.98, acc


def test_judge_tolerates_blur_and_colour_drift():
    from PIL import ImageFilter
    rng = random.Random(11)
    right = 0
    n = 100
    for i in range(n):
        spec = complete(Spec(), rng)
        img = render(spec, i).filter(ImageFilter.GaussianBlur(1.2))
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr * rng.uniform(0.85, 1.1) + rng.uniform(-12, 12), 0, 255).astype(np.uint8)
        from PIL import Image
        right += agrees(judge(Image.fromarray(arr)), spec)
    assert right / n >= 0.9


def test_colour_classes_of_the_palette():
    for name, rgb in PALETTE.items():
        assert colour_class(rgb) == name
    assert colour_class((120, 60, 170)) == "purple"   # a washed-out purple


def test_score_images_counts_only_named_attributes():
    imgs = [render(Spec("star", "purple", "green"), 0), render(Spec("ring", "red", "green"), 0)]
    assert score_images(imgs, [Spec("star", "purple"), Spec("star", "purple")]) == 0.5
    assert score_images(imgs, [("p", Spec(background="green"))] * 2) == 1.0


def test_world_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer
    from embedtrain.demo.model import write_tokenizer
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path, world.WORDS)))
    for w in world.WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    rng = random.Random(2)
    for _ in range(50):   # every caption word is a world word
        _, text = pretraining_sample(rng)
        assert all(w in world.WORDS for w in text.split()), text


def test_demo_dataset_is_the_held_out_concept(tmp_path):
    paths = world.make_dataset(tmp_path, n=8)
    assert len(paths) == 8
    for p in paths:
        j = judge(__import__("PIL.Image", fromlist=["Image"]).open(p))
        assert (j.colour, j.shape) == HELD_OUT
        cap = p.with_suffix(".txt").read_text().strip()
        assert cap.endswith(f"{j.background} background") and HELD_OUT[0] not in cap
