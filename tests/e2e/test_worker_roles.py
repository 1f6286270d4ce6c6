"""API, pipeline and dispatcher as three processes (`whenthen serve --no-worker`,
`whenthen worker --role pipeline`, `whenthen worker --role dispatch`): each does only its
part, and the wake-ups carry the work across them instead of the poll.

The poll interval is set to 60 s: an email that arrives well within it was carried by
wake-ups (API -> pipeline, pipeline -> dispatcher), not found by a poll."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from tests.support.processes import eventually, free_port, mail_to, publish_example, server_env, up
from whenthen.messaging.smtp_sink import SmtpSink

POLL = "60"


class Proc:
    """A whenthen command in its own process, its output in a file (read when it is ready
    and at the end: a pipe nobody reads would fill and stall it)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, ready: str) -> None:
        self.log = cwd / f"{'-'.join(args).replace('--', '')}.log"
        self._file: IO[bytes] = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "whenthen.cli.main", *args],
            cwd=cwd,
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while ready not in self.output and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready in self.output, self.output

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._file.close()


def test_api_pipeline_and_dispatcher_in_three_processes(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    with SmtpSink() as sink:
        env = server_env(db_url, port=port, secret="roles", sink=sink, poll=POLL)
        try:
            api = Proc(["serve", "--no-worker"], env, tmp_path, "listening on")
            procs.append(api)
            write_key = re.search(r"write key\s*:\s*(\S+)", api.output)
            admin_key = re.search(r"admin key\s*:\s*(\S+)", api.output)
            assert write_key, api.output
            assert admin_key, api.output
            admin = {"Authorization": f"Bearer {admin_key.group(1)}"}
            auth = (write_key.group(1), "")
            procs.append(Proc(["worker", "--role", "pipeline"], env, tmp_path, "(pipeline) running"))
            with httpx.Client(base_url=base, timeout=10) as http:
                eventually(lambda: up(http))
                publish_example(http, admin, "rsvp.yaml", "event-rsvp")

                def invite(user: str) -> None:
                    r = http.post(
                        "/v1/identify",
                        auth=auth,
                        json={"userId": user, "traits": {"email": f"{user}@example.com"}},
                    )
                    assert r.status_code == 200, r.text
                    props = {"event_name": "Tea Summit", "event_id": "ts-26"}
                    r = http.post(
                        "/v1/track", auth=auth, json={"userId": user, "event": "Invited", "properties": props}
                    )
                    assert r.status_code == 200, r.text

                def log() -> list[dict[str, Any]]:
                    data: list[dict[str, Any]] = http.get(
                        "/api/v1/journeys/event-rsvp/messages", headers=admin
                    ).json()["data"]
                    return data

                # The API stored the events; the pipeline worker was woken (no poll for 60 s)
                # and queued the email; without a dispatcher, it stays queued.
                started = time.monotonic()
                invite("guest-1")
                queued = eventually(lambda: [m for m in log() if m["status"] == "queued"], timeout=20)
                assert len(queued) == 1
                time.sleep(1.0)
                assert sink.messages() == []
                assert [m["status"] for m in log()] == ["queued"]

                procs.append(Proc(["worker", "--role", "dispatch"], env, tmp_path, "(dispatch) running"))
                assert eventually(lambda: mail_to(sink, "guest-1@example.com", 1), timeout=20)

                # Both hops by wake-up: API -> pipeline, pipeline -> dispatcher.
                invite("guest-2")
                mail = eventually(lambda: mail_to(sink, "guest-2@example.com", 1), timeout=20)
                assert mail[0].subject == "You're invited: Tea Summit"
                assert time.monotonic() - started < float(POLL)
                # The SMTP server has the email just before its record is written.
                eventually(lambda: sorted(m["status"] for m in log()) == ["sent", "sent"], timeout=20)
        finally:
            for p in reversed(procs):
                p.stop()
        for p in procs:
            assert "Traceback" not in p.output
