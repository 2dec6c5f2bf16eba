"""Exposure through the app's HTTP API: only the outputs folder and the bundled assets are served;
the working folder, dotfiles and system files are not; with --auth nothing answers without credentials."""

import urllib.error
import urllib.parse
import urllib.request

import pytest

from uihelp import ROOT, app_server


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=15) as r:
            r.read(64)
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_file_route_serves_only_outputs_and_assets(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "run").mkdir()
    served = outputs / "run" / "note.txt"
    served.write_text("hello")
    secret = tmp_path / ".env"
    secret.write_text("TOKEN=abc")
    with app_server(outputs) as url:
        def file_url(path):
            return url + "gradio_api/file=" + urllib.parse.quote(str(path))

        assert status_of(file_url(served)) == 200
        assert status_of(file_url(ROOT / "assets" / "templates" / "object.txt")) == 200
        for path in ("/etc/passwd", ROOT / "app.py", ROOT / "README.md", secret, outputs / ".." / ".env",
                     str(outputs) + "/../.env", ROOT / ".git" / "config"):
            code = status_of(file_url(path))
            assert code in (403, 404), f"{path} answered {code}"
        # Encoded traversal through the route itself
        assert status_of(url + "gradio_api/file=" + urllib.parse.quote(str(outputs)) + "/..%2F.env") in (403, 404)


@pytest.mark.slow
def test_auth_guards_pages_api_and_files(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "x.txt").write_text("private")
    with app_server(outputs, "--auth", "ann:secret") as url:
        for path in ("gradio_api/info", "config", "gradio_api/file=" + urllib.parse.quote(str(outputs / "x.txt"))):
            assert status_of(url + path) in (401, 403), path
