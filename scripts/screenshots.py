"""Take the README's dashboard screenshots of the running demo, in Debian's Chromium.

Runs ``shopfleet demo`` (4 shops, the real camera on the first) as a child process, waits until
the good rollout is done and the bad one has been rolled back, logs in as the operator and
saves the fleet, shop and rollouts pages to docs/img/. Run with ``make screenshots``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    """Run the demo, wait for both rollouts, take the screenshots; return the exit code."""
    demo = subprocess.Popen([sys.executable, "-m", "shopfleet", "--log-level", "WARNING", "demo", "--shops", "4",
                             "--port", "0", "--camera", "--duration", "240"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    api = None
    deadline = time.monotonic() + 200
    try:
        for line in demo.stdout:  # type: ignore[union-attr]
            print(line, end="", file=sys.stderr)
            if m := re.search(r"dashboard at (http://[\d.:]+)", line):
                api = m.group(1)
            if "2026.11.2-bad: failed" in line or time.monotonic() > deadline:
                break
        if api is None:
            print("screenshots: the demo never printed its address", file=sys.stderr)
            return 1
        time.sleep(6)  # a few more heartbeats, so the small charts have points
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(base_url=api, viewport={"width": 1280, "height": 800})
            page.goto("/login")
            page.fill("input[name=username]", "operator")
            page.fill("input[name=password]", "operator-demo-pass")
            page.click("button[type=submit]")
            page.wait_for_url(f"{api}/fleet")
            page.screenshot(path=str(OUT / "fleet.png"), full_page=True)
            page.goto("/shops/demo-01")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / "shop.png"), full_page=True)
            page.goto("/rollouts")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT / "rollouts.png"), full_page=True)
            browser.close()
        print(f"screenshots: wrote {', '.join(p.name for p in sorted(OUT.glob('*.png')))} to {OUT}", file=sys.stderr)
        return 0
    finally:
        demo.terminate()
        demo.wait(60)


if __name__ == "__main__":
    sys.exit(main())
