"""``asuka serve``: the web UI and REST API (:mod:`asuka.server`), argument parsing only at import time."""

from __future__ import annotations

import argparse

from asuka.cli import CommandError, Subcommand, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=positive_int, default=8080, help="port (default 8080)")
    p.add_argument("--method", default="sd", help="the method the page selects first (default sd)")
    p.add_argument("--model", action="append", default=[], metavar="[METHOD=]DIR",
                   help="weights for a method (a folder or hub id); without METHOD= it is for --method; repeatable. "
                        "Default: each method's tiny offline demo")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--upload-limit-mb", type=positive_int, default=32, help="largest accepted upload (default 32 MB)")


def models_by_method(values: list[str], method: str) -> dict[str, str]:
    """``--model METHOD=DIR`` / ``--model DIR`` (for ``method``) -> ``{method: DIR}``."""
    models: dict[str, str] = {}
    for value in values:
        name, sep, ref = value.partition("=")
        name, ref = (name, ref) if sep and name and "/" not in name else (method, value)
        if name in models:
            raise CommandError(f"--model: {name} is given twice")
        models[name] = ref
    return models


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from asuka.pipelines._registry import get_method
    from asuka.server.app import create_app

    get_method(args.method)  # an unknown method is a one-line error before the server starts
    app = create_app(device=args.device, default_method=args.method,
                     models=models_by_method(args.model, args.method),
                     upload_limit=args.upload_limit_mb * 1024 * 1024)
    print(f"asuka serve: http://{args.host}:{args.port}  (API docs: http://{args.host}:{args.port}/docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


SERVE = Subcommand("serve", "web UI and REST API for every method (models load at the first job)", add_arguments, run)
