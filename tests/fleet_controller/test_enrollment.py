"""Enrollment: one-time tokens, the CSR signed by the fleet CA over real HTTPS, the admin API, the CLIs."""

from __future__ import annotations

import difflib
import ssl
import stat
import threading

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select

from edge_agent.enroll import EnrollError, enroll, make_key_and_csr
from edge_agent.enroll import EnrollUnreachable as Unreachable
from fleet_controller.enrollment import BrokerReloader, remove_acl_user, remove_password_entry
from fleet_controller.pki import Pki, PkiError
from fleet_controller.registry.audit import AuditQuery
from fleet_controller.registry.enrollment import (
    TOKENS,
    EnrollmentError,
    EnrollmentTokens,
    TokenRefused,
    parse_ttl,
    token_hash,
)
from fleet_controller.settings import ApiSettings, EnrollmentSettings
from shopfleet.cli import main as shopfleet_main
from tests.support.enrollment import enrollment_app, https_api, migrated_engine, serve, server_pki
from tests.support.metrics import metric as sample


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ----- tokens --------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_work_once_and_expire(tmp_path):
    now = [1_000_000.0]
    tokens = EnrollmentTokens(migrated_engine(tmp_path), clock=lambda: now[0])
    token, _rec = tokens.create("shop-a", "pi-3", "1h", "admin")
    assert token.startswith("sfe_") and len(token) > 40
    with tokens.engine.connect() as conn:
        stored = conn.execute(select(TOKENS.c.token_hash)).scalars().all()
    assert stored == [token_hash(token)] and token not in stored[0]
    got, issued = tokens.redeem(token, "10.0.0.7", lambda r, _c: f"cert for {r.shop}.{r.node}")
    assert issued == "cert for shop-a.pi-3" and got.used_from == "10.0.0.7" and got.used_at == now[0]
    with pytest.raises(TokenRefused) as used:
        tokens.redeem(token, "10.0.0.7", lambda r, _c: "again")
    assert used.value.reason == "used"
    late, _ = tokens.create("shop-a", "pi-4", 120, "admin")
    now[0] += 121
    with pytest.raises(TokenRefused) as expired:
        tokens.redeem(late, "x", lambda r, _c: None)
    assert expired.value.reason == "expired"
    for bad, reason in ((token[:-1] + ("A" if token[-1] != "A" else "B"), "unknown"), ("hello", "malformed"), ("sfe_" + "x" * 200, "malformed")):
        with pytest.raises(TokenRefused) as refused:
            tokens.redeem(bad, "x", lambda r, _c: None)
        assert refused.value.reason == reason
    assert [t.state(now[0]) for t in tokens.list()] == ["expired", "used"]


def test_a_failed_signing_leaves_the_token_unused_and_revoke_deletes_it(tmp_path):
    tokens = EnrollmentTokens(migrated_engine(tmp_path))
    token, rec = tokens.create("shop-a", "pi-3")

    def fail(_r, _c):
        raise PkiError("bad CSR")

    with pytest.raises(PkiError):
        tokens.redeem(token, "x", fail)
    assert tokens.get(rec.id).used_at is None
    assert tokens.revoke(rec.id).node == "pi-3"
    with pytest.raises(TokenRefused) as gone:
        tokens.redeem(token, "x", lambda r, _c: None)
    assert gone.value.reason == "unknown"
    with pytest.raises(EnrollmentError, match="no enrollment token"):
        tokens.revoke(rec.id)


def test_two_concurrent_redeems_of_one_token_enroll_once(tmp_path):
    tokens = EnrollmentTokens(migrated_engine(tmp_path))
    token, _ = tokens.create("shop-a", "pi-3")
    barrier = threading.Barrier(4)
    results: list[str] = []

    def go() -> None:
        barrier.wait()
        try:
            tokens.redeem(token, "x", lambda r, _c: None)
            results.append("ok")
        except TokenRefused as exc:
            results.append(exc.reason)
        except Exception as exc:  # SQLite busy and the like would show here
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["ok", "used", "used", "used"]


def test_token_ids_and_ttls_are_checked():
    assert parse_ttl("1h") == 3600 and parse_ttl("30m") == 1800 and parse_ttl("2d") == 172800 and parse_ttl(90) == 90
    for bad in ("0", "30", "8d", "1y", "soon"):
        with pytest.raises(EnrollmentError, match="ttl"):
            parse_ttl(bad)


# ----- signing -------------------------------------------------------------------------------


def _csr(key) -> bytes:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shop-b.pi-1")]))  # a lie: ignored
            .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM))


def test_sign_csr_takes_only_the_key_and_supersedes_the_nodes_earlier_certificates(tmp_path):
    pki = Pki.init(tmp_path / "pki")
    old = pki.issue("node", "shop-a/pi-1")
    key = ec.generate_private_key(ec.SECP256R1())
    rec, pem = pki.sign_csr("shop-a", "pi-1", _csr(key))
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "shop-a.pi-1"  # from the token, not the CSR
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes()))
    assert rec.key_on_node and not pki.key_path("shop-a.pi-1").exists()  # the old key made here is gone
    by_serial = {r.serial: r for r in pki.records()}
    assert by_serial[old.serial].revoked and not by_serial[rec.serial].revoked
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(old.serial, 16)) is not None
    # broker-config's ensure() must not mint a second key for an enrolled node
    assert pki.ensure([("node", "shop-a/pi-1", ())]) == []


def test_sign_csr_refuses_bad_requests_naming_the_problem(tmp_path):
    pki = Pki.init(tmp_path / "pki")
    with pytest.raises(PkiError, match="not a PEM certificate signing request"):
        pki.sign_csr("shop-a", "pi-1", b"hello")
    with pytest.raises(PkiError, match="Ed25519PublicKey"):
        pki.sign_csr("shop-a", "pi-1", _csr(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(PkiError, match="secp256k1"):
        pki.sign_csr("shop-a", "pi-1", _csr(ec.generate_private_key(ec.SECP256K1())))
    with pytest.raises(PkiError, match="node id"):
        pki.sign_csr("shop-a", "../x", _csr(ec.generate_private_key(ec.SECP256R1())))
    # a CSR whose public key was swapped after signing: its signature no longer verifies
    good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())))
    other = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    gk = good.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ok = other.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    i = bytes(der).index(gk)
    der[i:i + len(gk)] = ok
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature does not verify"):
        pki.sign_csr("shop-a", "pi-1", forged)
    assert pki.records() == []


# ----- the API over HTTPS, and the agent's side ------------------------------------------------------


@pytest.fixture
def https_setup(tmp_path):
    pki = server_pki(tmp_path / "pki")
    settings = EnrollmentSettings(pki_dir=pki.root, broker_address="broker.example.com:8883", max_failures_per_address=3)
    ea = enrollment_app(tmp_path, settings)
    with serve(ea.app, https_api(pki)) as port:
        yield ea, pki, f"https://127.0.0.1:{port}"


def test_a_node_enrolls_over_https_with_a_token_an_admin_made(https_setup, tmp_path):
    ea, pki, url = https_setup
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert_path)), base_url=url)
    r = http.post("/api/v1/enrollment-tokens", json={"shop": "shop-a", "node": "pi-7", "ttl": "15m"}, headers=_auth(ea.admin_token))
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["token"].startswith("sfe_") and made["state"] == "unused" and r.headers["cache-control"] == "no-store"
    assert "shopfleet agent enroll --controller" in made["command"]
    listed = http.get("/api/v1/enrollment-tokens", headers=_auth(ea.admin_token)).json()
    assert [t["node"] for t in listed] == ["pi-7"] and "token" not in listed[0]

    out = tmp_path / "node-tls"
    result = enroll(url, made["token"], pki.ca_cert_path, out)
    assert (result.shop, result.node, result.cn) == ("shop-a", "pi-7", "shop-a.pi-7")
    assert (result.broker_host, result.broker_port) == ("broker.example.com", 8883)
    assert stat.S_IMODE((out / "node.key").stat().st_mode) == 0o600 and stat.S_IMODE(out.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate((out / "node.crt").read_bytes())
    key = serialization.load_pem_private_key((out / "node.key").read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert (out / "ca.crt").read_bytes() == pki.ca_cert_path.read_bytes()
    assert "cert_file: " + str(out.resolve() / "node.crt") in result.config_yaml()
    # only the certificate reached the controller's PKI, never a key
    assert pki.current("shop-a.pi-7").key_on_node and not pki.key_path("shop-a.pi-7").exists()

    with pytest.raises(EnrollError, match="already used"):
        enroll(url, made["token"], pki.ca_cert_path, tmp_path / "again")
    assert not (tmp_path / "again").exists()  # nothing written on a refusal
    assert sample(ea.registry, "shopfleet_controller_enrollments_total", result="ok") == 1
    assert sample(ea.registry, "shopfleet_controller_enrollments_total", result="used") == 1
    audit = ea.audit.query(AuditQuery(action="node.enroll"))
    assert [(e.actor, e.target, e.outcome) for e in audit] == [("anonymous", "", "refused: used"), ("node:shop-a.pi-7", "shop-a.pi-7", "ok")]
    assert ea.audit.query(AuditQuery(action="enrollment_token.create"))[0].actor == "admin"


def test_enrollment_refusals_are_clear_counted_and_rate_limited(https_setup, tmp_path):
    ea, pki, url = https_setup
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert_path)), base_url=url)
    # a CA that did not sign the controller's certificate: the node refuses to talk
    other = Pki.init(tmp_path / "other")
    with pytest.raises(EnrollError, match="does not verify against"):
        enroll(url, "sfe_x", other.ca_cert_path, tmp_path / "o")
    with pytest.raises(EnrollError, match="https://"):
        enroll(url.replace("https", "http"), "sfe_x", None, tmp_path / "o")
    # a bad CSR does not burn the token
    token = http.post("/api/v1/enrollment-tokens", json={"shop": "shop-a", "node": "pi-8"}, headers=_auth(ea.admin_token)).json()["token"]
    r = http.post("/api/v1/enroll", json={"token": token, "csr": "not a csr"})
    assert r.status_code == 422 and r.json()["reason"] == "bad_csr" and "token was not used" in r.json()["detail"]
    assert enroll(url, token, pki.ca_cert_path, tmp_path / "n").cn == "shop-a.pi-8"
    r = http.post("/api/v1/enroll", content=b"{not json")
    assert r.status_code == 400 and r.json()["reason"] == "bad_request"
    # 3 failures per address (this fixture's limit): the 4th try is refused before the token is looked at
    codes = [http.post("/api/v1/enroll", json={"token": "sfe_guess", "csr": make_key_and_csr()[1].decode()}).status_code for _ in range(2)]
    assert codes == [401, 429]
    with pytest.raises(Unreachable, match="429"):
        enroll(url, token, pki.ca_cert_path, tmp_path / "m")
    for result, n in (("bad_csr", 1), ("bad_request", 1), ("unknown", 1), ("rate_limited", 2), ("ok", 1)):
        assert sample(ea.registry, "shopfleet_controller_enrollments_total", result=result) == n, result


def test_token_routes_need_fleet_admin(https_setup):
    ea, pki, url = https_setup
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert_path)), base_url=url)
    body = {"shop": "shop-a", "node": "pi-9"}
    assert http.post("/api/v1/enrollment-tokens", json=body).status_code == 401
    assert http.post("/api/v1/enrollment-tokens", json=body, headers=_auth(ea.viewer_token)).status_code == 403
    assert http.get("/api/v1/enrollment-tokens", headers=_auth(ea.viewer_token)).status_code == 403
    assert http.post("/api/v1/nodes/shop-a/pi-1/credentials/revoke", headers=_auth(ea.viewer_token)).status_code == 403
    assert http.post("/api/v1/nodes/shop-a/pi-1/credentials/rotate", headers=_auth(ea.viewer_token)).status_code == 403
    r = http.post("/api/v1/enrollment-tokens", json={"shop": "shop-a", "node": "Bad Node"}, headers=_auth(ea.admin_token))
    assert r.status_code == 422 and "node id" in r.json()["detail"]
    made = http.post("/api/v1/enrollment-tokens", json=body, headers=_auth(ea.admin_token)).json()
    assert http.delete(f"/api/v1/enrollment-tokens/{made['id']}", headers=_auth(ea.admin_token)).status_code == 204
    assert http.delete(f"/api/v1/enrollment-tokens/{made['id']}", headers=_auth(ea.admin_token)).status_code == 404
    assert [e.action for e in ea.audit.query(AuditQuery(action="enrollment_token."))] == ["enrollment_token.revoke", "enrollment_token.create"]


def test_plain_http_enrollment_is_refused_unless_allowed(tmp_path):
    pki = server_pki(tmp_path / "pki")
    (tmp_path / "a").mkdir()
    ea = enrollment_app(tmp_path / "a", EnrollmentSettings(pki_dir=pki.root))
    token, _ = ea.creds.create_token("shop-a", "pi-1", None, "admin")
    with serve(ea.app, ApiSettings()) as port, pytest.raises(EnrollError, match="needs HTTPS"):
        enroll(f"http://127.0.0.1:{port}", token, None, tmp_path / "n", allow_http=True)
    assert sample(ea.registry, "shopfleet_controller_enrollments_total", result="plain_http") == 1
    (tmp_path / "b").mkdir()
    dev = enrollment_app(tmp_path / "b", EnrollmentSettings(pki_dir=pki.root, allow_plain_http=True))
    token, _ = dev.creds.create_token("shop-a", "pi-1", None, "admin")
    with serve(dev.app, ApiSettings()) as port:
        assert enroll(f"http://127.0.0.1:{port}", token, None, tmp_path / "n", allow_http=True).cn == "shop-a.pi-1"


def test_without_enrollment_settings_the_endpoints_say_how_to_enable_them(tmp_path):
    ea = enrollment_app(tmp_path, None)
    with serve(ea.app, ApiSettings()) as port:
        r = httpx.post(f"http://127.0.0.1:{port}/api/v1/enroll", json={"token": "sfe_x", "csr": "x"})
        assert r.status_code == 503 and "enrollment.pki_dir" in r.json()["detail"]
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/enrollment-tokens", headers=_auth(ea.admin_token))
        assert r.status_code == 503


# ----- the CLIs --------------------------------------------------------------------------------------


def test_the_clis_make_a_token_and_enroll_with_it(https_setup, tmp_path, capsys):
    ea, pki, url = https_setup
    db = str(ea.engine.url.database)
    assert shopfleet_main(["enroll-token", "create", "--db-url", f"sqlite:///{db}", "--shop", "shop-b", "--node", "pi-2", "--ttl", "10m"]) == 0
    out = capsys.readouterr().out
    token = next(line for line in out.splitlines() if line.startswith("sfe_"))
    assert shopfleet_main(["enroll-token", "list", "--db-url", f"sqlite:///{db}"]) == 0
    assert "shop-b/pi-2" in capsys.readouterr().out
    (tmp_path / "token").write_text(token + "\n")
    rc = shopfleet_main(["agent", "enroll", "--controller", url, "--token-file", str(tmp_path / "token"),
                         "--ca-file", str(pki.ca_cert_path), "--out", str(tmp_path / "tls")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "enrolled as shop-b.pi-2" in printed.out and "host: broker.example.com" in printed.out
    rc = shopfleet_main(["agent", "enroll", "--controller", url, "--token-file", str(tmp_path / "token"),
                         "--ca-file", str(pki.ca_cert_path), "--out", str(tmp_path / "tls2")])
    assert rc == 2 and "already used" in capsys.readouterr().err
    assert shopfleet_main(["enroll-token", "revoke", "1", "--db-url", f"sqlite:///{db}"]) == 2
    assert "already used" in capsys.readouterr().err
    assert shopfleet_main(["enroll-token", "create", "--db-url", f"sqlite:///{db}", "--shop", "shop-b", "--node", "pi-2", "--ttl", "1y"]) == 2


# ----- revocation helpers ------------------------------------------------------------------------------


def test_remove_password_entry_keeps_the_other_users_and_the_mode(tmp_path):
    f = tmp_path / "passwd"
    f.write_text("shop-a.pi-1:$7$a\nshop-a.pi-10:$7$b\ncontroller-x:$7$c\n")
    f.chmod(0o640)
    assert remove_password_entry(f, "shop-a.pi-1")
    assert f.read_text() == "shop-a.pi-10:$7$b\ncontroller-x:$7$c\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert not remove_password_entry(f, "shop-a.pi-1")
    assert not remove_password_entry(tmp_path / "missing", "x")


def test_remove_acl_user_takes_the_nodes_block_and_its_topics_from_the_bridge_and_nothing_else(tmp_path):
    from edge_agent.protocol import Channel, Topics
    from fleet_controller.broker_config import bridge_acl, node_acl, render_acl

    f = tmp_path / "acl"
    f.write_text(render_acl([("shop-a", "pi-1"), ("shop-a", "pi-10"), ("shop-b", "pi-1")], bridges=["shop-a"]))
    f.chmod(0o640)
    before = f.read_text()
    own = frozenset(Topics.node("shop-a", "pi-1", ch) for ch in Channel)
    assert remove_acl_user(f, "shop-a.pi-1", own)
    after = f.read_text()
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert "user shop-a.pi-1\n" not in after and not any(t in after.split() for t in own)
    # only deletions, in order: the node's block, and its seven topics from the bridge's block
    ops = difflib.SequenceMatcher(a=before.splitlines(), b=after.splitlines(), autojunk=False).get_opcodes()
    assert {op for op, *_ in ops} == {"equal", "delete"}
    removed = [line for op, i1, i2, _, _ in ops if op == "delete" for line in before.splitlines()[i1:i2]]
    assert removed == node_acl("shop-a", "pi-1") + [line for line in bridge_acl("shop-a", ["pi-1"]) if "/pi-1/" in line]
    for other in ("user shop-a.pi-10", "user shop-b.pi-1", "user controller", "user shop-a._bridge"):
        assert other in after.splitlines(), other
    assert "topic write fleet/v1/shop-a/pi-10/telemetry" in after and "topic write fleet/v1/shop-b/pi-1/telemetry" in after
    # what stays under the bridge's user line is the bridge's, not anybody's left-over
    bridge = after.split("user shop-a._bridge")[1].split("\n\n")[0]
    assert "pi-10" in bridge and "/pi-1/" not in bridge
    assert not remove_acl_user(f, "shop-a.pi-1", own)  # nothing left: the file is not rewritten
    assert not remove_acl_user(tmp_path / "missing", "x")


def test_broker_reloader_reports_what_happened(tmp_path):
    assert BrokerReloader().reload() == "not_configured"
    assert BrokerReloader(("true",)).reload() == "ok"
    assert BrokerReloader(("false",)).reload().startswith("failed: false exited 1")
    assert "no-such-command" in BrokerReloader(("no-such-command",)).reload()
    assert BrokerReloader(pid_file=tmp_path / "none.pid").reload().startswith("failed: SIGHUP")


def test_the_controller_mounts_enrollment_and_refuses_a_missing_ca_at_start(tmp_path):
    from fleet_controller.service import build_service
    from fleet_controller.settings import ControllerSettings

    with pytest.raises(ValueError, match="enrollment.pki_dir: no CA in"):
        build_service(ControllerSettings(data_dir=tmp_path, enrollment={"pki_dir": tmp_path / "nope"}))
    pki = Pki.init(tmp_path / "pki")
    service = build_service(ControllerSettings(data_dir=tmp_path, enrollment={"pki_dir": pki.root}))
    try:
        paths = {route.path for router in service._routers for route in router.routes}
        assert {"/api/v1/enroll", "/api/v1/enrollment-tokens", "/api/v1/nodes/{shop}/{node}/credentials/revoke"} <= paths
    finally:
        service.writer.close()
        service.engine.dispose()
