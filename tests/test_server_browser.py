"""The page of `livevlm serve` in a real browser: Debian's headless Chromium, driven by Selenium, with a
synthetic-world clip as its fake webcam, against a real server running the tiny random model.

Skipped when Chromium, chromedriver or selenium is missing (`bash scripts/install.sh dev` installs them).
Selenium Manager never runs: the driver and the browser are given by path, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "bash scripts/install.sh dev"
API_KEY = "browser-test-key"
TIMEOUT_S = 45.0  # the longest any single wait may take; the whole test takes ~20 s on 2 CPU cores


def missing_browser_parts() -> list[str]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the Python package selenium")
    return missing


# Checked before any fixture runs, so a machine without a browser starts no server.
pytestmark = pytest.mark.skipif(
    bool(missing_browser_parts()),
    reason=f"the browser test needs {', '.join(missing_browser_parts())}; install them with `{INSTALL}`")


def write_y4m(mp4: Path, y4m: Path, fps: int) -> None:
    """Decode `mp4` into a raw Y4M file (I420 planes per frame), the only format Chromium's fake camera reads."""
    import av

    with av.open(str(mp4)) as container, y4m.open("wb") as out:
        stream = container.streams.video[0]
        out.write(f"YUV4MPEG2 W{stream.width} H{stream.height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in container.decode(stream):
            out.write(b"FRAME\n")
            out.write(frame.to_ndarray(format="yuv420p").tobytes())  # [H * 3/2, W]: Y, then U, then V


@pytest.fixture
def fake_webcam(tmp_path: Path) -> Path:
    """A 10-s, 128×128 synthetic-world clip as the Y4M file Chromium plays (in a loop) as its webcam."""
    from livevlm.world import WorldSpec, render_video

    mp4, y4m = tmp_path / "world.mp4", tmp_path / "world.y4m"
    render_video(WorldSpec(seed=7, duration=10.0, size=128, video_fps=10), mp4)
    write_y4m(mp4, y4m, fps=10)
    return y4m


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer {url} within {timeout_s:.0f} s")


@pytest.fixture
def server(tiny_checkpoint, tmp_path: Path):
    """`livevlm serve` with the tiny model and an API key on a free loopback port, as users start it; its URL."""
    checkpoint, _ = tiny_checkpoint
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "livevlm.cli", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--api-key", API_KEY]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process, TIMEOUT_S)
        yield url
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- server log ---\n{(tmp_path / 'server.log').read_text()}") from None
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def start_browser(fake_webcam: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={fake_webcam}",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(TIMEOUT_S)
    return driver


def test_page_streams_the_webcam_and_shows_the_conversation(server, fake_webcam):
    """Without the key the page says it was refused (1008); with `?key=` in its URL: Webcam → Start → Ask, the
    conversation shows the query and an answer, frames are processed (the p(speak) strip has data), and Stop
    shows the session's summary."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = start_browser(fake_webcam)
    try:
        wait = WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.2)
        text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
        driver.get(server)
        driver.find_element(By.ID, "start-button").click()
        wait.until(lambda d: "1008" in text("notice"))
        wait.until(lambda d: d.find_element(By.ID, "start-button").is_enabled())  # back to idle

        driver.get(f"{server}?key={API_KEY}")
        driver.find_element(By.ID, "source-webcam").click()
        driver.find_element(By.ID, "start-button").click()
        wait.until(lambda d: d.find_element(By.ID, "ask-input").is_enabled() or text("notice"))
        assert not text("notice"), text("notice")
        ask = driver.find_element(By.ID, "ask-input")
        ask.send_keys("What is on the screen?")
        ask.send_keys(Keys.ENTER)

        # The server echoes the query with its stream time (no longer pending), and the model answers it.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#conversation .turn.user:not(.pending)")
                   and d.find_elements(By.CSS_SELECTOR, "#conversation .turn.assistant"))
        user = driver.find_element(By.CSS_SELECTOR, "#conversation .turn.user")
        assert "What is on the screen?" in user.text
        assert user.find_element(By.CLASS_NAME, "time").text.count(":") == 1  # mm:ss.s
        wait.until(lambda d: int(text("status-processed")) > 0)
        assert int(driver.find_element(By.ID, "pspeak-canvas").get_attribute("data-points")) > 0
        # Read processed first: both counters only grow, so a later `sent` can only be larger (read the other way
        # round, a frame sent and answered between the two reads made this fail).
        processed = int(text("status-processed"))
        assert int(text("status-sent")) >= processed
        assert text("status-errors") == "0", text("notice")

        driver.find_element(By.ID, "stop-button").click()
        wait.until(lambda d: d.find_element(By.ID, "summary").is_displayed())
        summary = text("summary-list")
        assert "frames" in summary and "device" in summary, summary
        wait.until(lambda d: text("status-connection") == "finished")
        assert not text("notice"), text("notice")
    finally:
        driver.quit()
