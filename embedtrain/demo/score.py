"""The fidelity and editability scores of an embedding on the demo model, and the model card's scores.

Images are sampled from the demo model and read by the demo world's judge (demo.judge): concept
fidelity (the held-out purple star drawn from the embedding's name) and editability (the concept kept
on a background the prompt asks for). `--evaluate-model` measures the model card's scores and
rewrites the card (demo.card).

    python -m embedtrain score --model demo --embedding FILE [--json]
    python -m embedtrain.demo.score --evaluate-model assets/demo_model   # scores for the model card
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from embedtrain import ASSETS, EmbedtrainError
from embedtrain.demo.judge import clean_accuracy, judge, score_images
from embedtrain.demo.model import GUIDANCE, SAMPLE_STEPS
from embedtrain.demo.world import BACKGROUNDS, COLOURS, HELD_OUT, RESOLUTION, SHAPES, Spec

DEMO_MODEL = ASSETS / "demo_model"
MAX_SEEDS = 1000             # --n: seeds per prompt (the card's protocol uses CARD_SEEDS)

# ---------------------------------------------------------------- generation and scores
# seeds per prompt: a quick score, and the model card's protocol (at 8 the scores of one embedding
# swung by up to +-0.3 with the seed block on the demo model; 32 is the card's and the tests' number)
QUICK_SEEDS = 8
CARD_SEEDS = 32
CARD_SEEN = 384       # seen-combination prompts on the card (at 96 the score moved +-0.05 with the seed block)
FIDELITY_PROMPTS = ("a photo of a {t}", "a {t}", "a picture of the {t}", "a close up photo of a {t}")
EDIT_BACKGROUNDS = ("green", "blue", "yellow", "white")


class Progress:
    """Progress of a scoring run on stderr (stdout keeps only the scores, so --json stays parseable):
    one line per sampled batch, "score: 96/896 images (seen combinations), 41 s elapsed".

    `plan(total)` sets the number of images the whole run samples, `stage(label)` names the part now
    running, and calling the object with n counts n more images done."""

    def __init__(self, stream=None):
        self.stream = stream
        self.total = self.done = 0
        self.label = ""
        self.t0 = time.perf_counter()

    def plan(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def say(self, text: str) -> None:
        print(f"score: {text}, {time.perf_counter() - self.t0:.0f} s elapsed", file=self.stream or sys.stderr,
              flush=True)

    def stage(self, label: str) -> None:
        self.label = label

    def __call__(self, n: int) -> None:
        self.done += n
        self.say(f"{self.done}/{self.total} images" + (f" ({self.label})" if self.label else ""))


def generate(pipe, prompts, seeds, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
             batch_size: int = 32, progress=None):
    """One image per (prompt, seed); each image's noise depends only on its own seed.
    progress: optional callable, given the number of images of each batch once it is sampled."""
    import torch
    images = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        with torch.no_grad():
            out = pipe(prompt=list(prompts[i:i + batch_size]), generator=gens, num_inference_steps=steps,
                       guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION, output_type="pil")
        images += out.images
        if progress:
            progress(len(out.images))
    return images


def fidelity_images(n: int) -> int:
    """Images one `fidelity` call samples: every fidelity and editability prompt, n seeds each."""
    return (len(FIDELITY_PROMPTS) + len(EDIT_BACKGROUNDS)) * n


def fidelity(pipe, token: str, n: int = QUICK_SEEDS, seed: int = 0, steps: int = SAMPLE_STEPS,
             guidance: float = GUIDANCE, concept: tuple[str, str] = HELD_OUT, expand=None, progress=None) -> dict:
    """Concept fidelity and editability of `token` (already usable in prompts of `pipe`).

    Args:
        token: the word written in prompts (an embedding's name, or e.g. the init text "star").
        n: seeds per prompt (seed, seed + 1, ...), the same for every prompt.
        concept: (colour, shape) the token should draw.
        expand: optional function applied to each prompt before sampling (e.g. TokenSet.expand).
        progress: optional callable given the images of each sampled batch (see `Progress`).
    Returns: {"concept_fidelity", "editability", "images"...}; fidelity = shape and colour right for
        FIDELITY_PROMPTS; editability = background right and the concept kept for
        "a {t} on a {bg} background", bg in EDIT_BACKGROUNDS.
    """
    colour, shape = concept
    seeds = [seed + i for i in range(n)]
    fid = [(p.format(t=token), Spec(shape, colour, None)) for p in FIDELITY_PROMPTS for _ in seeds]
    edit = [(f"a {token} on a {b} background", Spec(shape, colour, b)) for b in EDIT_BACKGROUNDS for _ in seeds]
    prompts = [p for p, _ in fid + edit]
    if expand:
        prompts = [expand(p) for p in prompts]
    images = generate(pipe, prompts, seeds * (len(FIDELITY_PROMPTS) + len(EDIT_BACKGROUNDS)), steps, guidance,
                      progress=progress)
    k = len(fid)
    return {"concept_fidelity": round(score_images(images[:k], fid), 4),
            "editability": round(score_images(images[k:], edit), 4),
            "images": images, "prompts": [p for p, _ in fid + edit]}


def seen_agreement(pipe, n: int = 96, seed: int = 0, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
                   form: str = "a {c} {s} on a {b} background", progress=None) -> dict:
    """Judge agreement on seen (shape, colour, background) combinations: shape and colour both right."""
    import random
    rng = random.Random(seed)
    specs = []
    while len(specs) < n:
        s, c = rng.choice(SHAPES), rng.choice(COLOURS)
        if (c, s) == HELD_OUT:
            continue
        specs.append(Spec(s, c, rng.choice([b for b in BACKGROUNDS if b != c])))
    prompts = [form.format(c=sp.colour, s=sp.shape, b=sp.background) for sp in specs]
    images = generate(pipe, prompts, [seed + i for i in range(n)], steps, guidance, progress=progress)
    js = [judge(im) for im in images]
    return {
        "shape_and_colour": round(sum(j.shape == sp.shape and j.colour == sp.colour for j, sp in zip(js, specs)) / n, 4),
        "shape": round(sum(j.shape == sp.shape for j, sp in zip(js, specs)) / n, 4),
        "colour": round(sum(j.colour == sp.colour for j, sp in zip(js, specs)) / n, 4),
        "background": round(sum(j.background == sp.background for j, sp in zip(js, specs)) / n, 4),
        "images": images, "prompts": prompts,
    }


def load_demo_pipeline(model: str = "demo"):
    """The demo pipeline from `assets/demo_model` ("demo") or a diffusers folder, fp32, offline."""
    import torch
    from diffusers import StableDiffusionPipeline
    folder = DEMO_MODEL if model == "demo" else Path(model)
    if not (folder / "model_index.json").is_file():
        raise EmbedtrainError(f"--model {model!r}: no diffusers pipeline at {folder} (model_index.json missing)"
                         + ("; run `python -m embedtrain.demo.pretrain --out assets/demo_model`" if model == "demo" else ""))
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as e:
        # a damaged or partial model folder: one line naming it (the libraries' own errors run to pages)
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise EmbedtrainError(f"--model {model!r}: cannot load the diffusers pipeline at {folder} ({reason})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_embedding_into(pipe, path, token: str | None = None):
    """Load an embedding file into pipe; returns (token, expand) where expand rewrites prompts."""
    try:
        from embedtrain.embedding import load_embedding
        from embedtrain.textside import text_side
    except ImportError:
        text_side = None
    if text_side is not None:   # SD: one vector set; SDXL: clip_l + clip_g; the other family is refused
        emb = load_embedding(path)
        model = repr(getattr(pipe, "name_or_path", "") or "the model")
        ts = text_side(pipe).add_loaded(emb, token or emb.name, f"embedding {path}", model,
                                        check_vocab=True)
        return ts.name, ts.expand
    token = token or Path(path).stem
    pipe.load_textual_inversion(str(path), token=token)
    return token, None


def _check_embedding(path) -> None:
    """Read the file once, so an unusable one is refused in a moment (EmbeddingError naming it) instead of
    after the model has loaded."""
    try:
        from embedtrain.embedding import load_embedding
    except ImportError:   # standalone use: diffusers' loader will say what it thinks of the file
        return
    load_embedding(path)


def _print_scores(scores: dict, as_json: bool) -> None:
    clean = {k: v for k, v in scores.items() if k not in ("images", "prompts")}
    if as_json:
        print(json.dumps(clean, indent=2))
    else:
        for k, v in clean.items():    # keys such as concept_fidelity read as words; the card's labels as written
            print(f"{k.replace('_', ' ') if k.isidentifier() else k}: {v}")


def evaluate_model(folder: Path, n_seen: int = CARD_SEEN, n: int = CARD_SEEDS, embedding: str | None = None,
                   ti_note: str = "", status: str | None = None, log=print, progress: Progress | None = None) -> dict:
    """Measure the model card's scores and rewrite the card (scores.json + README.md).

    Scores and status saved for this same model state (weights and sampler) are kept unless measured or
    given again; those of another state are dropped (a status describes the state it was written about).
    progress: a `Progress` to report to (the CLI's prints a line per sampled batch); None = silent.
    """
    from embedtrain.demo.card import CARD_STATS, read_scores, scores_current, write_scores
    folder = Path(folder)
    if not (folder / CARD_STATS).is_file():
        raise EmbedtrainError(f"{folder}: not a demo model folder ({CARD_STATS} is missing; it is written by "
                              "python -m embedtrain.demo.pretrain)")
    stats = json.loads((folder / CARD_STATS).read_text(encoding="utf-8"))
    progress = progress or (lambda n: None)
    if isinstance(progress, Progress):
        progress.plan(n_seen + fidelity_images(n) * (3 if embedding else 2))
        progress.say(f"loading {folder}")
    pipe = load_demo_pipeline(str(folder))
    saved = read_scores(folder)
    same = scores_current(saved, stats, folder)
    if saved and not same:
        log(f"dropping the scores{' and status' if saved.get('status') else ''} of another model state "
            f"({saved.get('measured_on') or 'not recorded'})")
    scores = dict(saved.get("scores", {})) if same else {}
    scores["judge accuracy on 500 clean renders (shape, colour, background all right)"] = clean_accuracy()["all"]
    _stage(progress, f"seen combinations, {n_seen} prompts")
    seen = seen_agreement(pipe, n=n_seen, progress=progress)
    sampler = f"{SAMPLE_STEPS} {type(pipe.scheduler).__name__} steps, guidance {GUIDANCE}"
    scores[f"seen combinations, judge agrees on shape and colour ({n_seen} prompts 'a COLOUR SHAPE on a BG "
           f"background', {sampler})"] = seen["shape_and_colour"]
    scores["seen combinations: shape / colour / background right"] = \
        f"{seen['shape']} / {seen['colour']} / {seen['background']}"
    _stage(progress, f"init text '{HELD_OUT[1]}', {n} seeds per prompt")
    base = fidelity(pipe, HELD_OUT[1], n=n, progress=progress)
    scores[f"held-out {' '.join(HELD_OUT)}, init text '{HELD_OUT[1]}' before training ({n} seeds per prompt): "
           "concept fidelity / editability"] = f"{base['concept_fidelity']} / {base['editability']}"
    _stage(progress, f"the words '{' '.join(HELD_OUT)}', {n} seeds per prompt")
    words = fidelity(pipe, " ".join(HELD_OUT), n=n, progress=progress)
    scores[f"held-out concept prompted by its words '{' '.join(HELD_OUT)}' ({n} seeds per prompt): concept "
           "fidelity / editability"] = \
        f"{words['concept_fidelity']} / {words['editability']}"
    if embedding:
        token, expand = load_embedding_into(pipe, embedding)
        _stage(progress, f"embedding {Path(embedding).name}, {n} seeds per prompt")
        ti = fidelity(pipe, token, n=n, expand=expand, progress=progress)
        scores[f"after textual inversion ({ti_note or Path(embedding).name}; {n} seeds per prompt): concept "
               "fidelity / editability"] = \
            f"{ti['concept_fidelity']} / {ti['editability']}"
    status = status if status is not None else (saved.get("status", "") if same else "")
    write_scores(folder, stats, scores, status)
    return scores


def _stage(progress, label: str) -> None:
    if isinstance(progress, Progress):
        progress.stage(label)


def _one_line(err: BaseException) -> str:
    """An error as one line that names the file: OSError's filename and reason, else the message."""
    if isinstance(err, OSError) and err.filename:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def cli(argv=None) -> int:
    """`python -m embedtrain score`: the scores on stdout, progress on stderr; a file that cannot be used
    (missing, damaged, a refused pickle) or a folder that is not a demo model gives one line and exit 2."""
    p = argparse.ArgumentParser(prog="python -m embedtrain score",
                                description="concept fidelity and editability of an embedding on the demo model")
    p.add_argument("--model", default="demo", help="'demo' (assets/demo_model) or a diffusers folder")
    p.add_argument("--embedding", help="embedding file (.safetensors, .pt, learned_embeds)")
    p.add_argument("--token", help="word to write in prompts (default: the embedding's name); without "
                                   "--embedding, score this existing word, e.g. the init text 'star'")
    p.add_argument("--n", type=int, default=None,
                   help=f"seeds per prompt (default {QUICK_SEEDS}, quick; --evaluate-model: {CARD_SEEDS}, the card's "
                        f"protocol: at {QUICK_SEEDS} the scores swing by up to +-0.3 with the seed block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="sampler steps")
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--save-grid", help="write the generated images as one PNG")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--evaluate-model", metavar="FOLDER", help="measure the model card's scores and rewrite it")
    p.add_argument("--ti-note", default="", help="with --evaluate-model --embedding: how the embedding was trained")
    p.add_argument("--status-file", help="with --evaluate-model: a markdown file whose text becomes the card's "
                                          "Status section (kept on later evaluations of the same weights)")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = CARD_SEEDS if args.evaluate_model else QUICK_SEEDS
    if not 1 <= args.n <= MAX_SEEDS:   # every image is kept for the grid: n is bounded like any size
        p.error(f"--n must be between 1 and {MAX_SEEDS} seeds per prompt, got {args.n}")
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps must be between 1 and 1000 sampler steps, got {args.steps}")
    if not args.evaluate_model and not args.embedding and not args.token:
        p.error("give --embedding FILE (or --token WORD to score a word the model knows)")
    try:
        if args.embedding and Path(args.embedding).is_dir():   # before the model loads
            raise EmbedtrainError(f"embedding {args.embedding} is a folder; give the embedding file inside it")
        if args.embedding and not Path(args.embedding).is_file():
            raise EmbedtrainError(f"embedding file {args.embedding} does not exist")
        if args.embedding:
            _check_embedding(args.embedding)   # a damaged or hostile file is one line, before the model loads
        if args.evaluate_model:
            status = None
            if args.status_file:
                if not Path(args.status_file).is_file():
                    p.error(f"--status-file {args.status_file!r}: no such file")
                try:
                    status = Path(args.status_file).read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    raise EmbedtrainError(f"--status-file {args.status_file}: not UTF-8 text; save it as UTF-8 "
                                          "markdown") from None
            if not Path(args.evaluate_model).is_dir():
                raise EmbedtrainError(f"--evaluate-model {args.evaluate_model}: no such folder")
            _print_scores(evaluate_model(Path(args.evaluate_model), n=args.n, embedding=args.embedding,
                                         ti_note=args.ti_note, status=status, progress=Progress(),
                                         log=lambda m: print(f"score: {m}", file=sys.stderr)), args.json)
            return 0
        progress = Progress()
        progress.plan(fidelity_images(args.n))
        progress.say(f"loading model {args.model}")
        try:
            pipe = load_demo_pipeline(args.model)
            token, expand = (load_embedding_into(pipe, args.embedding, args.token) if args.embedding
                             else (args.token, None))
        except ValueError as e:   # an embedding that diffusers' own loader refuses (no embedtrain.embedding)
            raise EmbedtrainError(str(e)) from None
        progress.stage(f"'{args.token or token}', {args.n} seeds per prompt")
        scores = fidelity(pipe, token, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                          expand=expand, progress=progress)
    except (EmbedtrainError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.save_grid:
        from embedtrain.grid import compose
        ims = scores["images"]   # one row per prompt, one column per seed, at the images' own size
        grid = compose(ims, len(ims) // (len(FIDELITY_PROMPTS) + len(EDIT_BACKGROUNDS)), cell=ims[0].width)
        try:
            grid.save(args.save_grid)
        except (OSError, ValueError) as e:   # unwritable folder, or a name without a known image suffix
            print(f"error: --save-grid {args.save_grid}: {_one_line(e)} (the scores follow)", file=sys.stderr)
            _print_scores(scores, args.json)
            return 2
    _print_scores(scores, args.json)
    return 0


if __name__ == "__main__":
    from embedtrain.__main__ import quiet_libraries
    quiet_libraries()
    sys.exit(cli())
