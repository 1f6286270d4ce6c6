"""A seed example end to end as a user runs it: `whenthen serve` in its own process, a real
SMTP server (the local sink), journeys pushed over HTTP, events from the Segment Python
library, and a click through the tracked link in the received email."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from segment.analytics import Client

from tests.support.processes import eventually, free_port, mail_to, publish_example, server_env, up
from whenthen.messaging.smtp_sink import SmtpSink


def test_rsvp_invitation_click_through_over_real_http_and_smtp(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with SmtpSink() as sink:
        env = server_env(db_url, port=port, secret="e2e", sink=sink, poll="0.05")
        proc = subprocess.Popen(
            [sys.executable, "-m", "whenthen.cli.main", "serve"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            output = ""
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
            admin = {"Authorization": f"Bearer {admin_key.group(1)}"}
            with httpx.Client(base_url=base, timeout=10) as http:
                eventually(lambda: up(http))
                publish_example(http, admin, "rsvp.yaml", "event-rsvp")

                errors: list[object] = []
                analytics = Client(
                    write_key.group(1), host=base, sync_mode=True, on_error=lambda e, b: errors.append(e)
                )
                analytics.identify("guest-1", {"email": "Guest@Example.com", "first_name": "Gail"})
                analytics.track("guest-1", "Invited", {"event_name": "Tea Summit", "event_id": "ts-26"})
                assert errors == []

                invite = eventually(lambda: mail_to(sink, "guest@example.com", 1))[0]
                assert invite.subject == "You're invited: Tea Summit"

                # Clicked at once: the email may be recorded as sent (with its links) or
                # still in flight; either way the signed link redirects.
                links = re.findall(r'href="([^"]+/t/c/[^"]+)"', invite.body("html"))
                assert len(links) == 2
                assert all(link.startswith(f"{base}/t/c/") for link in links)
                r = http.get(links[0].replace(base, ""), follow_redirects=False)
                assert r.status_code == 302
                assert r.headers["location"] == "https://events.example.com/rsvp?e=ts-26"

                mails = eventually(lambda: mail_to(sink, "guest@example.com", 2))
                assert [m.subject for m in mails] == ["You're invited: Tea Summit", "See you at Tea Summit"]
                profile = http.get(
                    "/api/v1/profiles/lookup", params={"user_id": "guest-1"}, headers=admin
                ).json()
                events = http.get(f"/api/v1/profiles/{profile['id']}/events", headers=admin).json()["data"]
                clicked = [e for e in events if e["event"] == "Email Link Clicked"]
                assert len(clicked) == 1
                assert clicked[0]["payload"]["properties"]["url"] == "https://events.example.com/rsvp?e=ts-26"

                def statuses() -> list[str]:
                    log = http.get("/api/v1/journeys/event-rsvp/messages", headers=admin).json()["data"]
                    return sorted(m["status"] for m in log)

                eventually(lambda: statuses() == ["sent", "sent"])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
