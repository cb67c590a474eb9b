"""End to end in a real browser (Debian's chromium + chromium-driver, headless, driven by Selenium): open the page,
upload an image, paint a stroke on the mask canvas, pick a method and its steps, run, and check that the result
appears and that the file the page offers for download equals the API's result for the same request.

Without a browser the test is skipped on a developer machine and fails under CI (``CI=true``), where `.ci/run`
installs one."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("ASUKA_SERVE_SCREENSHOT")  # where to keep the page screenshot (README image)


def _need_browser() -> None:
    if BROWSER and DRIVER:
        return
    message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from asuka.server.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(device="cpu"), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_paint_run_and_download_in_chromium(server, tmp_path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = tmp_path / "photo.png"
    Image.fromarray(skimage.data.chelsea()).resize((128, 96)).save(photo)
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) > 1)
        driver.find_element(By.ID, "image-file").send_keys(str(photo))
        wait.until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 128)
        canvas = driver.find_element(By.ID, "mask-canvas")
        ActionChains(driver).move_to_element_with_offset(canvas, -20, 0).click_and_hold().move_by_offset(40, 10) \
            .release().perform()
        painted = driver.execute_script(
            "const c = document.getElementById('mask-canvas');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;")
        assert painted > 50
        Select(driver.find_element(By.ID, "method")).select_by_value("sd")
        steps = driver.find_element(By.CSS_SELECTOR, "[data-option='num_inference_steps']")
        steps.clear()
        steps.send_keys("2")
        driver.find_element(By.ID, "seed").clear()
        driver.find_element(By.ID, "seed").send_keys("5")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.execute_script(
            "const r = document.getElementById('result'); return !r.hidden && r.complete && r.naturalWidth > 0"))
        assert driver.find_element(By.ID, "status").text == "Done."
        if SCREENSHOT:
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(SCREENSHOT)
        download = driver.find_element(By.ID, "download").get_attribute("href")
    finally:
        driver.quit()

    job = download.rsplit("/", 2)[-2]
    offered = urllib.request.urlopen(download).read()
    image = urllib.request.urlopen(f"{server}/api/jobs/{job}/inputs/image").read()
    mask = urllib.request.urlopen(f"{server}/api/jobs/{job}/inputs/mask").read()
    assert (np.array(Image.open(__import__("io").BytesIO(mask)).convert("L")) > 127).sum() > 50
    again = _api_job(server, image, mask, {"method": "sd", "seed": "5", "options": '{"num_inference_steps": 2}'})
    np.testing.assert_array_equal(np.array(Image.open(__import__("io").BytesIO(offered))),
                                  np.array(Image.open(__import__("io").BytesIO(again))))


def _api_job(server: str, image: bytes, mask: bytes, fields: dict[str, str]) -> bytes:
    """The same request through the REST API (multipart by hand, standard library only)."""
    import json
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in (("image", image), ("mask", mask)):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server}/api/jobs", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    job = json.loads(urllib.request.urlopen(request).read())["id"]
    for _ in range(3000):
        state = json.loads(urllib.request.urlopen(f"{server}/api/jobs/{job}").read())["state"]
        if state in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert state == "done"
    return urllib.request.urlopen(f"{server}/api/jobs/{job}/result").read()
