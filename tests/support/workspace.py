"""Creating workspaces with keys for tests."""

from __future__ import annotations

from dataclasses import dataclass

from whenthen import workspaces
from whenthen.bootstrap import Container
from whenthen.workspaces import KeyKind


@dataclass(frozen=True)
class TestWorkspace:
    __test__ = False
    id: str
    write_key: str
    admin_key: str

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    @property
    def write_auth(self) -> tuple[str, str]:
        return (self.write_key, "")


def make_workspace(c: Container, name: str = "Acme") -> TestWorkspace:
    now = c.clock.now()
    with c.db.write() as conn:
        ws = workspaces.create_workspace(conn, name, now=now)
        wk = workspaces.issue_key(conn, ws.id, KeyKind.WRITE, name="w", now=now)
        ak = workspaces.issue_key(conn, ws.id, KeyKind.ADMIN, name="a", now=now)
    return TestWorkspace(id=ws.id, write_key=wk.plaintext, admin_key=ak.plaintext)
