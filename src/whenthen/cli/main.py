"""The ``whenthen`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from whenthen import journeys, workspaces
from whenthen.bootstrap import Container, build
from whenthen.journeys import InvalidDefinition, parse_definition
from whenthen.kernel.errors import DomainError
from whenthen.settings import load_settings, redacted, webhook_signing_secret
from whenthen.storage.migrate import current_revision, head_revision, upgrade
from whenthen.worker.heap import freeze_start_up_heap
from whenthen.worker.runner import Role
from whenthen.workspaces import KeyKind

app = typer.Typer(help="whenthen: behavior-triggered marketing automation.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
workspace_app = typer.Typer(help="Workspaces.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of a workspace.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(workspace_app, name="workspace")
app.add_typer(keys_app, name="keys")
journeys_app = typer.Typer(help="Journeys as code: validate, push, publish, simulate.", no_args_is_help=True)
app.add_typer(journeys_app, name="journeys")

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
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (costs CPU).")] = False,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="API processes (each with its own worker).")
    ] = 1,
) -> None:
    """Run the API (and, by default, the pipeline worker) in this process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _container() as c:
        _serve(c, host, port, no_worker, access_log, workers)


def _serve(
    c: Container, host: str | None, port: int | None, no_worker: bool, access_log: bool, workers: int
) -> None:
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
    if workers > 1:
        # Several processes, each building its app from the environment: one core each
        # (the GIL bounds one process to one). Their pipeline workers share the partitions.
        os.environ["WHENTHEN_SERVER__EMBEDDED_WORKER"] = "false" if no_worker else "true"
        uvicorn.run(
            "whenthen.api.app:create_app_from_environment",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level="info",
            access_log=access_log,
        )
        return
    app_ = create_app(c, run_worker=not no_worker)
    freeze_start_up_heap()
    # uvicorn stops on SIGTERM, puts back the handler it found and raises the signal
    # again: with the default handler the process would die there, before ``serve``
    # closes the container (wake-up sockets, the checkpoint thread, connections).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    uvicorn.run(app_, host=host, port=port, log_level="info", access_log=access_log)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command()
def worker(
    role: Annotated[
        Role,
        typer.Option(
            help="What this process runs: the pipeline (events, timers, segment upkeep), the"
            " dispatcher (emails, webhooks and other outbox jobs), or both."
        ),
    ] = Role.ALL,
) -> None:
    """Run the worker alone, beside `whenthen serve --no-worker` (one or more of each)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _container() as c:
        _work(c, role)


def _work(c: Container, role: Role = Role.ALL) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    freeze_start_up_heap()
    c.worker.start(role)
    console.print(f"worker {c.worker.owner} ({role.value}) running; Ctrl-C to stop")
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


@config_app.command("webhook-secret")
def config_webhook_secret() -> None:
    """Print the key webhook receivers use to verify X-Whenthen-Signature."""
    typer.echo(webhook_signing_secret(load_settings()).decode("utf-8"))


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


# ---- journeys ------------------------------------------------------------------------

WorkspaceOpt = Annotated[
    str | None,
    typer.Option(
        "--workspace", "-w", envvar="WHENTHEN_WORKSPACE", help="Workspace id (default: the only one)."
    ),
]


def _workspace_id(c: Container, given: str | None) -> str:
    with c.db.read() as conn:
        if given:
            return workspaces.get_workspace(conn, given).id
        all_ws = workspaces.list_workspaces(conn)
    if len(all_ws) != 1:
        raise DomainError("workspace_required", "several workspaces exist: pass --workspace", status=400)
    return all_ws[0].id


def _load_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DomainError("unreadable_file", f"cannot read {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DomainError("invalid_document", f"{path} is not valid YAML or JSON: {exc}") from None


def _print_problems(exc: InvalidDefinition) -> None:
    for p in exc.problems:
        where = ".".join(x for x in (p.node and f"nodes.{p.node}", p.field) if x) or "(definition)"
        console.print(f"[red]✗[/] {where}: {p.reason}")


@journeys_app.command("validate")
def journeys_validate(files: list[Path]) -> None:
    """Check definitions against the schema and the graph rules (no database needed)."""
    bad = 0
    for f in files:
        try:
            d = parse_definition(_load_document(f))
        except InvalidDefinition as exc:
            console.print(f"[red]{f}[/]: invalid")
            _print_problems(exc)
            bad += 1
            continue
        console.print(f"[green]{f}[/]: ok ({d.key}, {len(d.nodes)} nodes)")
    if bad:
        raise typer.Exit(1)


@journeys_app.command("push")
def journeys_push(
    files: list[Path],
    workspace: WorkspaceOpt = None,
    publish: Annotated[bool, typer.Option("--publish", help="Publish right after pushing.")] = False,
) -> None:
    """Store definitions as drafts (and optionally publish them)."""
    with _container() as c:
        ws = _workspace_id(c, workspace)
        for f in files:
            data = _load_document(f)
            try:
                with c.db.write() as conn:
                    info = journeys.push(conn, ws, data, now=c.clock.now())
                    if publish:
                        info = journeys.publish(conn, ws, info.key, now=c.clock.now())
            except InvalidDefinition as exc:
                console.print(f"[red]{f}[/]: invalid")
                _print_problems(exc)
                raise typer.Exit(1) from None
            console.print(f"{info.key}: {info.status}, versions {[v['version'] for v in info.versions]}")


@journeys_app.command("publish")
def journeys_publish(
    key: str,
    workspace: WorkspaceOpt = None,
    migrate: Annotated[bool, typer.Option(help="Move in-flight people to the new version.")] = False,
) -> None:
    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.write() as conn:
            info = journeys.publish(conn, ws, key, now=c.clock.now(), migrate=migrate)
    console.print(f"{key}: version {info.active_version} published")


def _set_status(key: str, workspace: str | None, status: str) -> None:
    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.write() as conn:
            info = journeys.set_status(conn, ws, key, status, now=c.clock.now())
    console.print(f"{key}: {info.status}")


@journeys_app.command("pause")
def journeys_pause(key: str, workspace: WorkspaceOpt = None) -> None:
    _set_status(key, workspace, "paused")


@journeys_app.command("resume")
def journeys_resume(key: str, workspace: WorkspaceOpt = None) -> None:
    _set_status(key, workspace, "active")


@journeys_app.command("archive")
def journeys_archive(key: str, workspace: WorkspaceOpt = None) -> None:
    _set_status(key, workspace, "archived")


@journeys_app.command("list")
def journeys_list(
    workspace: WorkspaceOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            infos = journeys.list_all(conn, ws)
    if as_json:
        typer.echo(
            json.dumps([{"key": i.key, "status": i.status, "version": i.active_version} for i in infos])
        )
        return
    table = Table("key", "name", "status", "active version", "in flight")
    for i in infos:
        table.add_row(i.key, i.name, i.status, str(i.active_version or "-"), str(i.active_enrollments))
    console.print(table)


@journeys_app.command("show")
def journeys_show(key: str, workspace: WorkspaceOpt = None, version: int | None = None) -> None:
    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            info = journeys.info(conn, ws, key)
            definition = journeys.version_definition(conn, ws, key, version)
            stats = journeys.stats(conn, ws, key)
    console.print(f"[bold]{info.key}[/] ({info.name}): {info.status}, active version {info.active_version}")
    console.print(f"versions: {[v['version'] for v in info.versions]}, in flight: {info.active_enrollments}")
    console.print(f"totals: {stats['totals']}")
    typer.echo(yaml.safe_dump(definition, sort_keys=False, allow_unicode=True))


@journeys_app.command("simulate")
def journeys_simulate(
    file: Path,
    events: Annotated[Path | None, typer.Option("--events", help="JSON Lines of Segment calls.")] = None,
    backtest: Annotated[bool, typer.Option("--backtest", help="Use the workspace's stored events.")] = False,
    workspace: WorkspaceOpt = None,
    until: Annotated[str | None, typer.Option(help="Run the clock to this ISO 8601 time.")] = None,
    limit: Annotated[int, typer.Option(help="Most stored events to read with --backtest.")] = 100_000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What a definition would do with these events, per person, with a virtual clock.
    Nothing is stored or sent."""
    from datetime import datetime

    from whenthen import tracking
    from whenthen.journeys.simulation import SimulationError, backtest_events, simulate

    try:
        d = parse_definition(_load_document(file))
    except InvalidDefinition as exc:
        _print_problems(exc)
        raise typer.Exit(1) from None
    if (events is None) == (not backtest):
        raise DomainError("invalid_arguments", "give --events FILE or --backtest")
    calls: list[dict[str, Any]] = []
    if events is not None:
        for n, line in enumerate(events.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    calls.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DomainError("invalid_events", f"{events}:{n}: {exc}") from None
    else:
        with _container() as c:
            ws = _workspace_id(c, workspace)
            with c.db.read() as conn:
                calls = backtest_events(tracking.workspace_history(conn, ws, limit=limit))
    end = datetime.fromisoformat(until.replace("Z", "+00:00")) if until else None
    try:
        report = simulate(d, calls, until=end)
    except SimulationError as exc:
        raise DomainError("invalid_events", str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(f"[bold]{report['journey']}[/] until {report['until']}: {report['summary']}")
    for person, data in report["people"].items():
        console.print(f"\n[bold]{person}[/] → {', '.join(data['outcome'])}")
        for step in data["timeline"]:
            extra = {k: v for k, v in step.items() if k not in ("at", "kind", "node")}
            node = f" \\[{step['node']}]" if step["node"] else ""
            console.print(f"  {step['at']}  {step['kind']}{node} {escape(str(extra)) if extra else ''}")


# ---- segments --------------------------------------------------------------------------

segments_app = typer.Typer(help="Real-time segments: push, preview, members, export.", no_args_is_help=True)
app.add_typer(segments_app, name="segments")


def _segment_file(path: Path) -> tuple[str, str, Any]:
    doc = _load_document(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or "definition" not in doc:
        raise DomainError("invalid_definition", f"{path}: a segment file has key, name and definition")
    return doc["key"], str(doc.get("name") or doc["key"]), doc["definition"]


@segments_app.command("push")
def segments_push(files: list[Path], workspace: WorkspaceOpt = None) -> None:
    """Create or update segments from YAML/JSON files ({key, name, definition}); each save
    recomputes membership and announces entries and exits."""
    from functools import partial

    from whenthen.pipeline.service import announce, emit
    from whenthen.segments import service as segments

    with _container() as c:
        ws = _workspace_id(c, workspace)
        for f in files:
            key, name, definition = _segment_file(f)
            with c.db.write() as conn:
                seg, counts = segments.save_segment(
                    conn, ws, key, name, definition, c.clock.now(),
                    emit=partial(emit, partitions=c.settings.pipeline.partitions),
                    announce=partial(announce, partitions=c.settings.pipeline.partitions),
                )  # fmt: skip
            console.print(
                f"{seg.key}: version {seg.version}, entered {counts['entered']}, exited {counts['exited']}"
            )


@segments_app.command("preview")
def segments_preview(file: Path, workspace: WorkspaceOpt = None) -> None:
    """How many people a definition selects now, with a sample; nothing is saved."""
    from whenthen.segments import service as segments

    _, _, definition = _segment_file(file)
    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            result = segments.preview(conn, ws, definition, c.clock.now())
    typer.echo(json.dumps(result, indent=2, default=str))


@segments_app.command("list")
def segments_list(workspace: WorkspaceOpt = None) -> None:
    from whenthen.segments import service as segments

    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            rows = [s.info() for s in segments.all_segments(conn, ws)]
    typer.echo(json.dumps(rows, indent=2, default=str))


@segments_app.command("members")
def segments_members(
    key: str, workspace: WorkspaceOpt = None, limit: int = 100, cursor: str | None = None
) -> None:
    from whenthen.segments import service as segments

    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            data, next_cursor = segments.members(conn, ws, key, after=cursor, limit=limit)
    typer.echo(json.dumps({"data": data, "next_cursor": next_cursor}, indent=2, default=str))


@segments_app.command("export")
def segments_export(key: str, workspace: WorkspaceOpt = None) -> None:
    """Members as CSV on standard output."""
    from whenthen.segments import service as segments

    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            typer.echo(segments.export_csv(conn, ws, key), nl=False)


@app.command()
def mailbox(
    workspace: WorkspaceOpt = None,
    limit: Annotated[int, typer.Option(help="How many messages.")] = 20,
    body: Annotated[bool, typer.Option("--body", help="Print the text bodies.")] = False,
) -> None:
    """Email captured because no SMTP server is configured (NOT delivered to anyone)."""
    from whenthen import messaging

    with _container() as c:
        ws = _workspace_id(c, workspace)
        with c.db.read() as conn:
            rows = messaging.mailbox(conn, ws, limit)
    console.print(
        f"[yellow]Local mailbox: {len(rows)} message(s), not delivered (no SMTP server configured)[/]"
    )
    for m in rows:
        console.print(f"\n[bold]{m.subject}[/]\n  to {m.recipient}  at {m.sent_at}  ({m.id})")
        if body and m.body_text:
            console.print(m.body_text)


@app.command("smtp-sink")
def smtp_sink(port: Annotated[int, typer.Option(help="Port to listen on.")] = 1025) -> None:
    """A local SMTP server that prints what it receives (for trying real SMTP delivery)."""
    from whenthen.messaging.smtp_sink import SmtpSink

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with SmtpSink(port=port) as sink:
        console.print(f"SMTP sink on {sink.host}:{sink.port}; set WHENTHEN_EMAIL__SMTP_HOST/PORT to use it")
        seen = 0
        while not stop.wait(0.5):
            for m in sink.messages()[seen:]:
                console.print(f"received: {m.subject} → {', '.join(m.recipients)}")
            seen = len(sink.messages())


def run() -> None:
    try:
        app()
    except DomainError as exc:
        console.print(f"[red]error[/]: {exc.code}: {exc.message}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
