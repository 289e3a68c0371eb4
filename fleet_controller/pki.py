"""The fleet's certificate authority: a CA, per-identity certificates, rotation and a CRL.

Mutual TLS replaces shared passwords on the broker: the broker's TLS listener requires a client
certificate signed by this CA and takes the certificate's Common Name as the MQTT username
(Mosquitto's ``use_identity_as_username``), so the CN must be exactly the username the ACL
names. The kinds of certificate and their CNs:

==============  ==========================  =============================================
kind            name given                  CN (= MQTT username)
==============  ==========================  =============================================
``node``        ``shop/node``               ``<shop>.<node>`` (as ``broker-config`` names it)
``controller``  a controller username       the same (one per controller replica)
``bridge``      a shop id                   ``<shop>._bridge`` (the shop broker's bridge)
``server``      a host name or address      the same, also as subjectAltName (+ ``--san``)
==============  ==========================  =============================================

``_bridge`` cannot be a node id (ids start with a letter or digit), so a bridge CN never
collides with a node's; controller usernames contain no ``.``, so they collide with neither.

Keys are ECDSA P-256: every OpenSSL that Mosquitto and Python's ``ssl`` link against accepts
it, unlike Ed25519 in TLS client authentication on older builds. Private keys are written 0600
(the CA key under ``private/``, 0700); certificates, the CA certificate and the CRL are public.

Layout of the PKI directory::

    ca.crt              the CA certificate (give it to every broker and client)
    crl.pem             the revocation list (the broker's ``crlfile``)
    index.json          every certificate issued: serial, kind, CN, expiry, revocation
    private/ca.key      the CA key (0600; never leaves this machine)
    certs/<CN>.crt      the current certificate of each identity
    certs/<CN>.key      its key (0600)

**Rotation** is re-issuing: a new key and certificate replace the files of that CN; the old
serial stays valid until it expires or is revoked (``revoke_previous=True`` revokes it at once,
for a suspected compromise; otherwise revoke it once the new files are deployed). **Revocation**
rewrites ``crl.pem``; Mosquitto reads its ``crlfile`` when it starts and when it reloads
(SIGHUP), so a revocation refuses new handshakes after a reload and, after a restart, also ends
the connection the revoked client had open.

**Enrollment** (:meth:`Pki.sign_csr`, used by the controller's ``POST /api/v1/enroll``): the node
makes its own key and sends a certificate signing request; only the certificate is written here
(``certs/<CN>.crt``; no ``.key``, the key never left the node) and its record says
``key_on_node``, so ``broker-config`` (:meth:`Pki.ensure`) does not mint a second key for that
node. The CSR gives the public key only: the CN, the extensions and the validity are ours. Index
changes take a lock (``index.json.lock``), since the controller signs from several threads. A CRL also expires (its nextUpdate, ``crl_days`` ahead, one
year by default): OpenSSL then refuses every client, so refresh it (``shopfleet pki crl``)
before then; ``shopfleet pki list`` prints its expiry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.protocol import validate_id
from shopfleet.errors import PermanentError
from shopfleet.files import write_atomic

KINDS = ("node", "controller", "bridge", "server")
BRIDGE_SUFFIX = "._bridge"
CA_DAYS = 3650
CERT_DAYS = 825
CRL_DAYS = 365
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PkiError(PermanentError):
    """A PKI operation that cannot be done as asked; the message says what to fix."""

    default_reason = "pki"


@dataclass(frozen=True)
class CertRecord:
    """One issued certificate, as ``index.json`` keeps it."""

    serial: str  # hex
    kind: str
    cn: str
    not_after: str  # ISO 8601, UTC
    issued_at: str
    revoked_at: str | None = None
    key_on_node: bool = False  # signed from a node's CSR (enrollment): no key file here

    @property
    def revoked(self) -> bool:
        """Return whether this certificate is on the CRL."""
        return self.revoked_at is not None

    def expired(self, now: dt.datetime | None = None) -> bool:
        """Return whether the certificate is past its notAfter."""
        return dt.datetime.fromisoformat(self.not_after) <= (now or _now())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def node_cn(shop: str, node: str) -> str:
    """Return the CN (= MQTT username) of a node: ``<shop>.<node>``."""
    return f"{validate_id(shop, 'shop id')}.{validate_id(node, 'node id')}"


def bridge_cn(shop: str) -> str:
    """Return the CN (= MQTT username at the central broker) of a shop broker's bridge."""
    return f"{validate_id(shop, 'shop id')}{BRIDGE_SUFFIX}"


def cn_for(kind: str, name: str) -> str:
    """Return the CN for ``kind`` and the name given on the command line; raise ``PkiError`` if invalid."""
    try:
        if kind == "node":
            shop, sep, node = name.partition("/")
            if not sep:
                raise PkiError(f"node name {name!r} is not 'shop/node' (e.g. shop-a/pi-1)")
            return node_cn(shop, node)
        if kind == "bridge":
            return bridge_cn(name)
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    if kind == "controller":
        if "." in name or not _NAME_RE.match(name):
            raise PkiError(f"controller name {name!r}: use letters, digits, '-' or '_' and no '.' (node usernames have one)")
        return name
    if kind == "server":
        if not _NAME_RE.match(name):
            raise PkiError(f"server name {name!r} is not a host name or IP address")
        return name
    raise PkiError(f"unknown certificate kind {kind!r}: use one of {', '.join(KINDS)}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _sans(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


class Pki:
    """A fleet CA in a directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.ca_cert_path = self.root / "ca.crt"
        self.ca_key_path = self.root / "private" / "ca.key"
        self.crl_path = self.root / "crl.pem"
        self.index_path = self.root / "index.json"
        self.certs_dir = self.root / "certs"

    # ----- creation -----------------------------------------------------------------------

    @classmethod
    def init(cls, root: str | os.PathLike[str], *, ca_name: str = "shopfleet fleet CA", days: int = CA_DAYS, crl_days: int = CRL_DAYS) -> Pki:
        """Create a new CA in ``root`` (refused when one is there: a new CA would orphan every certificate)."""
        pki = cls(root)
        if pki.ca_key_path.exists() or pki.ca_cert_path.exists():
            raise PkiError(f"{pki.root} already holds a CA ({pki.ca_cert_path}); use another --dir, or delete it to start over (every certificate it issued stops working)")
        pki.root.mkdir(parents=True, exist_ok=True)
        os.chmod(pki.root, 0o755)  # the broker (user mosquitto) reads ca.crt and crl.pem here
        (pki.root / "private").mkdir(mode=0o700, exist_ok=True)
        os.chmod(pki.root / "private", 0o700)
        pki.certs_dir.mkdir(mode=0o755, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                              key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_atomic(pki.ca_key_path, _key_pem(key), 0o600)
        write_atomic(pki.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        pki._save_index([])
        pki.write_crl(crl_days)
        return pki

    def _require(self) -> None:
        if not (self.ca_key_path.exists() and self.ca_cert_path.exists()):
            raise PkiError(f"no CA in {self.root}: run 'shopfleet pki init --dir {self.root}' first")

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self._require()
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot load the CA from {self.root}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path} is not an EC key this module wrote")
        return cert, key

    # ----- index ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the PKI's lock (an exclusive ``flock`` on ``index.json.lock``) for a read-modify-write of the index."""
        self._require()
        fd = os.open(self.root / "index.json.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def records(self) -> list[CertRecord]:
        """Return every certificate issued, oldest first."""
        self._require()
        try:
            return [CertRecord(**r) for r in json.loads(self.index_path.read_text())["certificates"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{self.index_path} is unreadable ({exc}); restore it from a backup") from None

    def _save_index(self, records: Sequence[CertRecord]) -> None:
        data = {"certificates": [asdict(r) for r in records]}
        write_atomic(self.index_path, (json.dumps(data, indent=2) + "\n").encode(), 0o600)

    def current(self, cn: str) -> CertRecord | None:
        """Return the newest unrevoked, unexpired certificate of ``cn``, if any."""
        live = [r for r in self.records() if r.cn == cn and not r.revoked and not r.expired()]
        return live[-1] if live else None

    def cert_path(self, cn: str) -> Path:
        """Return where the current certificate of ``cn`` is."""
        return self.certs_dir / f"{cn}.crt"

    def key_path(self, cn: str) -> Path:
        """Return where the current key of ``cn`` is."""
        return self.certs_dir / f"{cn}.key"

    # ----- issuing --------------------------------------------------------------------------

    def issue(self, kind: str, name: str, *, sans: Sequence[str] = (), days: int = CERT_DAYS, revoke_previous: bool = False) -> CertRecord:
        """Issue (or re-issue: rotate) a key and certificate for ``kind``/``name``; return its record."""
        with self.locked():
            return self._issue_locked(kind, name, sans, days, revoke_previous)

    def _issue_locked(self, kind: str, name: str, sans: Sequence[str], days: int, revoke_previous: bool) -> CertRecord:
        records = self.records()
        record = self._issue(kind, name, sans, days, records)
        if revoke_previous:
            stamp = record.issued_at
            records = [
                CertRecord(**{**asdict(r), "revoked_at": stamp}) if r.cn == record.cn and r is not record and not r.revoked else r
                for r in records
            ]
        self._save_index(records)
        if revoke_previous:
            self.write_crl()
        return record

    def _issue(self, kind: str, name: str, sans: Sequence[str], days: int, records: list[CertRecord]) -> CertRecord:
        """Write a new key and certificate and append its record to ``records`` (the caller saves the index)."""
        cn = cn_for(kind, name)
        ca_cert, ca_key = self._ca()
        if days < 1:
            raise PkiError(f"--days {days}: a certificate must be valid for at least 1 day")
        if kind != "server" and sans:
            raise PkiError("--san is for server certificates only (clients are identified by their CN)")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if kind == "server" else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                              key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if kind == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(_sans([cn, *sans])), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        record = CertRecord(serial=f"{cert.serial_number:x}", kind=kind, cn=cn, not_after=not_after.isoformat(), issued_at=now.isoformat())
        # Key first, then certificate: a reader that sees the new certificate also finds its key.
        write_atomic(self.key_path(cn), _key_pem(key), 0o600)
        write_atomic(self.cert_path(cn), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        records.append(record)
        return record

    def ensure(self, wanted: Sequence[tuple[str, str, Sequence[str]]]) -> list[CertRecord]:
        """Issue a certificate for each ``(kind, name, sans)`` that has no current one; return the new records.

        Never rotates a valid certificate (``broker-config`` calls this on every run); a server
        certificate that lacks one of ``sans`` is re-issued, since clients would refuse it. An
        identity whose certificates were all revoked raises ``PkiError``: a routine re-run must not
        undo a revocation. A node
        that enrolled (its key on the node, ``key_on_node``) counts as having one.
        """
        with self.locked():
            return self._ensure_locked(wanted)

    def _ensure_locked(self, wanted: Sequence[tuple[str, str, Sequence[str]]]) -> list[CertRecord]:
        records = self.records()
        live = {r.cn: r for r in records if not r.revoked and not r.expired()}
        revoked = {r.cn for r in records if r.revoked} - live.keys()
        new: list[CertRecord] = []
        for kind, name, sans in wanted:
            cn = cn_for(kind, name)
            if cn in revoked:
                # Revoked and never replaced: a deliberate act, which a routine re-run must not undo.
                raise PkiError(
                    f"{kind} {name!r} ({cn}) was revoked and has no valid certificate; remove it from the list, "
                    f"or re-admit it deliberately: 'shopfleet pki issue {kind} {name}' (a new key) or a new enrollment token"
                )
            rec = live.get(cn)
            if rec is not None and rec.kind == kind and self.cert_path(cn).exists() and (rec.key_on_node or self.key_path(cn).exists()):
                cert = x509.load_pem_x509_certificate(self.cert_path(cn).read_bytes())
                if f"{cert.serial_number:x}" == rec.serial and _covers(cert, sans):
                    continue
            live[cn] = self._issue(kind, name, sans, CERT_DAYS, records)
            new.append(live[cn])
        if new:
            self._save_index(records)
        return new

    # ----- enrollment -----------------------------------------------------------------------

    def sign_csr(self, shop: str, node: str, csr_pem: bytes | str, *, days: int = CERT_DAYS,
                 revoke_previous: bool = True) -> tuple[CertRecord, bytes]:
        """Sign a node's CSR as its client certificate ``<shop>.<node>``; return (record, certificate PEM).

        Only the CSR's public key is used (it must be P-256 or P-384 EC, or RSA of 2048 bits or
        more, and the CSR's own signature must verify, proving the node holds the key); the CN,
        extensions and validity are the same as :meth:`issue` gives a node. ``revoke_previous``
        revokes the node's earlier certificates and rewrites the CRL (an enrolled node has one
        live certificate). Raises ``PkiError`` naming what is wrong with the CSR.
        """
        try:
            cn = node_cn(shop, node)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        if days < 1:
            raise PkiError(f"days {days}: a certificate must be valid for at least 1 day")
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise PkiError(f"the CSR is not a PEM certificate signing request ({exc}); send the output of the node's enroll command") from None
        if not csr.is_signature_valid:
            raise PkiError("the CSR's signature does not verify: it was not made with the key it carries")
        pub = csr.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if pub.curve.name not in ("secp256r1", "secp384r1"):
                raise PkiError(f"the CSR's key is on curve {pub.curve.name}: use P-256 (secp256r1) or P-384, which every broker's OpenSSL accepts")
        elif isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < 2048:
                raise PkiError(f"the CSR's RSA key has {pub.key_size} bits: use at least 2048, or P-256")
        else:
            raise PkiError(f"the CSR's key is {type(pub).__name__}: use an EC P-256 key (or RSA 2048+)")
        with self.locked():
            ca_cert, ca_key = self._ca()
            now = _now()
            not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
            key_usage = x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=isinstance(pub, rsa.RSAPublicKey),
                data_encipherment=False, key_agreement=isinstance(pub, ec.EllipticCurvePublicKey), key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False)
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_cert.subject)
                .public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(key_usage, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            pem = cert.public_bytes(serialization.Encoding.PEM)
            record = CertRecord(serial=f"{cert.serial_number:x}", kind="node", cn=cn, not_after=not_after.isoformat(),
                                issued_at=now.isoformat(), key_on_node=True)
            records = self.records()
            revoked_any = False
            if revoke_previous:
                stamped = []
                for r in records:
                    if r.cn == cn and not r.revoked:
                        r = CertRecord(**{**asdict(r), "revoked_at": record.issued_at})
                        revoked_any = True
                    stamped.append(r)
                records = stamped
            records.append(record)
            write_atomic(self.cert_path(cn), pem, 0o644)
            self.key_path(cn).unlink(missing_ok=True)  # an older key of this CN made here: no longer its key
            self._save_index(records)
            if revoked_any:
                self.write_crl()
        return record, pem

    # ----- revocation -----------------------------------------------------------------------

    def revoke(self, cn: str | None = None, *, serial: str | None = None) -> list[CertRecord]:
        """Revoke every unrevoked certificate of ``cn`` (or the one ``serial``), rewrite the CRL; return what was revoked."""
        if (cn is None) == (serial is None):
            raise PkiError("name a certificate to revoke: its CN or --serial (one of the two)")
        with self.locked():
            return self._revoke_locked(cn, serial)

    def _revoke_locked(self, cn: str | None, serial: str | None) -> list[CertRecord]:
        serial = serial.lower().removeprefix("0x") if serial else None
        records = self.records()
        stamp = _now().isoformat()
        hit = [r for r in records if not r.revoked and (r.cn == cn if cn is not None else r.serial == serial)]
        if not hit:
            known = [r for r in records if (r.cn == cn if cn is not None else r.serial == serial)]
            what = f"CN {cn!r}" if cn is not None else f"serial {serial}"
            if known:
                raise PkiError(f"every certificate of {what} is already revoked")
            raise PkiError(f"no certificate with {what} in {self.index_path}; 'shopfleet pki list' shows them")
        ids = {r.serial for r in hit}
        self._save_index([CertRecord(**{**asdict(r), "revoked_at": stamp}) if r.serial in ids else r for r in records])
        self.write_crl()
        return [CertRecord(**{**asdict(r), "revoked_at": stamp}) for r in hit]

    def write_crl(self, days: int = CRL_DAYS) -> dt.datetime:
        """Write ``crl.pem`` listing every revoked, unexpired certificate; return its nextUpdate."""
        ca_cert, ca_key = self._ca()
        now = _now()
        next_update = now + dt.timedelta(days=days)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(next_update)
            .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        for r in self.records():
            if r.revoked and not r.expired(now):
                revoked_at = dt.datetime.fromisoformat(r.revoked_at)  # type: ignore[arg-type]
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(r.serial, 16)).revocation_date(revoked_at).build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return next_update

    def crl_next_update(self) -> dt.datetime:
        """Return when the current CRL expires (after which the broker refuses every client)."""
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        nu = crl.next_update_utc
        assert nu is not None  # write_crl always sets it
        return nu


def _covers(cert: x509.Certificate, sans: Sequence[str]) -> bool:
    """Return whether a server certificate already names every one of ``sans``."""
    if not sans:
        return True
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(n in have for n in _sans(sans))
