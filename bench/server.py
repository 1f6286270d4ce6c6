"""``python -m bench.server --port P``: what ``whenthen serve`` runs, without the access log.

The settings, the container and the app are built exactly as ``whenthen serve`` builds
them (from ``WHENTHEN_*``); only uvicorn's per-request access log line is off, as a
production deployment behind a proxy that logs requests would run it. The bench runs
``whenthen serve`` itself with ``--server cli``.
"""

from __future__ import annotations

import argparse

import uvicorn

from whenthen.api.app import create_app
from whenthen.bootstrap import build
from whenthen.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker", action="store_true", help="run the embedded pipeline worker")
    args = parser.parse_args()
    container = build(load_settings())
    app = create_app(container, run_worker=args.worker)
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
