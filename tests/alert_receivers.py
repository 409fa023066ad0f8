"""Local stand-ins for Slack, a webhook endpoint and an SMTP server, on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class HttpReceiver:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    def bodies(self) -> list[Any]:
        return [r["json"] for r in self.requests]


@contextmanager
def http_receiver(status: int = 200) -> Iterator[HttpReceiver]:
    """Records every POST (path, headers, JSON body) and answers ``status`` (200 like Slack)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(
                {"path": self.path, "headers": dict(self.headers), "raw": raw.decode(),
                 "json": json.loads(raw or b"null")}
            )  # fmt: skip
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpReceiver(f"http://127.0.0.1:{server.server_address[1]}", received)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class SmtpReceiver:
    port: int
    messages: list[Any] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def smtp_receiver() -> Iterator[SmtpReceiver]:
    """aiosmtpd on loopback, keeping every message it receives and every login it accepts
    (plain-text AUTH allowed: there is no TLS on loopback)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    box = SmtpReceiver(0)

    def authenticate(server, session, envelope, mechanism, auth_data):
        box.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=True)

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
            box.messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))  # aiosmtpd cannot start on port 0: pick a free one
    box.port = probe.getsockname()[1]
    probe.close()
    controller = Controller(
        Handler(), hostname="127.0.0.1", port=box.port, authenticator=authenticate,
        auth_require_tls=False,
    )  # fmt: skip
    controller.start()
    try:
        yield box
    finally:
        controller.stop()
