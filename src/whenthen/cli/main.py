"""The ``whenthen`` command line."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from whenthen import workspaces
from whenthen.bootstrap import Container, build
from whenthen.settings import load_settings, redacted
from whenthen.storage.migrate import current_revision, head_revision, upgrade
from whenthen.workspaces import KeyKind

app = typer.Typer(help="whenthen: behavior-triggered marketing automation.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
workspace_app = typer.Typer(help="Workspaces.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of a workspace.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(workspace_app, name="workspace")
app.add_typer(keys_app, name="keys")

console = Console()


@contextmanager
def _container(migrate: bool = True) -> Iterator[Container]:
    c = build(load_settings(), migrate=migrate)
    try:
        yield c
    finally:
        c.close()


def _create_workspace(c: Container, name: str) -> dict[str, Any]:
    now = c.clock.now()
    with c.db.write() as conn:
        ws = workspaces.create_workspace(conn, name, now=now)
        write = workspaces.issue_key(conn, ws.id, KeyKind.WRITE, name="default write key", now=now)
        admin = workspaces.issue_key(conn, ws.id, KeyKind.ADMIN, name="default admin key", now=now)
    return {"id": ws.id, "name": ws.name, "write_key": write.plaintext, "admin_key": admin.plaintext}


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Run the API only.")] = False,
) -> None:
    """Run the API (and, by default, the pipeline worker) in this process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _container() as c:
        _serve(c, host, port, no_worker)


def _serve(c: Container, host: str | None, port: int | None, no_worker: bool) -> None:
    import uvicorn

    from whenthen.api.app import create_app

    if c.settings.demo_workspace:
        with c.db.read() as conn:
            empty = not workspaces.list_workspaces(conn)
        if empty:
            demo = _create_workspace(c, "Demo")
            console.print("[bold green]Created a demo workspace[/] (keys are shown once):")
            console.print(f"  workspace id : {demo['id']}")
            console.print(f"  write key    : {demo['write_key']}")
            console.print(f"  admin key    : {demo['admin_key']}")
    host = host or c.settings.server.host
    port = port or c.settings.server.port
    console.print(f"whenthen listening on http://{host}:{port}  (OpenAPI: /docs, /openapi.json)")
    uvicorn.run(create_app(c, run_worker=not no_worker), host=host, port=port, log_level="info")


@app.command()
def worker() -> None:
    """Run the pipeline worker alone (for API and worker processes on PostgreSQL)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _container() as c:
        _work(c)


def _work(c: Container) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    c.worker.start()
    console.print(f"worker {c.worker.owner} running; Ctrl-C to stop")
    stop.wait()
    c.worker.stop()


@app.command()
def drain() -> None:
    """Process every pending event now, then exit."""
    with _container() as c:
        handled = c.worker.drain()
    console.print(f"processed {handled} events")


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    with _container(migrate=False) as c:
        upgrade(c.db)
        console.print(f"database at revision {current_revision(c.db)} (head {head_revision(c.db)})")


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration, secrets redacted."""
    typer.echo(json.dumps(redacted(load_settings()), indent=2))


@workspace_app.command("create")
def workspace_create(
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a workspace with a write key and an admin key (shown once)."""
    with _container() as c:
        data = _create_workspace(c, name)
    if as_json:
        typer.echo(json.dumps(data))
        return
    for k, v in data.items():
        console.print(f"{k:10}: {v}")


@workspace_app.command("list")
def workspace_list() -> None:
    with _container() as c, c.db.read() as conn:
        rows = workspaces.list_workspaces(conn)
    table = Table("id", "name", "created")
    for ws in rows:
        table.add_row(ws.id, ws.name, ws.created_at.isoformat())
    console.print(table)


@keys_app.command("list")
def keys_list(
    workspace: Annotated[str, typer.Option("--workspace", "-w", help="Workspace id.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    with _container() as c, c.db.read() as conn:
        keys = workspaces.list_keys(conn, workspaces.get_workspace(conn, workspace).id)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "kind": k.kind.value,
                        "name": k.name,
                        "prefix": k.display_prefix,
                        "active": k.active,
                    }
                    for k in keys
                ]
            )
        )
        return
    table = Table("id", "kind", "name", "prefix", "created", "revoked")
    for k in keys:
        table.add_row(
            k.id,
            k.kind.value,
            k.name,
            k.display_prefix + "…",
            k.created_at.isoformat(),
            k.revoked_at.isoformat() if k.revoked_at else "",
        )
    console.print(table)


@keys_app.command("create")
def keys_create(
    workspace: Annotated[str, typer.Option("--workspace", "-w", help="Workspace id.")],
    kind: Annotated[KeyKind, typer.Option(help="write (ingestion only) or admin.")],
    name: Annotated[str, typer.Option(help="A label.")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Issue a key; its plaintext is printed once and never stored."""
    with _container() as c, c.db.write() as conn:
        ws = workspaces.get_workspace(conn, workspace)
        issued = workspaces.issue_key(conn, ws.id, kind, name=name, now=c.clock.now())
    if as_json:
        typer.echo(json.dumps({"id": issued.key.id, "kind": kind.value, "key": issued.plaintext}))
    else:
        console.print(f"{issued.key.id} ({kind.value}): {issued.plaintext}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: str,
    workspace: Annotated[str, typer.Option("--workspace", "-w", help="Workspace id.")],
) -> None:
    with _container() as c, c.db.write() as conn:
        ws = workspaces.get_workspace(conn, workspace)
        key = workspaces.revoke(conn, ws.id, key_id, now=c.clock.now())
    console.print(f"revoked {key.id}")


def run() -> None:
    from whenthen.kernel.errors import DomainError

    try:
        app()
    except DomainError as exc:
        console.print(f"[red]error[/]: {exc.code}: {exc.message}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
