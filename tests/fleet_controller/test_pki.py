"""The fleet CA: certificates that chain and name the right user, 0600 keys, rotation, a CRL, the CLI."""

from __future__ import annotations

import argparse
import json
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_controller import broker_cli
from fleet_controller.pki import Pki, PkiError, cn_for


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki.init(tmp_path / "pki")


def _cert(pki: Pki, cn: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.cert_path(cn).read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_and_an_empty_crl_with_private_modes(pki):
    ca = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(pki.ca_key_path) == 0o600 and _mode(pki.ca_key_path.parent) == 0o700
    assert _mode(pki.ca_cert_path) == 0o644 and _mode(pki.crl_path) == 0o644
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(ca.public_key())
    with pytest.raises(PkiError, match="already holds a CA"):
        Pki.init(pki.root)


@pytest.mark.parametrize(
    ("kind", "name", "cn"),
    [("node", "shop-a/pi-1", "shop-a.pi-1"), ("controller", "controller-abc", "controller-abc"), ("bridge", "shop-a", "shop-a._bridge")],
)
def test_client_certificates_chain_to_the_ca_and_name_the_mqtt_user(pki, kind, name, cn):
    rec = pki.issue(kind, name)
    assert rec.cn == cn == cn_for(kind, name)
    cert = _cert(pki, cn)
    ca = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert _mode(pki.key_path(cn)) == 0o600


def test_server_certificate_names_hosts_and_addresses(pki):
    pki.issue("server", "mqtt.example", sans=["127.0.0.1", "localhost"])
    san = _cert(pki, "mqtt.example").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(PkiError, match="server certificates only"):
        pki.issue("node", "shop-a/pi-1", sans=["x"])


@pytest.mark.parametrize(
    ("kind", "name", "error"),
    [
        ("node", "shop-a", "not 'shop/node'"),
        ("node", "Shop/pi-1", "invalid shop id"),
        ("controller", "ctl.x", "no '.'"),
        ("bridge", "shop_a", "invalid shop id"),
        ("server", "-bad host", "not a host name"),
        ("robot", "x", "unknown certificate kind"),
    ],
)
def test_bad_names_are_refused_with_the_fix(pki, kind, name, error):
    with pytest.raises(PkiError, match=error):
        pki.issue(kind, name)
    assert pki.records() == []  # nothing half-issued


def test_rotation_and_revocation(pki):
    first = pki.issue("node", "shop-a/pi-1")
    second = pki.issue("node", "shop-a/pi-1")  # rotation: a new key under the same CN
    assert first.serial != second.serial and pki.current("shop-a.pi-1") == second
    assert _cert(pki, "shop-a.pi-1").serial_number == int(second.serial, 16)
    third = pki.issue("node", "shop-a/pi-1", revoke_previous=True)
    revoked = {r.serial_number for r in x509.load_pem_x509_crl(pki.crl_path.read_bytes())}
    assert revoked == {int(first.serial, 16), int(second.serial, 16)}
    assert pki.current("shop-a.pi-1") == third
    pki.issue("node", "shop-b/pi-1")
    done = pki.revoke("shop-a.pi-1")
    assert [r.serial for r in done] == [third.serial]
    assert pki.current("shop-a.pi-1") is None and pki.current("shop-b.pi-1") is not None
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(third.serial, 16)) is not None
    with pytest.raises(PkiError, match="already revoked"):
        pki.revoke("shop-a.pi-1")
    with pytest.raises(PkiError, match="no certificate with CN 'nobody'"):
        pki.revoke("nobody")
    with pytest.raises(PkiError, match="one of the two"):
        pki.revoke()


def test_ensure_issues_only_what_is_missing(pki):
    wanted = [("node", "shop-a/pi-1", ()), ("server", "localhost", ("127.0.0.1",))]
    assert len(pki.ensure(wanted)) == 2
    assert pki.ensure(wanted) == []  # never rotates a valid certificate
    assert [r.cn for r in pki.ensure([("server", "localhost", ("127.0.0.1", "10.0.0.5"))])] == ["localhost"]  # a new name needs a new cert
    pki.revoke("shop-a.pi-1")
    with pytest.raises(PkiError, match=r"'shop-a/pi-1' \(shop-a.pi-1\) was revoked.*shopfleet pki issue node shop-a/pi-1"):
        pki.ensure(wanted)  # a routine re-run must not undo a revocation
    pki.issue("node", "shop-a/pi-1")  # re-admitted deliberately
    assert pki.ensure(wanted) == []


def test_operations_without_a_ca_say_how_to_make_one(tmp_path):
    with pytest.raises(PkiError, match="run 'shopfleet pki init"):
        Pki(tmp_path / "none").issue("node", "shop-a/pi-1")


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    broker_cli.register(parser.add_subparsers())

    def run(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args(["pki", *argv])
        rc = args.func(args)
        out, err = capsys.readouterr()
        return rc, out, err

    d = str(tmp_path / "pki")
    assert run("init", "--dir", d)[0] == 0
    rc, out, _ = run("issue", "--dir", d, "node", "shop-a/pi-1")
    assert rc == 0 and "CN=shop-a.pi-1" in out
    rc, out, _ = run("revoke", "--dir", d, "shop-a.pi-1")
    assert rc == 0 and "restart the broker" in out
    rc, out, _ = run("list", "--dir", d, "--json")
    listed = json.loads(out)
    assert rc == 0 and [c["cn"] for c in listed["certificates"]] == ["shop-a.pi-1"] and listed["certificates"][0]["revoked_at"]
    rc, out, _ = run("list", "--dir", d)
    assert "revoked" in out and "CRL" in out
    assert run("crl", "--dir", d, "--days", "30")[0] == 0
    rc, _, err = run("issue", "--dir", d, "node", "nonsense")
    assert rc == 2 and "not 'shop/node'" in err
    rc, _, err = run("init", "--dir", d)
    assert rc == 2 and "already holds a CA" in err
