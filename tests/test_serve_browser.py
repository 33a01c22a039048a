"""The app's pages in a real browser: Debian's headless Chromium driven by selenium.

The app runs with uvicorn on 127.0.0.1 (a free port) in a thread; chromedriver is Debian's
(/usr/bin/chromedriver, package chromium-driver), passed explicitly so selenium-manager never
tries to download a driver or a browser.
"""

from __future__ import annotations

import csv
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from conftest import CHROMIUM_FLAGS
from servekit import image_bytes, write_label_issues, write_project

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (*CHROMIUM_FLAGS, "--disable-dev-shm-usage")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_project(tmp_path_factory.mktemp("browser"))
    write_label_issues(root)
    return root


@pytest.fixture(scope="module")
def base_url(project: Path) -> Iterator[str]:
    from servekit import build_app

    app, _ = build_app(project)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # selenium-manager, if ever consulted, must not download
        service = Service(executable_path=str(CHROMEDRIVER))
        driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def _wait_for(driver: object, css: str, timeout: float = 20) -> list[object]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css) or False
    )


def test_uploading_an_image_shows_bars_with_the_right_top_class(
    browser: object, base_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    picture = tmp_path / "a-red-thing.png"
    picture.write_bytes(image_bytes("red"))
    browser.get(base_url + "/")

    browser.find_element(By.ID, "files").send_keys(str(picture))
    rows = _wait_for(browser, ".prediction .bar-row")

    assert rows[0].get_attribute("data-class") == "red"
    assert rows[0].find_element(By.CSS_SELECTOR, ".value").text == "100.0%"
    assert len(rows) == 3
    title = browser.find_element(By.CSS_SELECTOR, ".prediction h3").text
    assert title == "a-red-thing.png"


def test_uploading_a_text_file_shows_the_apps_message(
    browser: object, base_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    browser.get(base_url + "/")

    browser.find_element(By.ID, "files").send_keys(str(notes))
    (error,) = _wait_for(browser, "#error:not([hidden])")

    assert "415" in error.text and "notes.txt: not an image" in error.text


def test_marking_a_flagged_image_drop_writes_the_review_csv(
    browser: object, base_url: str, project: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/review")
    cards = _wait_for(browser, "section[data-class='green'] .card")
    path = cards[0].get_attribute("data-path")

    cards[0].find_element(By.CSS_SELECTOR, "button.drop").click()
    _wait_for(browser, "section[data-class='green'] .card[data-decision='drop']")

    with open(project / "data/audit/review.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"path": path, "sha256": Path(path).stem, "decision": "drop"}]


def test_the_review_page_shows_each_flagged_images_thumbnail(
    browser: object, base_url: str
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(base_url + "/review")
    images = _wait_for(browser, ".card img")
    script = "return arguments[0].complete && arguments[0].naturalWidth"

    widths = WebDriverWait(browser, 20).until(
        lambda d: (
            all(d.execute_script(script, i) for i in images)
            and [d.execute_script(script, i) for i in images]
        )
    )

    assert len(images) == 2
    assert all(width > 0 for width in widths)
