"""Open a `vdr evaluate --report` page in headless Chromium: time it, check its thumbnails, take a screenshot.

    python scripts/report_browser.py REPORT.html [--screenshot OUT.png] [--width 1400] [--height 1000]

Prints how long the page took to draw its first page of queries and to decode every thumbnail on it, how many
thumbnails loaded, and any page error or network request (a report must need neither). Exits 1 if any thumbnail
failed or the page reported an error. The tests use :func:`open_report` for the same checks.

Needs Chromium (Debian: `apt-get install chromium`; another binary: VDR_CHROMIUM=/path) and playwright (the dev
extra; it drives that Chromium, it downloads no browser of its own).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# No background services, no sandbox (CI runs as root), no GPU: what a closed-network CI machine needs; /tmp rather
# than /dev/shm for shared memory (64 MB in a container, less than a large report needs).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
ALL_DECODED = "Array.from(document.images).every(image => image.complete)"
THUMBNAILS = "[document.images.length, Array.from(document.images).filter(image => image.naturalWidth > 0).length]"


def chromium_path() -> str | None:
    """The Chromium to drive: $VDR_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on PATH."""
    if os.environ.get("VDR_CHROMIUM"):
        return os.environ["VDR_CHROMIUM"]
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@dataclass
class OpenedReport:
    """A report drawn in the browser.

    Attributes:
        page: The playwright page (to click, select and evaluate on).
        seconds: From navigation to the first page of queries drawn with every thumbnail decoded.
        problems: Page errors, console errors and network requests (none expected).
    """

    page: object
    seconds: float
    problems: list[str] = field(default_factory=list)

    def thumbnails(self) -> tuple[int, int]:
        """``(images on the page, images that decoded)``, once every image has finished loading."""
        self.page.wait_for_function(ALL_DECODED, timeout=60_000)
        total, loaded = self.page.evaluate(THUMBNAILS)
        return total, loaded

    def rerendered(self, action) -> None:
        """Runs ``action`` (a click, a select) and waits until the page has drawn the result."""
        before = int(self.page.evaluate("document.body.dataset.rendered"))
        action()
        self.page.wait_for_function(f"Number(document.body.dataset.rendered) > {before}", timeout=60_000)


@contextmanager
def open_report(path: str | Path, width: int = 1400, height: int = 1000) -> Iterator[OpenedReport]:
    """Opens ``path`` in headless Chromium and waits for its first page of queries and their thumbnails."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium, or set VDR_CHROMIUM=/path/to/chrome")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
                    if message.type == "error" else None)
            page.on("request", lambda request: problems.append(f"request: {request.url}")
                    if not request.url.startswith(("data:", "file:")) else None)
            start = time.perf_counter()
            page.goto(Path(path).resolve().as_uri(), timeout=120_000)
            page.wait_for_selector("body[data-rendered]", state="attached", timeout=120_000)
            page.wait_for_function(ALL_DECODED, timeout=120_000)
            yield OpenedReport(page, time.perf_counter() - start, problems)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the first screen here")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    size_mb = args.report.stat().st_size / 2**20
    with open_report(args.report, args.width, args.height) as opened:
        total, loaded = opened.thumbnails()
        drawn = opened.page.evaluate("Number(document.body.dataset.firstDrawnMs)")
        print(f"{args.report}: {size_mb:.1f} MB; first page drawn {drawn / 1000:.2f} s after navigation, "
              f"thumbnails decoded {opened.seconds:.2f} s; {loaded}/{total} thumbnails loaded")
        if args.screenshot:
            opened.page.screenshot(path=str(args.screenshot))
            print(f"screenshot: {args.screenshot}")
        for problem in opened.problems:
            print(problem, file=sys.stderr)
    return 0 if loaded == total and not opened.problems else 1


if __name__ == "__main__":
    sys.exit(main())
