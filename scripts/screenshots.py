"""Take the README's dashboard screenshots of the running demo, in Debian's Chromium.

Runs ``shopfleet demo`` (4 shops) as a child process, logs in as the demo's admin (who sees every
page) and saves to docs/img/:

* ``fleet.png``: the fleet page, once the bad release's canary has failed and been rolled back;
* ``shop.png``: the first shop's page down to its charts over time, drawn, and a pick in the feed;
* ``alerts.png``: the alerts page with the first shop's warm fridge firing (the demo warms it a
  minute in and keeps it warm for 15 minutes; the node's ``temperature_high`` fires at once, the
  controller's lasting ``fridge_warm`` after 10 minutes, which the script waits for unless
  ``--no-lasting``; the shop's charts then have those minutes to show);
* ``rollouts.png``: the rollouts page with the failed canary's review (the failed gate, its
  measured value and threshold);
* ``reviews.png``: the cart review queue, once the shops' fusion has sent carts there;
* ``fleet-phone.png`` and ``shop-phone.png``: the phone view (390x844, touch).

Every picture waits for the state it needs (a line of the demo's output, or a condition in the
page), never for a fixed time; a state not reached within its deadline stops the run with an
error naming it. Run with ``make screenshots``; ``--camera`` runs the real vision pipeline on the
first shop, which on a busy machine may run below the fps gate and fail the good release too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOP = "demo-01"  # the shop with the warm fridge and the bad release's canary


class Demo:
    """The demo as a child process; a thread keeps its output so the script can wait on lines."""

    def __init__(self, camera: bool) -> None:
        cmd = [sys.executable, "-m", "shopfleet", "--log-level", "WARNING", "demo", "--shops", "4",
               "--port", "0", "--duration", "1200"] + (["--camera"] if camera else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            print(line, end="", file=sys.stderr)
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, what: str, timeout_s: float) -> re.Match[str]:
        """The first output line matching ``pattern``; SystemExit naming ``what`` after the timeout."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise SystemExit(f"screenshots: the demo never reached {what} within {timeout_s:.0f} s")
                self._cond.wait(min(left, 1.0))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def wait_page(page: Page, js: str, what: str, timeout_s: float, arg: Any = None) -> None:
    """Wait for ``js`` to be true in the page (its live regions refresh every 5 s); name ``what`` if not."""
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=500)
    except Exception as e:  # playwright's TimeoutError: say which state was missing
        raise SystemExit(f"screenshots: {what} did not show within {timeout_s:.0f} s ({e.__class__.__name__})") from e


def wait_reload(page: Page, url: str, js: str, what: str, timeout_s: float) -> None:
    """Like wait_page for a page without live regions (the review queue): load it again until ``js``."""
    deadline = time.monotonic() + timeout_s
    while True:
        page.goto(url)
        if page.evaluate(js):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: {what} did not show within {timeout_s:.0f} s")
        page.wait_for_timeout(3000)  # the pace of reloads, not a wait for a state


CHARTS_DRAWN = """() => {
  const figs = [...document.querySelectorAll('figure.chart')];
  return figs.length > 0 && figs.every(f => f.dataset.state !== 'loading')
      && figs.filter(f => f.dataset.state === 'drawn').length >= 3;
}"""
HAS_TEXT = "([sel, t]) => { const e = document.querySelector(sel); return !!e && e.innerText.includes(t); }"


def shoot(page: Page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(OUT / name), full_page=full_page)
    print(f"screenshots: {name}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the demo, wait for each picture's state, take the screenshots; return the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--camera", action="store_true", help="run the real vision pipeline on the first shop")
    ap.add_argument("--no-lasting", dest="lasting", action="store_false",
                    help="do not wait ~11 min for the controller's fridge_warm alert (the node's own alert is shown)")
    args = ap.parse_args(argv)
    demo = Demo(args.camera)
    try:
        api = demo.wait_line(r"dashboard at (http://[\d.:]+)", "its dashboard address", 120).group(1)
        admin_pw = demo.wait_line(r"demo logins:.*\badmin / (\S+?)(?:,|$)", "its logins", 60).group(1)
        demo.wait_line(r"rollout 2026\.11\.2-bad: failed", "the bad release's failed canary", 300)
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            ctx = browser.new_context(base_url=api, viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            page.goto("/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", admin_pw)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r".*/fleet$"))

            page.goto("/alerts")  # the fridge warms a minute in: the longest wait, so first
            wait_page(page, HAS_TEXT, "a firing temperature_high alert of the warm fridge", 240,
                      ["main", "temperature_high"])
            shoot(page, "alerts.png")
            if args.lasting:  # the controller's fridge_warm opens after 10 warm minutes: retake with it
                try:
                    wait_page(page, HAS_TEXT, "the controller's fridge_warm alert", 780, ["main", "fridge_warm"])
                    shoot(page, "alerts.png")
                except SystemExit as e:
                    print(f"{e}; alerts.png keeps the node's temperature_high alert", file=sys.stderr)

            page.goto("/fleet")
            wait_page(page, HAS_TEXT, "the fleet table", 30, ["main", SHOP])
            shoot(page, "fleet.png")

            page.goto(f"/shops/{SHOP}")
            wait_page(page, CHARTS_DRAWN, "the shop's charts over time", 60)
            wait_page(page, HAS_TEXT, "a shelf pick in the event feed", 120, ["#feed", "pick "])
            # From the top to the shop's own charts over time (the node charts below would triple it).
            bottom = page.evaluate("document.querySelector('#charts .chart-grid').getBoundingClientRect().bottom"
                                   " + window.scrollY + 16")
            page.screenshot(path=str(OUT / "shop.png"), full_page=True,
                            clip={"x": 0, "y": 0, "width": 1280, "height": bottom})
            print("screenshots: shop.png", file=sys.stderr)

            page.goto("/rollouts")
            wait_page(page, HAS_TEXT, "the failed canary's review", 60, ["main", "Failed check"])
            shoot(page, "rollouts.png")

            wait_reload(page, "/reviews", "() => document.querySelectorAll('#cart-queue tbody tr').length > 0",
                        "a cart in the review queue", 180)
            shoot(page, "reviews.png")

            phone = browser.new_context(base_url=api, viewport={"width": 390, "height": 844},
                                        device_scale_factor=2, is_mobile=True, has_touch=True,
                                        storage_state=ctx.storage_state())
            ppage = phone.new_page()
            ppage.goto("/fleet")
            wait_page(ppage, HAS_TEXT, "the fleet table on a phone", 30, ["main", SHOP])
            shoot(ppage, "fleet-phone.png", full_page=False)
            ppage.goto(f"/shops/{SHOP}")
            wait_page(ppage, CHARTS_DRAWN, "the shop's charts on a phone", 60)
            ppage.evaluate("document.getElementById('charts-title').scrollIntoView()")
            shoot(ppage, "shop-phone.png", full_page=False)
            browser.close()
        print(f"screenshots: wrote {', '.join(p.name for p in sorted(OUT.glob('*.png')))} to {OUT}", file=sys.stderr)
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
