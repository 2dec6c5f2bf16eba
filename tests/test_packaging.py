"""`pip install .` gives an `embedtrain` command that works outside the checkout: the package, its bundled
demo model, dataset, templates and guide are installed, and found from the installed package."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_pip_install_gives_a_working_embedtrain_command(tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--prefix", str(prefix), str(ROOT)], check=True, capture_output=True, timeout=300,
                   cwd=tmp_path)
    site = next(prefix.glob("lib/python*/site-packages"))
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import embedtrain, embedtrain.models as m, embedtrain.data as d; "
                            "print(embedtrain.__file__); print(m.DEMO_MODEL); print(d.TEMPLATE_DIR); "
                            "print(embedtrain.DOCS)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    package, demo, templates, docs = (Path(x) for x in where[:4])
    assert site in package.parents                     # the installed copy, not the checkout
    share = prefix / "share" / "embedtrain"
    assert demo == share / "assets" / "demo_model" and (demo / "unet" / "config.json").is_file()
    assert (templates / "object.txt").is_file() and (docs / "guide.md").is_file()
    assert len(list((share / "assets" / "demo_dataset").glob("*.png"))) == 12
    calc = subprocess.run([str(prefix / "bin" / "embedtrain"), "calc", "--images", "26", "--batch-size", "13",
                           "--grad-accum", "2", "--steps", "3000", "--step-unit", "batch", "--json"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert calc.returncode == 0, calc.stderr
    assert '"weight_updates": 1500' in calc.stdout
