"""``shopfleet agent enroll``: get this node's broker certificate from the controller with a one-time token.

The key is made here, on the node, and never leaves it: the controller receives a certificate
signing request (CSR) and the token an admin made for this shop and node, and answers with the
certificate (CN ``<shop>.<node>``, which is the node's MQTT username on the broker's TLS
listener), the fleet CA certificate and, if it knows it, the broker's address. The controller is
reached over HTTPS only and its certificate is checked against ``--ca-file`` (the fleet CA,
handed over with the token); plain ``http://`` is refused unless ``--allow-http`` (tests).

Files written into ``--out`` (created 0700): ``node.key`` (0600), ``node.crt`` and ``ca.crt``
(0644), each atomically and only after the controller answered: a failed enrollment leaves the
files of an earlier one as they were, so re-enrolling (rotation) is safe. Nothing here needs
more than the agent role's dependencies (``cryptography`` and the standard library).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shopfleet.errors import PermanentError, TemporaryError
from shopfleet.files import write_atomic

ENROLL_PATH = "/api/v1/enroll"
TIMEOUT_S = 30.0
KEY_FILE, CERT_FILE, CA_FILE = "node.key", "node.crt", "ca.crt"


class EnrollError(PermanentError):
    """Enrollment refused or impossible as asked; the message says what to do."""

    default_reason = "enroll"


class EnrollUnreachable(TemporaryError):
    """The controller could not be reached; retrying later may work."""

    default_reason = "enroll_unreachable"


@dataclass(frozen=True)
class EnrollResult:
    """What enrollment wrote and learnt."""

    shop: str
    node: str
    cn: str
    serial: str
    not_after: str
    key_file: Path
    cert_file: Path
    ca_file: Path
    broker_host: str | None
    broker_port: int | None

    def config_yaml(self) -> str:
        """Return the agent config keys to set (docs/agent.md) as YAML."""
        lines = [f"shop: {self.shop}", f"node: {self.node}", "broker:"]
        if self.broker_host:
            lines += [f"  host: {self.broker_host}", f"  port: {self.broker_port}"]
        lines += ["  tls:", f"    ca_file: {self.ca_file}", f"    cert_file: {self.cert_file}", f"    key_file: {self.key_file}"]
        return "\n".join(lines) + "\n"


def make_key_and_csr() -> tuple[bytes, bytes]:
    """Return (private key PEM, CSR PEM): an ECDSA P-256 key and a CSR signed with it.

    The CSR's subject is a placeholder: the controller takes the CN from the token.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shopfleet-node")]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _check_answer(answer: dict[str, Any], key_pem: bytes) -> None:
    """Refuse an answer whose certificate is not for our key or not signed by the CA it came with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        ca = x509.load_pem_x509_certificate(str(answer["ca_certificate"]).encode())
    except (KeyError, ValueError) as exc:
        raise EnrollError(f"the controller's answer holds no valid certificate ({exc}); is --controller a shopfleet controller?") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise EnrollError("the certificate the controller sent is not for this node's key; nothing was written")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise EnrollError(f"the certificate is not signed by the CA sent with it ({exc}); nothing was written") from None


def enroll(controller: str, token: str, ca_file: Path | None, out: Path, *, allow_http: bool = False,
           timeout: float = TIMEOUT_S) -> EnrollResult:
    """Enroll this node and write its key, certificate and the CA into ``out``; return what was written.

    Raise :class:`EnrollError` (refused: bad token, bad address...) or
    :class:`EnrollUnreachable` (network; retry later).
    """
    base = controller.rstrip("/")
    if base.startswith("http://"):
        if not allow_http:
            raise EnrollError(f"--controller {controller}: use the controller's https:// address; the token and the "
                              "certificate must not cross the network in clear (--allow-http is for tests only)")
        context = None
    elif base.startswith("https://"):
        if ca_file is None:
            raise EnrollError("--ca-file is required with https: the fleet CA certificate (ca.crt) that signed the controller's certificate")
        try:
            context = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise EnrollError(f"--ca-file {ca_file}: cannot load a CA certificate from it ({exc})") from None
    else:
        raise EnrollError(f"--controller {controller!r}: give the controller's URL, e.g. https://controller.example.com:8443")
    token = token.strip()
    if not token:
        raise EnrollError("the enrollment token is empty: pass the token an admin made ('shopfleet enroll-token create')")

    key_pem, csr_pem = make_key_and_csr()
    body = json.dumps({"token": token, "csr": csr_pem.decode()}).encode()
    req = urllib.request.Request(base + ENROLL_PATH, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        if exc.code in (429, 502, 503, 504):
            raise EnrollUnreachable(f"controller answered {exc.code}: {detail or exc.reason}; retry later") from None
        raise EnrollError(f"enrollment refused ({exc.code}): {detail or exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise EnrollError(f"the controller's certificate does not verify against {ca_file}: {exc.reason.verify_message}; "
                              "use the fleet CA the admin gave you, and the host name the certificate names") from None
        raise EnrollUnreachable(f"cannot reach {base}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise EnrollUnreachable(f"enrollment at {base} failed: {exc}") from None
    _check_answer(answer, key_pem)

    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    key_file, cert_file, ca_out = out / KEY_FILE, out / CERT_FILE, out / CA_FILE
    write_atomic(key_file, key_pem, 0o600)
    write_atomic(cert_file, str(answer["certificate"]).encode(), 0o644)
    write_atomic(ca_out, str(answer["ca_certificate"]).encode(), 0o644)
    broker = answer.get("broker") or {}
    return EnrollResult(str(answer["shop"]), str(answer["node"]), str(answer["cn"]), str(answer["serial"]),
                        str(answer["not_after"]), key_file.resolve(), cert_file.resolve(), ca_out.resolve(),
                        broker.get("host"), broker.get("port"))


def _read_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            if str(args.token_file) == "-":
                return sys.stdin.readline().strip()
            return Path(args.token_file).read_text().strip().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise EnrollError(f"--token-file {args.token_file}: cannot read a token from it ({exc})") from None
    token = args.token or os.environ.get("SHOPFLEET_ENROLL_TOKEN", "")
    if not token:
        raise EnrollError("give the token: --token-file FILE (or - for stdin), SHOPFLEET_ENROLL_TOKEN, or --token")
    return str(token)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``enroll`` to the ``agent`` command's subcommands."""
    p = sub.add_parser(
        "enroll",
        help="get this node's broker certificate from the controller with a one-time token",
        description=(
            "Enroll this node: make its private key here (it never leaves the node), send a certificate "
            "signing request with the one-time token an admin made ('shopfleet enroll-token create') to the "
            "controller over HTTPS, and write node.key (0600), node.crt and ca.crt into --out. Then set the "
            "printed keys in the agent's config and (re)start the agent. Run it again with a new token to "
            "rotate: the files are replaced only once the controller answered. Exit codes: 0 enrolled, 2 refused "
            "(bad token, bad address; the message says why), 1 controller unreachable (retry later)."
        ),
        epilog="See docs/agent.md (Enrollment) and docs/security.md.",
    )
    p.add_argument("--controller", required=True, metavar="URL", help="the controller's https:// address, e.g. https://controller:8443")
    p.add_argument("--token-file", metavar="FILE", help="file whose first line is the token ('-': read it from stdin)")
    p.add_argument("--token", help="the token itself (visible in the process list: prefer --token-file or SHOPFLEET_ENROLL_TOKEN)")
    p.add_argument("--ca-file", type=Path, metavar="FILE", help="fleet CA certificate to verify the controller's HTTPS certificate with")
    p.add_argument("--out", type=Path, default=Path("/etc/shopfleet/tls"), metavar="DIR",
                   help="directory for node.key, node.crt and ca.crt (default: %(default)s)")
    p.add_argument("--allow-http", action="store_true", help="allow a plain http:// controller (tests and development only)")
    p.set_defaults(func=run_enroll)


def run_enroll(args: argparse.Namespace) -> int:
    """Handle ``shopfleet agent enroll``."""
    try:
        result = enroll(args.controller, _read_token(args), args.ca_file, args.out, allow_http=args.allow_http)
    except EnrollUnreachable as exc:
        print(f"shopfleet agent enroll: {exc}", file=sys.stderr)
        return 1
    except EnrollError as exc:
        print(f"shopfleet agent enroll: {exc}", file=sys.stderr)
        return 2
    print(f"enrolled as {result.cn} (certificate {result.serial}, valid until {result.not_after}); wrote "
          f"{result.key_file} (0600), {result.cert_file}, {result.ca_file}")
    print("set these keys in the agent's config file (docs/agent.md), then restart the agent:\n")
    print(result.config_yaml(), end="")
    if not result.broker_host:
        print("  # and broker.host/broker.port: the broker's TLS listener (usually port 8883)")
    return 0
