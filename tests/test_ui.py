"""The Prefect UI in headless Chromium shows a tiny run and its stage artifacts.

`crawl2chat server start` (SQLite, its own PREFECT_HOME and port), then `crawl2chat run --preset tiny --until
extract` on four of the tiny crawl's five WARC files, which the CLI sends to that server; then Chromium
(Debian's chromium and chromium-driver, driven by selenium; nothing is downloaded at run time) opens the runs
page, clicks the run named `tiny-<recipe id>`, opens its Artifacts tab, sees the `download` and `extract` markdown
artifacts, and opens the extract one (its stats table). Screenshots go to the test's tmp folder (the path is
printed).

Skips only when Chromium, ChromeDriver or selenium is missing (CI installs them).
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# What works on a machine with a closed network (probed here): without the background-networking flags
# Chromium keeps opening connections to Google's services that the network refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
                  "--window-size=1400,1000")

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="Chromium and ChromeDriver not found: apt-get install chromium "
                                       "chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def crawl2chat(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def small_source(folder: Path) -> Path:
    """The bundled tiny crawl without its one 4.2 MB WARC file (0.35 MB left), so extract takes seconds."""
    crawl = "crawl-data/CC-MAIN-2024-22"
    shutil.copytree(REPO / "data" / "tiny-cc", folder, ignore=shutil.ignore_patterns("zyte-*"))
    listing = folder / crawl / "warc.paths.gz"
    paths = [p for p in gzip.decompress(listing.read_bytes()).decode().split() if "/zyte-" not in p]
    listing.write_bytes(gzip.compress(("\n".join(paths) + "\n").encode()))
    return folder


@pytest.fixture(scope="module")
def server_with_a_run(tmp_path_factory):
    """A local server and one tiny run up to extract on it; yields the UI's URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    source = small_source(tmp_path_factory.mktemp("cc") / "tiny-cc")
    # not PREFECT_* (the test picks its server) nor torch.distributed's variables: in-process training in an
    # earlier test set them here, with its rendezvous port still open, and a child would try to listen on it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PREFECT_HOME=str(home), CRAWL2CHAT_ROOT=str(home / "artifacts"), PYTHONUNBUFFERED="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = crawl2chat("server", "start", "--port", str(port), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        ran = crawl2chat("run", "--preset", "tiny", "--source", str(source), "--until", "extract", env=env)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        crawl2chat("server", "stop", env=env)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")  # fresh: no state between runs
    # An explicit driver path: selenium then never runs Selenium Manager, which would try to download one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_ui_shows_the_tiny_run_and_its_stage_artifacts(server_with_a_run, browser, tmp_path):
    wait = WebDriverWait(browser, 60)  # the UI is a single-page app that loads its data after the page
    browser.get(f"{server_with_a_run}/runs")
    # flow runs are named by preset and a short hash of the recipe: tiny-3fa2c1d9
    wait.until(EC.element_to_be_clickable((By.PARTIAL_LINK_TEXT, "tiny-"))).click()
    wait.until(EC.url_contains("/runs/flow-run/"))
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "li.p-tab#artifacts"))).click()
    panel = (By.ID, "artifacts-content")
    wait.until(lambda d: {"download", "extract"} <= set(d.find_element(*panel).text.split()))
    cards = browser.find_element(*panel).text
    assert "MARKDOWN" in cards  # the stats tables are markdown artifacts
    browser.save_screenshot(str(tmp_path / "ui-run-artifacts.png"))

    # the extract card opens the artifact page: its stats table, rendered
    browser.find_element(By.XPATH, "//*[@id='artifacts-content']//*[normalize-space(text())='extract']").click()
    wait.until(EC.url_contains("/artifacts/artifact/"))
    wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "documents"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Built at" in body or "Reused the committed artifact" in body, body[:2000]
    browser.save_screenshot(str(tmp_path / "ui-extract-artifact.png"))
    print(f"screenshots in {tmp_path}")
