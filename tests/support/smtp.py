"""A tiny SMTP server on 127.0.0.1 for tests: enough of RFC 5321 for smtplib (EHLO, AUTH, MAIL, RCPT, DATA).

It records each accepted message (envelope and parsed email) and can refuse a login, so the
alert channels' SMTP delivery is tested against a real socket and the real ``smtplib``.
"""

from __future__ import annotations

import base64
import email
import email.policy
import socketserver
import threading
from dataclasses import dataclass, field
from email.message import Message


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_to: list[str]
    message: Message
    login: str | None


@dataclass
class _State:
    messages: list[Received] = field(default_factory=list)
    password: str | None = None  # when set, AUTH must use it


class _Handler(socketserver.StreamRequestHandler):
    server: SmtpServer

    def _say(self, line: str) -> None:
        self.wfile.write((line + "\r\n").encode())

    def handle(self) -> None:
        self._say("220 localhost test SMTP ready")
        mail_from, rcpt, login = "", [], None
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()
            if verb in ("EHLO", "HELO"):
                self.wfile.write(b"250-localhost\r\n250 AUTH PLAIN LOGIN\r\n" if verb == "EHLO" else b"250 localhost\r\n")
            elif verb == "AUTH":
                parts = arg.split()
                if parts[0].upper() == "PLAIN":
                    token = parts[1] if len(parts) > 1 else ""
                    if not token:
                        self._say("334 ")
                        token = self.rfile.readline().decode().strip()
                    _, user, pw = base64.b64decode(token).decode().split("\x00")
                else:  # LOGIN
                    if len(parts) > 1:
                        user = base64.b64decode(parts[1]).decode()
                    else:
                        self._say("334 VXNlcm5hbWU6")
                        user = base64.b64decode(self.rfile.readline().strip()).decode()
                    self._say("334 UGFzc3dvcmQ6")
                    pw = base64.b64decode(self.rfile.readline().strip()).decode()
                if self.server.state.password is not None and pw != self.server.state.password:
                    self._say("535 5.7.8 authentication failed")
                else:
                    login = user
                    self._say("235 2.7.0 authenticated")
            elif verb == "MAIL":
                mail_from, rcpt = arg.split(":", 1)[1].strip().strip("<>"), []
                self._say("250 ok")
            elif verb == "RCPT":
                rcpt.append(arg.split(":", 1)[1].strip().strip("<>"))
                self._say("250 ok")
            elif verb == "DATA":
                self._say("354 end with .")
                lines = []
                while (data := self.rfile.readline()) not in (b".\r\n", b".\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                self.server.state.messages.append(Received(mail_from, rcpt, email.message_from_bytes(b"".join(lines), policy=email.policy.default), login))
                self._say("250 queued")
            elif verb == "RSET" or verb == "NOOP":
                self._say("250 ok")
            elif verb == "QUIT":
                self._say("221 bye")
                return
            else:
                self._say("502 not implemented")


class SmtpServer(socketserver.ThreadingTCPServer):
    """``with SmtpServer() as s: ... s.port, s.messages``; set ``password`` to check logins."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, password: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = _State(password=password)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def messages(self) -> list[Received]:
        return self.state.messages

    def __enter__(self) -> SmtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
