"""`asuka serve` REST API with an in-process client: methods and schemas, a job equal to `asuka inpaint`, progress
events, clear 4xx errors, cancel, a queue."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image

from asuka.cli import main
from asuka.server.app import create_app

SIZE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE)).save(folder / "photo.png")
    hole = np.zeros((SIZE, SIZE), np.uint8)
    hole[16:44, 20:48] = 255
    Image.fromarray(hole).save(folder / "mask.png")
    Image.fromarray(hole[:32]).save(folder / "small_mask.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(device="cpu", upload_limit=512 * 1024)) as c:
        yield c


def _submit(client, files, image="photo.png", mask="mask.png", **fields):
    with open(files / image, "rb") as fi, open(files / mask, "rb") as fm:
        return client.post("/api/jobs", files={"image": (image, fi, "image/png"), "mask": (mask, fm, "image/png")},
                           data={k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})


def _wait(client, job_id, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def test_methods_are_listed_with_their_declared_options(client):
    body = client.get("/api/methods").json()
    names = {m["name"]: m for m in body["methods"]}
    assert {"sd", "asuka"} <= set(names) and body["default"] == "sd"
    sd = names["sd"]["schema"]["properties"]
    assert "num_inference_steps" in sd["options"]["properties"] and "prompt" in sd["inputs"]["properties"]
    assert client.get("/docs").status_code == 200 and "/api/jobs" in client.get("/openapi.json").json()["paths"]


def test_job_result_equals_asuka_inpaint_and_reports_progress(client, files, tmp_path):
    response = _submit(client, files, method="sd", seed="3", options={"num_inference_steps": 2},
                       input_prompt="a red boat")
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["state"] == "done"
    assert any(e["state"] == "running" and e["total"] == 2 for e in events) or events[-1]["total"] == 2
    served = np.array(Image.open(io.BytesIO(client.get(f"/api/jobs/{job_id}/result").content)))

    out = tmp_path / "cli.png"
    assert main(["inpaint", "--method", "sd", "--image", str(files / "photo.png"), "--mask", str(files / "mask.png"),
                 "--out", str(out), "--seed", "3", "--set", "num_inference_steps=2", "--prompt", "a red boat"]) == 0
    np.testing.assert_array_equal(served, np.array(Image.open(out)))
    assert client.get(f"/api/jobs/{job_id}/inputs/mask").content == (files / "mask.png").read_bytes()


@pytest.mark.parametrize("kwargs,status,words", [
    ({"mask": "small_mask.png"}, 400, "mask"),
    ({"image": "broken.png"}, 400, "image"),
    ({"options": {"num_inference_steps": 0}}, 400, "num_inference_steps"),
    ({"options": {"strenght": 1.0}}, 400, "strenght"),
    ({"options": "{not json"}, 400, "options: not valid JSON"),
    ({"method": "no-such-method"}, 400, "unknown inference method"),
    ({"seed": "-1"}, 400, "seed"),
    ({"input_colour": "red"}, 400, "unknown input"),
])
def test_bad_requests_are_one_line_4xx(client, files, kwargs, status, words):
    response = _submit(client, files, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error and "\n" not in error and "Traceback" not in error


def test_oversize_upload_is_413_and_unknown_job_404(client, files, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(big)
    with open(big, "rb") as fi, open(files / "mask.png", "rb") as fm:
        response = client.post("/api/jobs", files={"image": ("big.png", fi), "mask": ("mask.png", fm)})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert client.get("/api/jobs/nope").status_code == 404


def test_jobs_queue_and_cancel(client, files):
    slow = _submit(client, files, options={"num_inference_steps": 200}).json()["id"]
    queued = _submit(client, files, options={"num_inference_steps": 2}).json()
    assert client.get("/api/queue").json()["waiting"] >= 1 or client.get(f"/api/jobs/{queued['id']}").json()["state"] != "queued"
    cancelled = client.delete(f"/api/jobs/{slow}").json()
    assert cancelled["state"] in ("queued", "running", "cancelled")
    assert _wait(client, slow)["state"] == "cancelled"
    assert _wait(client, queued["id"])["state"] == "done"
    assert client.get(f"/api/jobs/{slow}/result").status_code == 409


def test_serve_model_flags():
    from asuka.cli import CommandError
    from asuka.cli_serve import models_by_method

    assert models_by_method(["org/weights", "asuka=checkpoints/asuka"], "sd") == {
        "sd": "org/weights", "asuka": "checkpoints/asuka"}
    with pytest.raises(CommandError, match="given twice"):
        models_by_method(["a", "sd=b"], "sd")
