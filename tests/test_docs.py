"""The documentation the program points at exists, and the README's commands can be typed as written.

- No tracked file names the developers' private notes (which users never get) as if they were docs.
- docs/guide.md exists, the README links it, and every link into one of its sections (the guide's path,
  '#', an anchor) used anywhere in the repository names a section that exists.
- Every `--flag` of every command in the README's bash blocks is one that command's `--help` lists, and
  every `outputs/...` file a command reads is one that a README `train` command writes.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.md"
README = ROOT / "README.md"
# Spelled in pieces so that this file does not name them itself.
PRIVATE_NOTES = tuple(name + ".md" for name in ("SCIENCE", "DESIGN", "STYLE"))


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    out = []
    for name in names.splitlines():
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue   # images, weights
        out.append(path)
    return out


def test_no_tracked_file_points_at_notes_users_do_not_have():
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
             for p in tracked_text_files()
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
             if any(name in line for name in PRIVATE_NOTES)]
    assert not found, ("these lines name notes that are not in the repository; point at docs/guide.md "
                       "(with its section) instead:\n" + "\n".join(found))


def guide_anchors() -> set[str]:
    text = GUIDE.read_text(encoding="utf-8")
    explicit = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', text))
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#{2,3} (.+)$", text, flags=re.M)}
    return explicit | slugs


def test_the_guide_exists_and_the_readme_links_it():
    assert GUIDE.is_file()
    readme = README.read_text(encoding="utf-8")
    assert "](docs/guide.md)" in readme
    # Each section has an explicit anchor equal to its heading's slug, so links survive both renderers.
    text = GUIDE.read_text(encoding="utf-8")
    explicit = re.findall(r'<a id="([a-z0-9-]+)"></a>', text)
    for heading in re.findall(r"^## (.+)$", text, flags=re.M):
        slug = re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")
        assert slug in explicit, f"section {heading!r} has no <a id=\"{slug}\"></a> before it"
    for topic in ("range-test", "sweep", "cyclical-lr", "steps-and-ga", "validation-loss", "lr-free-optimizers"):
        assert topic in explicit


def test_every_link_into_the_guide_names_a_section():
    anchors = guide_anchors()
    bad = []
    for p in tracked_text_files():
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            for anchor in re.findall(r"docs/guide\.md#([A-Za-z0-9_-]+)", line):
                if anchor not in anchors:
                    bad.append(f"{p.relative_to(ROOT)}:{i}: #{anchor}")
    assert not bad, f"links to sections the guide does not have (it has {sorted(anchors)}):\n" + "\n".join(bad)


# ---------------------------------------------------------------- the README's commands

def readme_commands() -> list[list[str]]:
    """The commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def embedtrain_invocations():
    """(program, its words) for each README command that runs embedtrain: program is ["-m", "embedtrain",
    "train"] or ["-m", "embedtrain.demo.pretrain"]; the words are what follows it."""
    out = []
    for cmd in readme_commands():
        for piece in " ".join(cmd).split(" && "):
            words = piece.split(" ")
            if "-m" not in words:
                continue
            i = words.index("-m")
            module = words[i + 1]
            if module == "embedtrain":
                out.append((["-m", "embedtrain", words[i + 2]], words[i + 3:]))
            elif module.startswith("embedtrain."):
                out.append((["-m", module], words[i + 2:]))
    return out


def test_the_readme_has_commands_for_every_subcommand():
    used = {" ".join(prog[1:]) for prog, _ in embedtrain_invocations()}
    for sub in ("train", "calc", "lr-find", "sweep", "grid", "study", "score"):
        assert f"embedtrain {sub}" in used, f"the README shows no `python -m embedtrain {sub}` command"


@pytest.mark.parametrize("prog", sorted({" ".join(p) for p, _ in embedtrain_invocations()}))
def test_every_readme_flag_is_in_the_commands_help(prog):
    helptext = subprocess.run([sys.executable, *prog.split(" "), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120).stdout
    listed = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", helptext))
    assert listed, f"{prog} --help printed no flags"
    typed = {w.split("=")[0] for p, words in embedtrain_invocations() if " ".join(p) == prog
             for w in words if w.startswith("--")}
    missing = sorted(typed - listed)
    assert not missing, f"the README gives `{prog}` flags its --help does not list: {missing}"


def _flag_values(words, flag):
    """Every value given to `flag` (nargs='*' flags such as --embeddings take words up to the next flag)."""
    values = []
    for i, w in enumerate(words):
        if w == flag:
            for v in words[i + 1:]:
                if v.startswith("--"):
                    break
                values.append(v)
    return values


def test_readme_commands_read_only_files_that_readme_commands_write():
    """No placeholders such as outputs/RUN/... or my-run.json: every outputs/ file a command reads comes
    from a README `train --run-name` run (its embedding, its --save-every snapshots or its config.json)."""
    runs = {}
    for prog, words in embedtrain_invocations():
        if prog[-1] == "train" and "--run-name" in words and "--config" not in words:
            name = _flag_values(words, "--name")[0]
            every = int((_flag_values(words, "--save-every") or ["0"])[0])
            runs[_flag_values(words, "--run-name")[0]] = (name, every)
    assert "purplestar-demo" in runs
    for prog, words in embedtrain_invocations():
        for flag in ("--embedding", "--embeddings", "--config", "--resume", "--data", "--evaluate-model"):
            for value in _flag_values(words, flag):
                path = Path(value)
                if path.parts[0] != "outputs":
                    assert (ROOT / path).exists(), f"{' '.join(prog)} {flag} {value}: no such file in the repository"
                    continue
                assert len(path.parts) == 3 and path.parts[1] in runs, \
                    f"{' '.join(prog)} {flag} {value}: no README train command writes this folder"
                name, every = runs[path.parts[1]]
                snapshot = re.fullmatch(re.escape(name) + r"-(\d+)\.safetensors", path.name)
                assert (path.name in (f"{name}.safetensors", "config.json")
                        or (snapshot and every and int(snapshot.group(1)) % every == 0)), \
                    f"{' '.join(prog)} {flag} {value}: the README's run {path.parts[1]!r} does not write it"
