"""`whenthen journeys ...` and `whenthen mailbox` against real databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from whenthen.cli.main import app
from whenthen.kernel.errors import DomainError

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    return {"WHENTHEN_DATABASE_URL": db_url, "WHENTHEN_SECRET_KEY": "cli", "COLUMNS": "200"}


def ok(env: dict[str, str], *args: str) -> str:
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_validate_reports_node_field_and_reason(tmp_path: Path) -> None:
    out = ok({}, "journeys", "validate", *[str(p) for p in sorted(EXAMPLES.glob("*.yaml"))])
    assert out.count(": ok (") == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "key: bad\nname: Bad\ntrigger: {kind: event, event: A}\nstart: a\n"
        "nodes:\n  a: {kind: delay, duration: soon, next: b}\n  b: {kind: send_email, email: {subject: s}}\n"
    )
    result = runner.invoke(app, ["journeys", "validate", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "nodes.a: Value error, 'soon' is not a duration" in result.output
    assert "nodes.b.email: Value error, an email needs html or text" in result.output


def test_push_publish_list_show_pause_archive(env: dict[str, str]) -> None:
    ws = json.loads(ok(env, "workspace", "create", "Shop", "--json"))
    cart = str(EXAMPLES / "abandoned-cart.yaml")
    assert "abandoned-cart: draft, versions [1]" in ok(env, "journeys", "push", cart)
    assert "version 1 published" in ok(env, "journeys", "publish", "abandoned-cart")
    # Pushing again makes a new draft; the published version is untouched.
    assert "abandoned-cart: active, versions [1, 2]" in ok(env, "journeys", "push", cart, "-w", ws["id"])
    listed = json.loads(ok(env, "journeys", "list", "--json"))
    assert listed == [{"key": "abandoned-cart", "status": "active", "version": 1}]
    shown = ok(env, "journeys", "show", "abandoned-cart", "--version", "1")
    assert "wait_for_checkout" in shown
    assert "abandoned-cart: paused" in ok(env, "journeys", "pause", "abandoned-cart")
    assert "abandoned-cart: active" in ok(env, "journeys", "resume", "abandoned-cart")
    assert "abandoned-cart: archived" in ok(env, "journeys", "archive", "abandoned-cart")
    result = runner.invoke(app, ["journeys", "publish", "abandoned-cart"], env=env)
    assert result.exit_code == 1
    assert isinstance(result.exception, DomainError)
    assert result.exception.code == "journey_archived"


def test_workspace_is_required_when_there_are_several(env: dict[str, str]) -> None:
    ok(env, "workspace", "create", "A")
    ok(env, "workspace", "create", "B")
    # Through the real entry point, as a user sees it: a one-line error, exit status 1.
    proc = subprocess.run(
        [sys.executable, "-c", "from whenthen.cli.main import run; run()", "journeys", "list"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "error: workspace_required: several workspaces exist: pass --workspace" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_simulate_from_events_file(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {
                    "type": "identify",
                    "userId": "ann",
                    "traits": {"first_name": "Ann"},
                    "timestamp": "2026-11-01T10:00:00Z",
                },
                {
                    "type": "track",
                    "userId": "ann",
                    "event": "Product Added",
                    "properties": {"cart_id": "c1", "product_name": "Tea"},
                    "timestamp": "2026-11-01T10:01:00Z",
                },
            ]
        )
    )
    out = ok(
        {}, "journeys", "simulate", str(EXAMPLES / "abandoned-cart.yaml"), "--events", str(events), "--json"
    )
    report = json.loads(out)
    assert report["summary"] == {"completed": 1, "emails": 2}
    text = ok(
        {"COLUMNS": "200"},
        "journeys",
        "simulate",
        str(EXAMPLES / "abandoned-cart.yaml"),
        "--events",
        str(events),
    )
    assert "would_send_email [reminder]" in text
    assert "Ann, your Tea is waiting" in text


def test_backtest_and_mailbox(env: dict[str, str], db_url: str) -> None:
    from tests.conftest import make_settings
    from tests.support.ingest import send
    from whenthen.bootstrap import build

    ws = json.loads(ok(env, "workspace", "create", "Shop", "--json"))
    ok(env, "journeys", "push", "--publish", str(EXAMPLES / "welcome-series.yaml"))
    c = build(make_settings(db_url, secret_key="cli"))
    try:
        send(
            c,
            ws["id"],
            {"type": "identify", "userId": "u", "traits": {"email": "u@example.com", "first_name": "Uma"}},
        )
        send(c, ws["id"], {"type": "track", "userId": "u", "event": "Signed Up"})
    finally:
        c.close()
    out = ok(env, "mailbox", "--body")
    assert "not delivered" in out
    assert "Welcome, Uma!" in out
    assert "u@example.com" in out
    report = json.loads(
        ok(env, "journeys", "simulate", str(EXAMPLES / "welcome-series.yaml"), "--backtest", "--json")
    )
    assert report["summary"]["emails"] == 3
