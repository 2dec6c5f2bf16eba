"""embedtrain's web UI. `python app.py` opens it on the built-in demo model and demo dataset.

Flags: --host (default 127.0.0.1), --port, --auth user:pass or a file of user:pass lines, --model,
--data, --outputs, --allow-dir (another folder the page may read), --models-dir (an A1111 or ComfyUI
install, or a folder of checkpoints: its models fill the model dropdowns, its embeddings the Grid tab's
choices), --share (a public Gradio link), --insecure (allow a non-local --host or --share without --auth).
Only the outputs folder and the bundled assets are served; the page reads folders only inside those, the
--data folder, each --allow-dir and each --models-dir. Training runs in its own process
(embedtrain.ui.jobs), so closing the page or restarting the server never stops a job.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

from embedtrain import ASSETS  # noqa: E402  (light: no torch, no gradio)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_UPLOAD = "20mb"


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`user:pass`, or a file with one `user:pass` per line (blank lines and # comments ignored)."""
    if not value:
        return None
    lines = [value]
    if ":" not in value or Path(value).is_file():
        path = Path(value)
        if not path.is_file():
            raise SystemExit(f"--auth must be user:pass or an existing file of user:pass lines, got {value!r}")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
    pairs = []
    for ln in lines:
        user, sep, password = ln.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth entries must look like user:pass (both non-empty), got {ln!r}")
        pairs.append((user, password))
    if not pairs:
        raise SystemExit(f"--auth file {value} holds no user:pass line")
    return pairs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("EMBEDTRAIN_PORT", 7860)))
    p.add_argument("--auth", help="user:pass, or a file of user:pass lines; required for a non-local --host")
    p.add_argument("--insecure", action="store_true", help="allow a non-local --host or --share without --auth")
    p.add_argument("--share", action="store_true",
                   help="open a public gradio.live link (needs --auth, or --insecure); off unless given, even "
                        "where GRADIO_SHARE, Colab or Kaggle would turn it on")
    p.add_argument("--model", default="demo", help="default model: 'demo', a diffusers folder or a checkpoint")
    p.add_argument("--data", default=str(ASSETS / "demo_dataset"),
                   help="default dataset folder (the page may read it)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="FOLDER",
                   help="another folder whose datasets the page may read (repeat for more); besides it, the "
                        "page reads only the outputs folder, the bundled assets and --data")
    p.add_argument("--models-dir", action="append", default=[], metavar="FOLDER",
                   help="an AUTOMATIC1111 or ComfyUI install (or its models folder, or a folder of .safetensors/"
                        ".ckpt checkpoints and diffusers folders); repeat for more. Its checkpoints fill the model "
                        "dropdowns (architecture read from each file's header), its embeddings folder the Grid "
                        "tab's choices; the page may read it")
    p.add_argument("--outputs", default=str(ROOT / "outputs"), help="where runs, grids and sweeps are written")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    auth = parse_auth(args.auth)
    if args.host not in LOCAL_HOSTS and not auth and not args.insecure:
        print(f"refusing to serve on --host {args.host} without --auth: anyone who can reach this machine "
              "could train, read outputs and fill the disk. Add --auth user:pass (or --insecure if you "
              "really mean it).", file=sys.stderr)
        return 2
    if args.share and not auth and not args.insecure:
        print("refusing to open a --share link without --auth: anyone with the link could train, read outputs "
              "and fill the disk. Add --auth user:pass (or --insecure if you really mean it).", file=sys.stderr)
        return 2
    if os.environ.get("GRADIO_SHARE", "").lower() == "true" and not args.share:
        print("GRADIO_SHARE=true is ignored: no public link unless you pass --share (with --auth)", file=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from embedtrain.__main__ import quiet_libraries
    quiet_libraries()   # the libraries' start-up notices say nothing about the user's run
    from embedtrain.ui.app import CSS, build_app
    from embedtrain.ui.context import UIContext

    for folder in args.models_dir:
        if not Path(folder).expanduser().is_dir():
            print(f"--models-dir {folder} is not a folder: give an AUTOMATIC1111 or ComfyUI install, or a folder of "
                  "checkpoints", file=sys.stderr)
            return 2
    ctx = UIContext(outputs=Path(args.outputs), model=args.model, data=args.data, allow=args.allow_dir,
                    models_dirs=args.models_dir)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    # share is always passed: left out, Gradio opens a public link by itself in Colab, Kaggle or with
    # GRADIO_SHARE=true, with no auth (the checks above would never have seen it).
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, css=CSS, share=args.share,
                allowed_paths=[str(ctx.outputs), str(ASSETS)], max_file_size=MAX_UPLOAD,
                show_error=True, inbrowser=False, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
