"""`whenthen serve` as a user runs it: a real process, a real port, the embedded worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import free_port
from whenthen.worker import wakeups


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_creates_demo_workspace_and_processes_events(db_url: str, tmp_path: Path, workers: int) -> None:
    port = free_port()
    env = {
        **os.environ,
        "WHENTHEN_DATABASE_URL": db_url,
        "WHENTHEN_SECRET_KEY": "serve-test",
        "WHENTHEN_SERVER__PORT": str(port),
        "COLUMNS": "200",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "whenthen.cli.main", "serve", "--workers", str(workers)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ""
    rest = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while "listening on" not in output and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output += line
        write_key = re.search(r"write key\s*:\s*(\S+)", output)
        admin_key = re.search(r"admin key\s*:\s*(\S+)", output)
        assert write_key, output
        assert admin_key, output
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as http:
            while time.monotonic() < deadline:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            r = http.post(
                "/v1/identify",
                auth=(write_key.group(1), ""),
                json={"userId": "first-user", "traits": {"email": "First@Example.com"}},
            )
            assert r.status_code == 200, r.text
            headers = {"Authorization": f"Bearer {admin_key.group(1)}"}
            # The embedded worker applies the call behind the 200: poll briefly for it.
            while time.monotonic() < deadline:
                r = http.get("/api/v1/profiles/lookup", params={"user_id": "first-user"}, headers=headers)
                if r.status_code == 200:
                    break
                time.sleep(0.05)
            assert r.status_code == 200, r.text
            assert r.json()["email"] == "first@example.com"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            rest = proc.stdout.read()
            proc.stdout.close()
    # Stopped by SIGTERM, the processes closed their containers: no traceback, and on
    # SQLite no wake-up socket (nor their folder) left behind.
    assert "Traceback" not in rest, rest
    if db_url.startswith("sqlite"):
        database = db_url.removeprefix("sqlite:///")
        assert not wakeups.socket_folder(os.path.abspath(database)).exists(), output + rest
    assert proc.returncode is not None
