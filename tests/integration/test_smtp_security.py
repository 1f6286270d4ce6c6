"""SMTP with STARTTLS, implicit TLS and AUTH, against a local server with its own CA."""

from __future__ import annotations

import ssl
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from whenthen.messaging.adapters.smtp import SmtpSender
from whenthen.messaging.smtp_sink import SmtpSink
from whenthen.settings import EmailSettings


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for localhost, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


def message() -> EmailMessage:
    m = EmailMessage()
    m["From"] = "shop@example.com"
    m["To"] = "ann@example.com"
    m["Subject"] = "Secure hello"
    m.set_content("over TLS")
    return m


def sender(sink: SmtpSink, ca: Path, **overrides: object) -> SmtpSender:
    values: dict[str, object] = {
        "smtp_host": "localhost",
        "smtp_port": sink.port,
        "smtp_security": "starttls",
        "smtp_username": "mailer",
        "smtp_password": "s3cret",
        "smtp_ca_file": str(ca),
        **overrides,
    }
    return SmtpSender(EmailSettings.model_validate(values))


def test_starttls_with_auth_delivers(certificate: tuple[Path, ssl.SSLContext]) -> None:
    ca, context = certificate
    with SmtpSink("localhost", starttls=context, credentials=("mailer", "s3cret")) as sink:
        s = sender(sink, ca)
        try:
            delivery = s.send(message())
        finally:
            s.close()
        assert delivery.accepted, delivery.detail
        [got] = sink.messages()
        assert got.subject == "Secure hello"


def test_wrong_password_is_a_permanent_failure(certificate: tuple[Path, ssl.SSLContext]) -> None:
    ca, context = certificate
    with SmtpSink("localhost", starttls=context, credentials=("mailer", "s3cret")) as sink:
        s = sender(sink, ca, smtp_password="wrong")
        try:
            delivery = s.send(message())
        finally:
            s.close()
        assert not delivery.accepted
        assert delivery.permanent
        assert delivery.detail.startswith("535")
        assert sink.messages() == []


def test_an_untrusted_certificate_is_refused(certificate: tuple[Path, ssl.SSLContext]) -> None:
    _, context = certificate
    with SmtpSink("localhost", starttls=context, credentials=("mailer", "s3cret")) as sink:
        s = sender(sink, Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"))
        try:
            delivery = s.send(message())
        finally:
            s.close()
        assert not delivery.accepted
        assert "certificate" in delivery.detail.lower()
        assert sink.messages() == []


def test_implicit_tls(certificate: tuple[Path, ssl.SSLContext]) -> None:
    ca, context = certificate
    with SmtpSink("localhost", implicit_tls=context, credentials=("mailer", "s3cret")) as sink:
        s = sender(sink, ca, smtp_security="tls")
        try:
            delivery = s.send(message())
        finally:
            s.close()
        assert delivery.accepted, delivery.detail
        assert len(sink.messages()) == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_many_messages_and_a_large_one_over_one_tls_session(
    certificate: tuple[Path, ssl.SSLContext], pipelining: bool
) -> None:
    """After STARTTLS and AUTH the session's TLS transport carries this module's own
    transactions (pipelined or not): several messages in turn, one of 3 MB (larger than
    the transport's write buffer, so writing it waits for the socket)."""
    ca, context = certificate
    big = "x" * 76 + "\n"
    with SmtpSink(
        "localhost", starttls=context, credentials=("mailer", "s3cret"), pipelining=pipelining
    ) as sink:
        s = sender(sink, ca)
        try:
            batch = [message() for _ in range(5)]
            batch[2].set_content(big * 40_000)  # ~3 MB
            deliveries = s.send_many(batch)
            again = s.send(message())
        finally:
            s.close()
        assert all(d.accepted for d in deliveries), deliveries
        assert again.accepted, again.detail
        got = sink.messages()
        assert len(got) == 6
        assert big * 40_000 in [m.body().replace("\r\n", "\n") for m in got]
