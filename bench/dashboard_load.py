"""How big the `sft runs --html` page gets and how long it takes to write and to open, at 50 runs.

    .venv/bin/python bench/dashboard_load.py        # needs chromium (tests/browser.py installs it when missing)

50 synthetic runs under a temporary folder, each with 2,000 logged training steps and an evaluation every 100
(longer curves are thinned to sft.results.dashboard.MAX_POINTS points per run anyway), a report.md and a config that
differs in the learning rate; then `sft runs DIR --html` is timed, and the page is opened in headless chromium:
the time from navigation to the end of the load event (the table and both charts are drawn by then)."""
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from browser import Browser  # noqa: E402
from test_dashboard import make_sweep  # noqa: E402

from sft.cli import main  # noqa: E402

RUNS, STEPS = 50, 2000


def measure() -> None:
    with tempfile.TemporaryDirectory() as folder:
        output, page = Path(folder) / "runs", Path(folder) / "index.html"
        make_sweep(output, RUNS, steps=STEPS)
        started = time.perf_counter()
        main(["runs", str(output), "--html", str(page)])
        written = time.perf_counter() - started
        with Browser() as browser:
            loads = []
            for _ in range(5):
                errors = browser.load(page)
                assert errors == [], errors
                loads.append(browser.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
            curves = browser.evaluate("document.querySelectorAll('path.curve').length")
        print(f"{RUNS} runs x {STEPS} steps: page {page.stat().st_size / 1e3:.0f} kB, written in {written:.2f} s "
              f"(sft runs --html, including the table), loaded in {min(loads):.0f}-{max(loads):.0f} ms "
              f"(5 loads, headless chromium), {curves} curves drawn", file=sys.stderr)


if __name__ == "__main__":
    measure()
