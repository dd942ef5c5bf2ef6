"""`vitlab serve` against a real uvicorn server on 127.0.0.1, with a model trained here on the built-in digits:
the API's values (equal to `vitlab predict`'s), the bad inputs, requests in flight together, the command itself,
and the page in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.data import load_data
from vitlab.explain.maps import compute_attention_maps
from vitlab.api import predict
from vitlab.checkpoints import read_state
from vitlab.server import Limits, RunningServer, create_app

from _train_fixtures import tiny_config

CHROMIUM = Path("/usr/bin/chromium")
LIMITS = Limits(max_bytes=64 * 1024, max_files=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run trained on the built-in digits in a few seconds (two blocks, so the rollout has two layers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config(tmp_path_factory.mktemp("serve"), data="digits", epochs=2, batch_size=64,
                             model_overrides={"depth": 2, "hidden_dim": 32, "num_heads": 2, "mlp_dim": 64})
        return Path(vitlab.train(config).run_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(run):
    """The app over the run, served by uvicorn in a thread on a free port of 127.0.0.1 (small upload limits)."""
    app = create_app(vitlab.load(run), limits=LIMITS)
    with RunningServer(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Test-split digits as files: the 8x8 grayscale PNG, and a 64x48 RGB JPEG of another digit."""
    root = tmp_path_factory.mktemp("digits")
    test = load_data("digits").test
    files = {}
    for i in range(4):
        path = root / f"digit{i}.png"
        Image.fromarray(test.images[i, 0].numpy(), mode="L").save(path)
        files[f"png{i}"] = path
    big = Image.fromarray(test.images[5, 0].numpy(), mode="L").resize((64, 48), Image.NEAREST).convert("RGB")
    files["jpg"] = root / "digit5.jpg"
    big.save(files["jpg"], quality=90)
    return files


def _post(server, files, timeout=60, **fields) -> httpx.Response:
    """POST /api/predict with ``files`` [(field, name, bytes), ...] and text ``fields``."""
    parts = [(field, (name, data)) for field, name, data in files]
    return httpx.post(f"{server.url}/api/predict", files=parts, data=fields, timeout=timeout)


def _image(path: Path, field: str = "image"):
    return (field, path.name, path.read_bytes())


def test_healthz_model_card_and_openapi(server, run):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    card = httpx.get(f"{server.url}/api/model").json()
    loaded = vitlab.load(run)
    assert card["name"] == "vit-digits-p2" and card["run"] == str(run) and card["format"] == "vitlab"
    assert card["classes"] == loaded.labels and len(card["classes"]) == 10
    assert card["image_size"] == [8, 8] and card["channels"] == 1 and card["patch_size"] == [2, 2]
    assert card["normalization"] == {"mean": list(loaded.preprocess.mean), "std": list(loaded.preprocess.std)}
    state = read_state(run / "best")
    assert card["metrics"]["test_top1"] == state.best_top1 and card["metrics"]["epoch"] == state.best_epoch
    assert card["metrics"]["data"] == "digits"
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert set(paths) == {"/api/predict", "/api/model", "/healthz"}
    assert "multipart/form-data" in paths["/api/predict"]["post"]["requestBody"]["content"]


def test_page_is_served_whole(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="files"' in page.text and "api/predict" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network


def test_probabilities_equal_vitlab_predict(server, run, photos, capsys):
    files = [photos["png0"], photos["jpg"]]
    r = _post(server, [_image(f) for f in files], top_k="10")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    expected = predict(run, files, top_k=10)  # the function behind `vitlab predict`
    assert main(["predict", str(run), *map(str, files), "--top-k", "10", "--json"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for got, want, line in zip(results, expected, cli):
        assert got["file"] == Path(want.file).name
        assert [t["label"] for t in got["top"]] == [lab for lab, _ in want.top] == [t["label"] for t in line["top"]]
        np.testing.assert_allclose([t["probability"] for t in got["top"]], [p for _, p in want.top], rtol=0, atol=1e-6)
        np.testing.assert_allclose([t["probability"] for t in got["top"]], [t["probability"] for t in line["top"]],
                                   rtol=0, atol=1e-6)
    default = _post(server, [_image(files[0])]).json()["results"][0]["top"]  # alone: batch 1, as predict above
    assert len(default) == 5 and [t["label"] for t in default] == [lab for lab, _ in expected[0].top[:5]]
    np.testing.assert_allclose([t["probability"] for t in default], [p for _, p in expected[0].top[:5]], atol=1e-6)


def test_attention_as_png_and_as_numbers(server, run, photos):
    png = _post(server, [_image(photos["png1"])], attention="png", heads="true").json()["results"][0]["attention"]
    overlays = [png["overlay"], *png["heads"]]
    assert len(png["heads"]) == 2  # the last layer's two heads
    for url in overlays:
        assert url.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size == (224, 224) and im.mode == "RGB"
    grid = _post(server, [_image(photos["png1"])], attention="grid", heads="1").json()["results"][0]["attention"]
    loaded = vitlab.load(run)
    image = torch.from_numpy(np.array(Image.open(photos["png1"])))[None, None]  # 8x8 L: the model's input
    maps = compute_attention_maps(loaded.model, loaded.preprocess(image))
    np.testing.assert_allclose(grid["grid"], maps.maps[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(grid["heads"], maps.head_maps[0].numpy(), atol=1e-6)
    assert np.asarray(grid["grid"]).shape == (4, 4) and abs(np.sum(grid["grid"]) - 1) < 1e-4
    assert "attention" not in _post(server, [_image(photos["png1"])]).json()["results"][0]


def test_one_forward_pass_an_upload_gives_the_probabilities_and_the_attention_map(server, photos):
    """With an attention map the model runs once per request (the maps' pass gives the probabilities too), and
    those probabilities are the ones a request without a map gets."""
    model = server.app.state.served.loaded.model
    passes = []
    hook = model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    try:
        results = {a: _post(server, [_image(photos["png1"]), _image(photos["png2"])], attention=a).json()["results"]
                   for a in ("none", "png", "grid")}
    finally:
        hook.remove()
    assert passes == [2, 2, 2]  # one batched pass of both uploads a request
    for a in ("png", "grid"):
        for plain, mapped in zip(results["none"], results[a]):
            assert [t["label"] for t in plain["top"]] == [t["label"] for t in mapped["top"]]
            np.testing.assert_allclose([t["probability"] for t in mapped["top"]],
                                       [t["probability"] for t in plain["top"]], atol=1e-5)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds one empty row: tiny, but PIL sees its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_requests(photos) -> dict[str, tuple]:
    """name -> (files, fields, status, what the error says)."""
    jpeg = photos["jpg"].read_bytes()
    return {
        "text file": ([("image", "notes.txt", b"just some words\n")], {}, 415,
                      "notes.txt: not a readable image"),
        "truncated jpeg": ([("image", "cut.jpg", jpeg[:len(jpeg) // 2])], {}, 415, "cut.jpg: not a readable image"),
        "decompression bomb": ([("image", "bomb.png", _png_header(20000, 20000))], {}, 413,
                               "bomb.png: Image size (400000000 pixels) exceeds limit"),
        "over the pixel limit": ([("image", "huge.png", _png_header(10000, 10000))], {}, 413,
                                 "huge.png: 10000x10000 pixels is more than the 89,478,485 allowed"),
        "file over the size limit": ([("image", "big.jpg", jpeg + b"\0" * 70_000)], {}, 413,
                                     "is over the 0.0625 MB limit per file"),
        "request over the size limit": ([("image", "big.jpg", b"\0" * 400_000)], {}, 413,
                                        "over the 0.312 MB this server takes"),
        "empty upload": ([("image", "empty.jpg", b"")], {}, 400, "empty.jpg: empty upload (0 bytes)"),
        "wrong field name": ([("file", "digit.jpg", jpeg)], {}, 400, "a file came in field 'file'"),
        "not multipart": ([], {"top_k": "3"}, 415, "send the image as multipart/form-data"),
        "no image": ([("top_k", None, b"3")], {}, 400, "no image in the request; send one in field 'image'"),
        "too many files": ([("image", f"{i}.jpg", jpeg) for i in range(5)], {}, 400,
                           "Too many files. Maximum number of files is 4."),
        "unknown option": ([("image", "d.jpg", jpeg)], {"topk": "3"}, 400, "unknown field 'topk'"),
        "bad top_k": ([("image", "d.jpg", jpeg)], {"top_k": "zero"}, 400, "top_k='zero' must be a whole number"),
        "bad attention": ([("image", "d.jpg", jpeg)], {"attention": "heat"}, 400, "attention='heat' is not one of"),
    }


@pytest.mark.parametrize("case", ["text file", "truncated jpeg", "decompression bomb", "over the pixel limit",
                                  "file over the size limit", "request over the size limit", "empty upload",
                                  "wrong field name", "not multipart", "no image", "too many files", "unknown option", "bad top_k",
                                  "bad attention"])
def test_bad_input_gets_a_4xx_with_one_line_and_the_server_keeps_serving(server, photos, case):
    files, fields, status, says = _bad_requests(photos)[case]
    r = _post(server, files, **fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error and "\n" not in error
    after = _post(server, [_image(photos["png0"])])
    assert after.status_code == 200 and len(after.json()["results"][0]["top"]) == 5


def test_nothing_is_written_to_disk(run, monkeypatch):
    """Uploads larger than Starlette's 1 MB spool would roll over to a temporary file; the server keeps them in
    memory."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(buffer, "PNG")
    assert buffer.tell() > 1024 * 1024
    rolled = []
    rollover = tempfile.SpooledTemporaryFile.rollover
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(self) or rollover(self))
    with RunningServer(create_app(vitlab.load(run), limits=Limits(max_bytes=2 * 1024 * 1024))) as local:
        r = _post(local, [("image", "big.png", buffer.getvalue())])
    assert r.status_code == 200 and rolled == []


def test_requests_in_flight_together(server, photos):
    """Eight clients at once get each its own image's answer; and while the model is busy (its lock held here),
    the event loop still answers: inference runs off the loop."""
    names = ["png0", "png1", "png2", "png3", "jpg"]
    alone = {n: _post(server, [_image(photos[n])]).json()["results"][0]["top"] for n in names}
    jobs = [names[i % len(names)] for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: _post(server, [_image(photos[n])]), jobs))
    assert [a.status_code for a in answers] == [200] * len(jobs)
    for name, answer in zip(jobs, answers):
        assert answer.json()["results"][0]["top"] == alone[name]
    served = server.app.state.served
    with served.lock:
        pending = ThreadPoolExecutor(max_workers=1).submit(_post, server, [_image(photos["png0"])])
        time.sleep(0.2)  # let the request reach the model's lock
        assert not pending.done()
        assert httpx.get(f"{server.url}/healthz", timeout=30).json() == {"status": "ok"}
        assert httpx.get(f"{server.url}/api/model", timeout=30).status_code == 200
    assert pending.result(timeout=60).json()["results"][0]["top"] == alone["png0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vitlab_serve_command(run, photos):
    """The console command as a user runs it: it binds 127.0.0.1, serves, and stops on Ctrl-C."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", str(run), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        r = httpx.post(f"{url}/api/predict", files={"image": photos["jpg"].open("rb")}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]["top"]) == 5
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_page_in_a_real_browser(server, run, photos, tmp_path):
    """Headless chromium opens the page, a digit photo is chosen: the top-1 label is the model's and the
    attention overlay has loaded; a text file gets the plain error."""
    from playwright.sync_api import expect, sync_playwright

    want = predict(run, [photos["jpg"]], top_k=1)[0].top[0][0]
    text = tmp_path / "notes.txt"
    text.write_text("not a photo\n")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's screen
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_contain_text("vit-digits-p2", timeout=10_000)
            page.set_input_files("#files", str(photos["jpg"]))
            card = page.locator("article.card").first
            expect(card.locator("ol.top li").first.locator(".label")).to_have_text(want, timeout=15_000)
            expect(card.locator("ol.top li")).to_have_count(5)
            overlay = card.locator("img.overlay")
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(),
                                   timeout=10_000)
            assert overlay.evaluate("img => img.naturalWidth") == 224
            card.get_by_role("button", name="Show each head's map (last layer)").click()
            expect(card.locator(".heads img")).to_have_count(2, timeout=15_000)
            page.set_input_files("#files", str(text))
            error = page.locator("article.card.error").first
            expect(error).to_contain_text("notes.txt: not a readable image", timeout=15_000)
            expect(page.locator("#status")).to_have_text("Done.")
        finally:
            browser.close()
