"""The job queue behind ``asuka serve``: one worker thread per server runs jobs one at a time (no two pipelines fight
over one device), reports progress step by step, and cancels between steps.

A job is a request already checked by :func:`asuka.server.requests.read_job` (options resolved, images decoded):
running it is :class:`asuka.api.Inpainter` — the same entry point as ``asuka inpaint`` — with a loaded method reused
across jobs of the same method and weights. Progress comes from the method's diffusers pipeline: its ``progress_bar``
is replaced, for the job only, by one that counts steps (and raises :class:`JobCancelled` once the job is cancelled),
and restored in a ``finally``.
"""

from __future__ import annotations

import io
import queue
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

STATES = ("queued", "running", "done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside a pipeline's loop when its job was cancelled."""


@dataclass
class Job:
    """One checked request (``image``/``mask``: the uploaded files) and its state. ``result`` holds the PNG bytes once
    ``state == "done"``."""

    method: str
    model: str | None
    image: str
    mask: str
    options: dict[str, Any]
    preset: str | None
    inputs: dict[str, Any]
    seed: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"
    step: int = 0
    total: int = 0
    error: str | None = None
    result: bytes | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def update(self, **values: Any) -> None:
        with self.changed:
            for key, value in values.items():
                setattr(self, key, value)
            self.changed.notify_all()

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "method": self.method, "state": self.state, "step": self.step, "total": self.total,
                "error": self.error}

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class _StepCounter:
    """Stands in for a diffusers tqdm bar: counts ``update()`` calls into the job."""

    def __init__(self, job: Job, iterable=None, total: int | None = None) -> None:
        self.job, self.iterable = job, iterable
        self.total = total if total is not None else len(iterable) if iterable is not None else 0
        job.update(step=0, total=self.total)

    def __enter__(self) -> "_StepCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        if self.job.cancel.is_set():
            raise JobCancelled(self.job.id)
        self.job.update(step=min(self.job.step + n, self.total or self.job.step + n))


@contextmanager
def reporting_progress(runner: Any, job: Job) -> Iterator[None]:
    """Route the runner's diffusers ``progress_bar`` into ``job`` for the duration of one job."""
    pipe = getattr(runner, "pipe", None)
    if pipe is None:
        yield
        return
    object.__setattr__(pipe, "progress_bar", lambda iterable=None, total=None: _StepCounter(job, iterable, total))
    try:
        yield
    finally:
        object.__delattr__(pipe, "progress_bar")


class JobQueue:
    """FIFO of jobs run by one worker thread; ``load(method, model)`` gives a (cached) :class:`asuka.api.Inpainter`
    factory's runner."""

    def __init__(self, device: Any = None, keep: int = 64) -> None:
        self.device, self.keep = device, keep
        self.jobs: dict[str, Job] = {}
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._runners: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="asuka-serve-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public
    def submit(self, job: Job) -> Job:
        with self._lock:
            self.jobs[job.id] = job
            self._forget_old()
        self._pending.put(job)
        return job

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        if job.state == "queued":
            job.update(state="cancelled")

    def waiting(self) -> int:
        """Jobs queued, not yet running."""
        return sum(1 for job in list(self.jobs.values()) if job.state == "queued")

    def position(self, job: Job) -> int:
        """How many queued jobs are ahead of ``job`` (0 when it runs or is next)."""
        ahead = [j for j in list(self.jobs.values()) if j.state == "queued"]
        return ahead.index(job) if job in ahead else 0

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        for job in finished[:max(0, len(finished) - self.keep)]:
            self.jobs.pop(job.id, None)

    def _work(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            job.update(state="running")
            try:
                job.update(result=self._run(job), state="done")
            except JobCancelled:
                job.update(state="cancelled")
            except Exception as error:  # noqa: BLE001 - reported to the client as the job's one-line error
                job.update(state="failed", error=_one_line(error))

    def _run(self, job: Job) -> bytes:
        from asuka.api import Inpainter
        from asuka.pipelines._common import to_pil

        painter = Inpainter(job.method, job.model, device=self.device, preset=job.preset, options=job.options)
        key = (job.method, job.model)
        if key not in self._runners:
            self._runners = {key: painter.runner}  # one loaded method at a time: memory stays bounded
        painter.__dict__["runner"] = self._runners[key]  # reuse the loaded method (Inpainter.runner is cached)
        with reporting_progress(self._runners[key], job):
            result = painter(job.image, job.mask, inputs=job.inputs, seed=job.seed)
        buffer = io.BytesIO()
        to_pil(result)[0].save(buffer, format="PNG")
        return buffer.getvalue()


def _one_line(error: BaseException) -> str:
    from asuka.errors import InputError

    text = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


__all__ = ["Job", "JobCancelled", "JobQueue", "STATES", "reporting_progress"]
