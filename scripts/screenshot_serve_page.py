"""Regenerate docs/serve-page.png: the page of `livevlm serve` in use, in headless Chromium at 1280×800, with a
synthetic-world clip as the fake webcam and the default model narrating it.

    python scripts/screenshot_serve_page.py [--model default] [--seconds 40] [--out docs/serve-page.png]

Needs what the browser test needs (Debian's chromium and chromedriver, selenium: `bash scripts/install.sh dev`)
and the server extra. Takes about a minute on a CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import av
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from livevlm.world import WorldSpec, render_video

FIRST_QUERY = "Please narrate the video in real time."
LATER_QUERY = "What just happened?"


def write_y4m(mp4: Path, y4m: Path, fps: int) -> None:
    """Decode `mp4` into raw Y4M (I420 planes per frame), the format Chromium's fake camera reads."""
    with av.open(str(mp4)) as container, y4m.open("wb") as out:
        stream = container.streams.video[0]
        out.write(f"YUV4MPEG2 W{stream.width} H{stream.height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in container.decode(stream):
            out.write(b"FRAME\n")
            out.write(frame.to_ndarray(format="yuv420p").tobytes())


def start_server(model: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "livevlm.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    if model != "default":
        command += ["--model", model]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with code {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    sys.exit(f"the server did not answer within 120 s:\n{log.read_text()}")


def browser(clip: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={clip}",
                 "--autoplay-policy=no-user-gesture-required", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    # The viewport itself is 1280×800 (--window-size would count the window's frame).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    return driver


def capture(url: str, clip: Path, seconds: float, out: Path) -> None:
    driver = browser(clip)
    try:
        driver.get(url)
        driver.find_element(By.ID, "query-input").send_keys(FIRST_QUERY)
        driver.find_element(By.ID, "start-button").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "ask-input").is_enabled())
        time.sleep(seconds / 2)
        driver.find_element(By.ID, "ask-input").send_keys(LATER_QUERY, Keys.ENTER)
        time.sleep(seconds / 2)
        # Shoot while a caption is on the video (the next response), or after 30 s more without one.
        try:
            WebDriverWait(driver, 30, poll_frequency=0.1).until(lambda d: d.find_element(By.ID, "caption")
                                                                 .get_attribute("class") == "visible")
        except TimeoutException:
            pass
        png = out.with_suffix(".raw.png")
        driver.save_screenshot(str(png))
        driver.find_element(By.ID, "stop-button").click()
    finally:
        driver.quit()
    # A 256-colour palette keeps the file small (flat UI colours; the video is synthetic too).
    Image.open(png).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    png.unlink()
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="checkpoint folder, or default")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long to stream before the screenshot")
    parser.add_argument("--out", type=Path, default=Path("docs/serve-page.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        render_video(WorldSpec(seed=7, duration=60.0, size=256, video_fps=10), folder / "world.mp4")
        write_y4m(folder / "world.mp4", folder / "world.y4m", fps=10)
        process, url = start_server(args.model, folder / "server.log")
        try:
            capture(url, folder / "world.y4m", args.seconds, args.out)
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
