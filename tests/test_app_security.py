"""Exposure through the app's HTTP API: only the outputs folder and the bundled assets are served;
the working folder, dotfiles and system files are not; with --auth nothing answers without credentials;
the page's own events read folders only inside outputs, assets, --data and --allow-dir."""

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid

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


def call_event(url: str, api_name: str, data: list, timeout: float = 60) -> list:
    """Call one of the page's events the way the page does (queue/join, then its event stream): private
    events are hidden from API clients, not from anyone who speaks HTTP."""
    with urllib.request.urlopen(url + "config", timeout=15) as r:
        dep = next(d for d in json.load(r)["dependencies"] if d.get("api_name") == api_name)
    session = uuid.uuid4().hex
    body = json.dumps({"data": data, "fn_index": dep["id"], "session_hash": session,
                       "trigger_id": dep["targets"][0][0], "event_data": None}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "gradio_api/queue/join", body,
                                                  {"Content-Type": "application/json"}), timeout=15).read()
    with urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=timeout) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                return json.loads(line[5:])["output"]["data"]
    raise AssertionError(f"{api_name} sent no result")


@pytest.mark.slow
def test_dataset_event_reads_only_allowed_folders(tmp_path):
    """/dataset_view (the dataset box) returned thumbnails and caption text of any folder on the server
    and said whether a path exists. Now: the same refusal for an existing and a missing folder outside
    outputs, assets, --data and --allow-dir; a folder given with --allow-dir is read."""
    from conftest import make_images
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    secret = make_images(tmp_path / "secret", 2)
    (secret / "img00.txt").write_text("SECRET-TOKEN-123")
    more = make_images(tmp_path / "more", 3)
    with app_server(outputs) as url:
        text, pics = call_event(url, "dataset_view", [str(secret)])
        assert "SECRET" not in json.dumps([text, pics]) and not pics, text
        assert "not one the web UI may read" in text and "--allow-dir" in text
        missing, _ = call_event(url, "dataset_view", [str(tmp_path / "absent")])
        assert missing.replace("absent", "secret") == text
    with app_server(outputs, "--allow-dir", str(more)) as url:
        text, pics = call_event(url, "dataset_view", [str(more)])
        assert text.startswith("3 usable images") and len(pics) == 3
