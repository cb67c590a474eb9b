"""``asuka serve``: an ASGI app (FastAPI on uvicorn) with a REST API and a static page for every registered method.

FastAPI because it gives the OpenAPI documentation at ``/docs`` and multipart uploads for free and runs on the
standard ASGI server (uvicorn); the page is plain HTML/JS served from ``asuka/server/static`` (no build step).

API (every error is HTTP 4xx with ``{"error": "<one line>"}``, the same line the CLI prints):

- ``GET /api/methods``: every method with its description and the JSON schema of its options, presets and inputs
  (the method declarations of :mod:`asuka.options` — no second list), and methods that failed to import with why.
- ``POST /api/jobs`` (multipart): ``image``, ``mask`` (white = hole) files, ``method``, optional ``options`` (a JSON
  object), ``preset``, ``seed``, ``model``, and extra inputs by role as ``input_<role>`` (text field or file). Checked
  before it queues (options, inputs, sizes, upload size); returns ``{"id", "position"}``.
- ``GET /api/jobs/{id}``: state (queued / running / done / failed / cancelled), step i of n, error, queue position.
- ``GET /api/jobs/{id}/events``: the same as server-sent events until the job finishes.
- ``GET /api/jobs/{id}/result``: the PNG; ``GET /api/jobs/{id}/inputs/{image|mask}``: what was submitted.
- ``DELETE /api/jobs/{id}``: cancel (a running job stops at its next denoising step).
- ``GET /api/queue``: jobs waiting.

Jobs run one at a time (:class:`asuka.server.jobs.JobQueue`) through :class:`asuka.api.Inpainter` on the uploaded
files, exactly as ``asuka inpaint`` runs them: the same options, inputs and seed give the same PNG. Uploads live in
the app's own temporary folder (removed when the app stops); nothing is written elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile

from asuka.errors import InputError
from asuka.server.jobs import Job, JobQueue

STATIC = Path(__file__).parent / "static"
DEFAULT_UPLOAD_LIMIT = 32 * 1024 * 1024  # bytes per uploaded file
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class RequestError(Exception):
    """A bad request: HTTP ``status`` with a one-line message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def create_app(*, device: Any = None, default_method: str = "sd", models: dict[str, str] | None = None,
               upload_limit: int = DEFAULT_UPLOAD_LIMIT) -> FastAPI:
    """The app. ``models``: ``{method: folder or hub id}`` used when a request names no ``model`` (default: each
    method's tiny offline demo). Models load lazily, at the first job that needs them."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["workdir"] = Path(tempfile.mkdtemp(prefix="asuka-serve-"))
        state["queue"] = JobQueue(device=device)
        try:
            yield
        finally:
            state["queue"].close()
            shutil.rmtree(state["workdir"], ignore_errors=True)

    app = FastAPI(title="asuka", description="Diffusion image inpainting: every registered method over HTTP.",
                  lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, error: InputError) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(error).split())}, status_code=400)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/methods")
    async def methods() -> dict:
        """Every registered method, its declared options, presets and inputs (JSON schema), and unavailable ones."""
        from asuka.pipelines._registry import available_methods, get_method, unavailable_methods

        listed = []
        for name in available_methods():
            registered = get_method(name)
            listed.append({"name": name, "description": registered.description,
                           "schema": registered.spec.schema(name, registered.description)})
        return {"default": default_method, "methods": listed,
                "unavailable": [{"name": k, "reason": v} for k, v in unavailable_methods().items()]}

    @app.get("/api/queue")
    async def queue_length() -> dict:
        return {"waiting": state["queue"].waiting()}

    @app.post("/api/jobs")
    async def submit(request: Request) -> dict:
        """Submit a job (multipart form); returns its id and queue position."""
        form = await request.form()
        job = await asyncio.to_thread(_read_job, form, state["workdir"], models or {}, upload_limit)
        state["queue"].submit(job)
        return {"id": job.id, "position": state["queue"].position(job)}

    def _job(job_id: str) -> Job:
        job = state["queue"].jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)", 404)
        return job

    def _status(job: Job) -> dict:
        return {**job.status(), "position": state["queue"].position(job)}

    @app.get("/api/jobs/{job_id}")
    async def status(job_id: str) -> dict:
        return _status(_job(job_id))

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        """Server-sent events: the job's status whenever it changes, until it finishes."""
        job = _job(job_id)

        async def stream():
            last = None
            while True:
                current = _status(job)
                if current != last:
                    yield f"data: {json.dumps(current)}\n\n"
                    last = current
                if job.finished:
                    return
                await asyncio.to_thread(_wait_change, job)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/api/jobs/{job_id}/result")
    async def result(job_id: str) -> Response:
        job = _job(job_id)
        if job.state != "done":
            raise RequestError(f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else ""), 409)
        return Response(job.result, media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="asuka-{job_id}.png"'})

    @app.get("/api/jobs/{job_id}/inputs/{name}")
    async def job_input(job_id: str, name: str) -> FileResponse:
        job = _job(job_id)
        if name not in ("image", "mask"):
            raise RequestError(f"unknown input {name!r}; choose image or mask", 404)
        return FileResponse(job.image if name == "image" else job.mask)

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str) -> dict:
        job = _job(job_id)
        state["queue"].cancel(job)
        return _status(job)

    return app


def _wait_change(job: Job, timeout: float = 1.0) -> None:
    with job.changed:
        job.changed.wait(timeout)


def _read_job(form: Any, workdir: Path, models: dict[str, str], limit: int) -> Job:
    """A checked :class:`Job` from the multipart form (files saved under ``workdir/<id>``), or a RequestError /
    InputError: options, inputs, sizes and decoding are all checked before the job queues."""
    from asuka.api import Inpainter, per_stem_inputs
    from asuka.pipelines._common import load_image, load_mask, prepare_inputs

    method = _text(form, "method") or "sd"
    job = Job(method=method, model=_text(form, "model") or models.get(method), image="", mask="", options={},
              preset=_text(form, "preset") or None, inputs={}, seed=_seed(_text(form, "seed")))
    folder = workdir / job.id
    folder.mkdir()
    try:
        job.image = str(_save(form, "image", folder, limit, required=True))
        job.mask = str(_save(form, "mask", folder, limit, required=True))
        job.options = _options(_text(form, "options"))
        painter = Inpainter(job.method, job.model, preset=job.preset, options=job.options)  # checks, loads nothing
        given: dict[str, Any] = {}
        for declared in painter.spec.inputs:
            key = f"input_{declared.role}"
            if key not in form:
                continue
            if declared.kind == "image":
                given[declared.role] = str(_save(form, key, folder, limit, required=True))
            elif (value := _text(form, key)) != "":
                given[declared.role] = value
        roles = {declared.role for declared in painter.spec.inputs}
        unknown = sorted(k for k in form.keys() if k.startswith("input_") and k[len("input_"):] not in roles)
        if unknown:
            raise RequestError(f"unknown input(s) {unknown}; this method takes "
                               f"{', '.join('input_' + i.role for i in painter.spec.inputs) or 'none'}")
        image, mask = prepare_inputs(load_image(job.image, name="image"), load_mask(job.mask, name="mask"))
        sizes = {"item": (image.shape[-1], image.shape[-2])}
        job.inputs = per_stem_inputs(painter.spec, ["item"], given, sizes=sizes)["item"]
        return job
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _text(form: Any, key: str) -> str:
    value = form.get(key)
    if isinstance(value, UploadFile):
        raise RequestError(f"{key}: expected a text field, got a file")
    return "" if value is None else str(value)


def _seed(text: str) -> int:
    if text == "":
        return 0
    try:
        seed = int(text)
    except ValueError:
        raise RequestError(f"seed: expected an integer, got {text!r}") from None
    if not 0 <= seed < 2 ** 63:
        raise RequestError(f"seed: must be in [0, 2**63), got {seed}")
    return seed


def _options(text: str) -> dict[str, Any]:
    if text == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"options: not valid JSON ({err.msg}); send a JSON object such as "
                           '{"num_inference_steps": 20}') from None
    if not isinstance(value, dict):
        raise RequestError("options: send a JSON object such as {\"num_inference_steps\": 20}")
    return value


def _save(form: Any, key: str, folder: Path, limit: int, *, required: bool) -> Path | None:
    upload = form.get(key)
    if upload is None:
        if required:
            raise RequestError(f"{key}: missing; upload an image file")
        return None
    if not isinstance(upload, UploadFile):
        raise RequestError(f"{key}: expected an uploaded image file, got a text field")
    suffix = Path(upload.filename or "").suffix.lower()
    suffix = suffix if suffix in _IMAGE_SUFFIXES else ".png"
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise RequestError(f"{key}: upload larger than the limit of {limit // (1024 * 1024)} MB", 413)
    if not data:
        raise RequestError(f"{key}: the uploaded file is empty")
    path = folder / f"{key}{suffix}"
    path.write_bytes(data)
    return path


__all__ = ["DEFAULT_UPLOAD_LIMIT", "create_app"]
