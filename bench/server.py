"""``python -m bench.server --port P``: what ``whenthen serve`` runs, without the access log.

The settings, the container and the app are built exactly as ``whenthen serve`` builds
them (from ``WHENTHEN_*``), and the start-up heap is frozen as it freezes it; only
uvicorn's per-request access log line is off, as a production deployment behind a proxy
that logs requests would run it. The bench runs ``whenthen serve`` itself with
``--server cli``.
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from whenthen.api.app import create_app
from whenthen.bootstrap import build
from whenthen.settings import load_settings
from whenthen.worker.heap import freeze_start_up_heap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker", action="store_true", help="run the embedded pipeline worker")
    parser.add_argument("--workers", type=int, default=1, help="API processes (uvicorn workers)")
    args = parser.parse_args()
    if args.workers > 1:
        os.environ["WHENTHEN_SERVER__EMBEDDED_WORKER"] = "true" if args.worker else "false"
        uvicorn.run(
            "whenthen.api.app:create_app_from_environment",
            factory=True,
            workers=args.workers,
            host="127.0.0.1",
            port=args.port,
            access_log=False,
            log_level="warning",
        )
        return
    container = build(load_settings())
    app = create_app(container, run_worker=args.worker)
    freeze_start_up_heap()  # as `whenthen serve` does
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
