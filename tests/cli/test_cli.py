"""The ``whenthen`` command line against real databases."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from whenthen.cli.main import app

runner = CliRunner()


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    return {"WHENTHEN_DATABASE_URL": db_url, "WHENTHEN_SECRET_KEY": "s3cret-value"}


def invoke(env: dict[str, str], *args: str) -> str:
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_workspace_and_keys(env: dict[str, str]) -> None:
    invoke(env, "migrate")
    created = json.loads(invoke(env, "workspace", "create", "Acme", "--json"))
    assert set(created) >= {"id", "write_key", "admin_key"}
    assert created["write_key"].startswith("wk_")
    assert created["admin_key"].startswith("ak_")
    assert created["id"] in invoke(env, "workspace", "list")

    keys = json.loads(invoke(env, "keys", "list", "-w", created["id"], "--json"))
    assert sorted(k["kind"] for k in keys) == ["admin", "write"]
    new = json.loads(
        invoke(env, "keys", "create", "-w", created["id"], "--kind", "write", "--name", "web", "--json")
    )
    assert new["key"].startswith("wk_")
    invoke(env, "keys", "revoke", new["id"], "-w", created["id"])
    keys = json.loads(invoke(env, "keys", "list", "-w", created["id"], "--json"))
    assert {k["id"]: k["active"] for k in keys}[new["id"]] is False


def test_revoking_another_workspaces_key_fails(env: dict[str, str]) -> None:
    a = json.loads(invoke(env, "workspace", "create", "A", "--json"))
    b = json.loads(invoke(env, "workspace", "create", "B", "--json"))
    key_a = json.loads(invoke(env, "keys", "list", "-w", a["id"], "--json"))[0]["id"]
    result = runner.invoke(app, ["keys", "revoke", key_a, "-w", b["id"]], env=env)
    assert result.exit_code != 0
    assert all(k["active"] for k in json.loads(invoke(env, "keys", "list", "-w", a["id"], "--json")))


def test_config_show_redacts_secrets(env: dict[str, str]) -> None:
    out = invoke(env, "config", "show")
    data = json.loads(out)
    assert "s3cret-value" not in out
    assert data["secret_key"] == "**********"
    assert data["ingest"]["max_batch_events"] == 2500
    if "@" in env["WHENTHEN_DATABASE_URL"]:
        assert data["database_url"].startswith("postgresql+psycopg://postgres")
