"""`whenthen segments ...` against real databases."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import make_settings
from tests.support.ingest import send
from whenthen.bootstrap import build
from whenthen.cli.main import app

runner = CliRunner()


def ok(env: dict[str, str], *args: str) -> str:
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_push_preview_list_members_export(db_url: str, tmp_path: Path) -> None:
    env = {"WHENTHEN_DATABASE_URL": db_url, "WHENTHEN_SECRET_KEY": "cli", "COLUMNS": "200"}
    ws = json.loads(ok(env, "workspace", "create", "Shop", "--json"))
    c = build(make_settings(db_url, secret_key="cli"))
    try:
        send(
            c,
            ws["id"],
            {"type": "identify", "userId": "pro-1", "traits": {"plan": "pro", "email": "p1@example.com"}},
            {"type": "identify", "userId": "free-1", "traits": {"plan": "free"}},
        )
    finally:
        c.close()
    seg = tmp_path / "pro.yaml"
    seg.write_text(
        "key: pro-users\nname: Pro users\n"
        "definition:\n  condition: {kind: trait, path: plan, op: eq, value: pro}\n"
    )
    preview = json.loads(ok(env, "segments", "preview", str(seg)))
    assert preview["count"] == 1
    assert "pro-users: version 1, entered 1, exited 0" in ok(env, "segments", "push", str(seg))
    assert [s["key"] for s in json.loads(ok(env, "segments", "list"))] == ["pro-users"]
    members = json.loads(ok(env, "segments", "members", "pro-users"))
    assert len(members["data"]) == 1
    assert members["next_cursor"] is None
    csv = ok(env, "segments", "export", "pro-users").splitlines()
    assert csv[0].startswith("profile_id")
    assert "pro-1" in csv[1]
    assert "p1@example.com" in csv[1]
