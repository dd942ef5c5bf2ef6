"""The README's screenshot of `vitlab serve`: the page after a prediction on a photo, taken by headless chromium.

    PYTHONPATH=src python benchmarks/serve_screenshot.py RUN PHOTO [-o docs/img/serve.png] [--heads]

Serves RUN on a free port of 127.0.0.1, opens the page in Debian's chromium (driven by Playwright, as the browser
test does), chooses PHOTO, waits for the top-5 and the attention overlay (and, with ``--heads``, the last layer's
per-head maps), and saves a screenshot of the page (after one request that warms the model up).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

from vitlab import load
from vitlab.server import RunningServer, create_app

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("photo")
    parser.add_argument("-o", "--output", default="docs/img/serve.png")
    parser.add_argument("--heads", action="store_true", help="also open the per-head maps")
    parser.add_argument("--width", type=int, default=760)
    args = parser.parse_args()
    with RunningServer(create_app(load(args.run))) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": args.width, "height": 600})
        httpx.post(server.url + "/api/predict", files={"image": Path(args.photo).open("rb")},
                   data={"attention": "png"}, timeout=60)  # a first request warms the model: the page shows a usual time
        page.goto(server.url + "/")
        expect(page.locator("#model")).to_contain_text("test accuracy")
        page.set_input_files("#files", args.photo)
        card = page.locator("article.card").first
        expect(card.locator("ol.top li")).to_have_count(5)
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        if args.heads:
            card.get_by_role("button").click()
            expect(card.locator(".heads img").first).to_be_visible()
            page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=args.output, full_page=True)
        browser.close()
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
