"""Takes the README's dashboard screenshot: runs `edge-runtime demo --headless` and, once the rollout of
version 2 reaches the chosen stage (all three devices still online, the drift alert firing), loads the
dashboard's fleet page in Debian's headless Chromium (selenium, chromedriver) and saves a PNG.

    .venv/bin/python devices/screenshot_dashboard.py [--out cloud_sync/static/dashboard.png] [--at step-1]

Needs the demo's extras (models, signing, cloud), selenium, /usr/bin/chromium and /usr/bin/chromedriver.
Exit status: the demo's, or 1 when no screenshot was taken.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STAGES = ("shadow", "step-0", "step-1", "done")


def browser(width: int, height: int, profile_dir: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}",
                f"--user-data-dir={profile_dir}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    return driver


def shoot(driver: Any, url: str, out: Path, devices: int) -> None:
    """Loads the page, waits until the devices table lists every device, and saves the viewport."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            rows = driver.find_elements(By.CSS_SELECTOR, "#devices tbody tr")
            if len([r for r in rows if "demo-" in r.text]) >= devices:
                break
        except Exception:  # the table is replaced under us when it refreshes
            pass
        time.sleep(0.2)
    time.sleep(0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(out)):
        raise RuntimeError(f"chromium could not save {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "cloud_sync" / "static" / "dashboard.png")
    ap.add_argument("--at", choices=STAGES, default="step-1", help="the rollout stage to wait for (default step-1)")
    ap.add_argument("--page", default="/", help="dashboard page to capture (default /, the fleet page)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=150.0, help="the demo's --duration (default 150)")
    args = ap.parse_args(argv)
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        print("screenshot_dashboard: needs /usr/bin/chromium and /usr/bin/chromedriver "
              "(apt-get install chromium chromium-driver)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="edge-shot-") as tmp:
        demo = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "demo", "--headless", "--duration",
                                 str(args.duration), "--workdir", str(Path(tmp) / "demo")],
                                cwd=REPO, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert demo.stderr is not None
        driver, url, taken = None, None, False
        try:
            for line in demo.stderr:
                sys.stderr.write(line)
                m = re.search(r"dashboard on (http://\S+?)/?$", line.strip())
                if m and driver is None:
                    url = m.group(1)
                    driver = browser(args.width, args.height, str(Path(tmp) / "chromium"))
                stage = re.search(r"rollout \S+: \w+ at (\S+)", line)
                if (not taken and driver is not None and url is not None and stage
                        and STAGES.index(stage.group(1)) >= STAGES.index(args.at)):
                    shoot(driver, url + args.page, args.out, devices=3)
                    taken = True
                    print(f"screenshot_dashboard: saved {args.out} ({args.out.stat().st_size} bytes) "
                          f"at rollout stage {stage.group(1)}", file=sys.stderr)
            rc = demo.wait()
        finally:
            if driver is not None:
                driver.quit()
            if demo.poll() is None:
                demo.terminate()
                demo.wait(30)
    if not taken:
        print("screenshot_dashboard: the rollout never reached the stage; no screenshot", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
