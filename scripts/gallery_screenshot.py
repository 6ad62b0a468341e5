"""The README's picture of ``cli serve``: an index served on a free local port, one query typed in
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium), the page saved
as a PNG reduced to ``--width`` pixels and 128 colours.

    python scripts/gallery_screenshot.py INDEX_DIR "a dog running on the beach" docs/gallery.png
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import search
from search.server import make_server

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def main() -> None:
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index")
    parser.add_argument("query")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=880)
    args = parser.parse_args()
    server = make_server(search.open_index(args.index), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in (*FLAGS, "--window-size=1100,760", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server.url)                       # the address with its token
        box = driver.find_element(By.ID, "q")
        box.send_keys(args.query, Keys.ENTER)
        WebDriverWait(driver, 300).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#results img")))
        time.sleep(2)                                     # let the thumbnails load
        shot = Path(profile) / "page.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
        server.shutdown()
    page = Image.open(shot).convert("RGB")
    page = page.resize((args.width, round(page.height * args.width / page.width)),
                       Image.Resampling.LANCZOS)
    page.quantize(128).save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
