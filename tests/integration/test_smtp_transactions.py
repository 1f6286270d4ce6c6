"""The SMTP transaction the sender writes itself on a session aiosmtplib opened: the
envelope pipelined when the server offers PIPELINING (RFC 2920), one command at a time
when it does not; every refusal where it happens (MAIL, RCPT, DATA, the content), the
session reset after a refused envelope and used again; a server that drops the session
or stops answering. Against a scripted server that records what arrives in each read."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from whenthen.messaging.adapters.smtp import SmtpSender, _as_transmitted
from whenthen.messaging.email import Outgoing
from whenthen.settings import EmailSettings


@dataclass
class Script:
    """What the server answers: by default everything is accepted."""

    pipelining: bool = True
    smtputf8: bool = True
    size: bool = True
    mail: str = "250 sender ok"
    #: RCPT replies by address (others: 250).
    rcpt: dict[str, str] = field(default_factory=dict)
    #: DATA's reply, and whether to say 354 even when no recipient was accepted.
    data: str = "354 go ahead"
    data_without_recipients: bool = False
    #: The reply to the end of the content.
    content: str = "250 queued as X"
    #: Close the connection instead of answering the n-th message's content (1-based).
    drop_at_content: int | None = None
    #: Close the connection after answering this many messages' content.
    close_after: int | None = None
    #: Never answer the content.
    silent_at_content: bool = False


class _Session(asyncio.Protocol):
    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.buffer = b""
        self.in_data = False
        self.data: list[bytes] = []
        self.recipients = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.sessions += 1
        self.server.transports.append(transport)
        transport.write(b"220 scripted ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        s, script = self.server, self.server.script
        assert self.transport is not None
        *lines, self.buffer = (self.buffer + chunk).split(b"\r\n")
        if not self.in_data:
            s.reads.append([line.split(b":")[0].split(b" ")[0].decode() for line in lines])
        replies: list[str] = []
        for line in lines:
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    s.contents += 1
                    s.messages.append(b"".join(x + b"\r\n" for x in self.data))
                    if script.drop_at_content == s.contents:
                        self.transport.close()
                        return
                    if script.silent_at_content:
                        continue
                    replies.append(script.content)
                    if script.close_after == s.contents:
                        self.transport.write("".join(r + "\r\n" for r in replies).encode())
                        self.transport.close()
                        return
                else:
                    self.data.append(line)
                continue
            s.commands.append(line.decode())
            verb = line[:4].upper()
            if verb == b"EHLO":
                offers = ["250-scripted"]
                offers += ["250-PIPELINING"] if script.pipelining else []
                offers += ["250-SMTPUTF8"] if script.smtputf8 else []
                offers += ["250-SIZE 1000000"] if script.size else []
                replies.append("\r\n".join([*offers, "250 HELP"]))
            elif verb == b"MAIL":
                replies.append(script.mail)
                self.recipients = 0
            elif verb == b"RCPT":
                address = line.decode().split("<", 1)[1].split(">", 1)[0]
                answer = script.rcpt.get(address, "250 ok")
                self.recipients += answer.startswith("2")
                replies.append(answer)
            elif verb == b"DATA":
                if (self.recipients and script.mail.startswith("2")) or script.data_without_recipients:
                    replies.append(script.data)
                    if script.data.startswith("354"):
                        self.in_data, self.data = True, []
                else:
                    replies.append("554 no valid recipients")
            elif verb in (b"RSET", b"NOOP"):
                self.recipients = 0
                replies.append("250 ok")
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
                return
            else:
                replies.append("502 not implemented")
        if replies:
            self.transport.write("".join(r + "\r\n" for r in replies).encode())


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.commands: list[str] = []
        #: The commands that arrived in each read outside content.
        self.reads: list[list[str]] = []
        self.messages: list[bytes] = []
        self.contents = 0
        self.sessions = 0
        self.transports: list[asyncio.Transport] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(lambda: _Session(self), "127.0.0.1", 0), self.loop
        ).result(5)
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            for transport in self.transports:
                transport.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def sender(self, **settings: object) -> SmtpSender:
        values: dict[str, object] = {"smtp_host": "127.0.0.1", "smtp_port": self.port, **settings}
        return SmtpSender(EmailSettings.model_validate(values), connections=1)


def outgoing(recipients: tuple[str, ...] = ("ann@example.com",), body: bytes = b"hello\r\n") -> Outgoing:
    head = b"From: shop@example.com\r\nTo: " + ", ".join(recipients).encode() + b"\r\nSubject: hi\r\n\r\n"
    return Outgoing("shop@example.com", recipients, head + body, False)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    script = getattr(request, "param", Script())
    with ScriptedServer(script) as s:
        yield s


def send(server: ScriptedServer, *items: Outgoing, **settings: object) -> list[str]:
    sender = server.sender(**settings)
    try:
        return [f"{d.accepted}|{d.permanent}|{d.detail}" for d in sender.send_outgoing(list(items))]
    finally:
        sender.close()


def test_with_pipelining_the_envelope_goes_in_one_write() -> None:
    with ScriptedServer(Script()) as server:
        assert send(server, outgoing(("ann@example.com", "bob@example.com")), outgoing()) == [
            "True|False|queued as X",
            "True|False|queued as X",
        ]
    envelopes = [r for r in server.reads if r and r[0] == "MAIL"]
    assert envelopes == [["MAIL", "RCPT", "RCPT", "DATA"], ["MAIL", "RCPT", "DATA"]]
    assert server.commands[-1] == "QUIT"
    assert server.commands[1].startswith("MAIL FROM:<shop@example.com> SIZE=")


def test_without_pipelining_one_command_a_read() -> None:
    with ScriptedServer(Script(pipelining=False, size=False)) as server:
        assert send(server, outgoing(("ann@example.com", "bob@example.com"))) == ["True|False|queued as X"]
    assert [r for r in server.reads if r and r[0] in ("MAIL", "RCPT", "DATA")] == [
        ["MAIL"],
        ["RCPT"],
        ["RCPT"],
        ["DATA"],
    ]
    assert server.commands[1] == "MAIL FROM:<shop@example.com>"  # no SIZE offered, none sent


@pytest.mark.parametrize("pipelining", [True, False])
def test_refusals_where_they_happen_and_the_session_goes_on(pipelining: bool) -> None:
    cases: list[tuple[Script, str]] = [
        (Script(mail="550 sender blocked"), "False|True|550 sender blocked"),
        (Script(mail="451 try later"), "False|False|451 try later"),
        (
            Script(rcpt={"ann@example.com": "550 no such user"}),
            "False|True|recipient refused: 550 no such user",
        ),
        (
            Script(rcpt={"ann@example.com": "450 mailbox busy"}),
            "False|False|recipient refused: 450 mailbox busy",
        ),
        (Script(data="554 not now"), "False|True|554 not now"),
        (Script(content="552 too big"), "False|True|552 too big"),
        (Script(content="451 local error"), "False|False|451 local error"),
    ]
    for script, expected in cases:
        script.pipelining = pipelining
        with ScriptedServer(script) as server:
            sender = server.sender()
            try:
                [first] = sender.send_outgoing([outgoing()])
                assert f"{first.accepted}|{first.permanent}|{first.detail}" == expected
                # The same session takes the next message, the envelope reset first.
                script.mail, script.rcpt, script.data, script.content = "250 ok", {}, "354 go", "250 fine"
                [second] = sender.send_outgoing([outgoing()])
                assert second.accepted, (expected, second)
            finally:
                sender.close()
        assert server.sessions == 1, expected
        mail_accepted = not expected.startswith("False|True|550 sender") and "451 try" not in expected
        envelope_refused = "recipient" in expected or "554" in expected
        assert ("RSET" in server.commands) == (mail_accepted and envelope_refused), (
            expected,
            server.commands,
        )
        assert len(server.messages) == 1 + ("552" in expected or "451 local" in expected)


def test_one_recipient_refused_of_two_is_reported_and_the_other_gets_it() -> None:
    with ScriptedServer(Script(rcpt={"bob@example.com": "550 unknown"})) as server:
        [result] = send(server, outgoing(("ann@example.com", "bob@example.com")))
    assert result.startswith("False|True|refused: {'bob@example.com'")
    assert len(server.messages) == 1


def test_a_server_that_starts_content_without_recipients_gets_an_empty_end_and_a_reset() -> None:
    script = Script(rcpt={"ann@example.com": "550 unknown"}, data_without_recipients=True)
    with ScriptedServer(script) as server:
        sender = server.sender()
        try:
            [first] = sender.send_outgoing([outgoing()])
            script.rcpt = {}
            [second] = sender.send_outgoing([outgoing()])
        finally:
            sender.close()
    assert (first.accepted, first.permanent, first.detail) == (False, True, "recipient refused: 550 unknown")
    assert second.accepted
    assert server.messages[0] == b""  # the empty end, never the content
    assert server.commands.count("RSET") == 1


def test_content_is_sent_with_crlf_and_dots_doubled_and_arrives_as_written() -> None:
    body = b"line one\n.\n..two\r\n.three\rfour"
    with ScriptedServer(Script()) as server:
        assert send(server, outgoing(body=body))[0].startswith("True")
    # The scripted server stores the lines between DATA and "." as they came.
    assert server.messages[0].endswith(b"\r\n..\r\n...two\r\n..three\r\nfour\r\n")
    assert _as_transmitted(b".x") == b"..x\r\n"
    assert _as_transmitted(b"a\r\n") == b"a\r\n"


def test_a_dropped_session_is_reopened_for_a_message_it_had_nothing_of() -> None:
    with ScriptedServer(Script(close_after=1)) as server:
        sender = server.sender()
        try:
            assert sender.send_outgoing([outgoing()])[0].accepted
            # The server closed the idle session; the next message goes over a new one.
            assert sender.send_outgoing([outgoing()])[0].accepted
        finally:
            sender.close()
    assert server.sessions == 2
    assert len(server.messages) == 2


def test_a_session_dropped_after_the_content_is_not_sent_again_at_once() -> None:
    with ScriptedServer(Script(drop_at_content=2)) as server:
        sender = server.sender()
        try:
            assert sender.send_outgoing([outgoing()])[0].accepted
            [lost] = sender.send_outgoing([outgoing()])
            # The server may have it: a temporary failure (the dispatcher retries later).
            assert (lost.accepted, lost.permanent) == (False, False)
            assert "SmtpDropped" in lost.detail
            assert sender.send_outgoing([outgoing()])[0].accepted
        finally:
            sender.close()
    assert server.sessions == 2
    assert len(server.messages) == 3


def test_a_server_that_stops_answering_times_out_as_a_temporary_failure() -> None:
    with ScriptedServer(Script(silent_at_content=True)) as server:
        [result] = send(server, outgoing(), smtp_timeout_seconds=0.3)
    assert result.startswith("False|False|TimeoutError")


def test_non_ascii_addresses_need_smtputf8() -> None:
    item = Outgoing("shop@example.com", ("zoë@example.com",), b"Subject: x\r\n\r\nx\r\n", True)
    with ScriptedServer(Script(smtputf8=False)) as server:
        assert send(server, item) == [
            "False|True|not supported by the server: SMTPUTF8 (a non-ASCII address)"
        ]
        assert not [c for c in server.commands if c.startswith("MAIL")]
    with ScriptedServer(Script()) as server:
        assert send(server, item)[0].startswith("True")
    assert server.commands[1].endswith(" SMTPUTF8")
    assert "RCPT TO:<zoë@example.com>" in server.commands


def test_an_address_that_would_inject_a_command_is_refused_before_anything_is_sent() -> None:
    with ScriptedServer(Script()) as server:
        bad = outgoing(("ann@example.com>\r\nRCPT TO:<eve@example.com",))
        result, after = send(server, bad, outgoing())
    assert result.startswith("False|True|cannot send: address")
    assert after.startswith("True")
    assert not any("eve@" in c for c in server.commands)
    assert len(server.messages) == 1
