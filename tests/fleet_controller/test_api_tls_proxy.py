"""The API over real HTTPS with a fleet-CA certificate, and X-Forwarded-For believed only from api.trusted_proxies."""

from __future__ import annotations

import ssl

import httpx
import pytest
from fastapi import FastAPI, Request

from fleet_controller.pki import Pki
from fleet_controller.settings import ApiSettings
from tests.support.enrollment import serve

app = FastAPI()


@app.get("/whoami")
def whoami(request: Request) -> dict[str, str]:
    return {"client": request.client.host if request.client else "?", "scheme": request.url.scheme}


def test_x_forwarded_for_is_ignored_without_trusted_proxies():
    with serve(app, ApiSettings()) as port:
        r = httpx.get(f"http://127.0.0.1:{port}/whoami", headers={"X-Forwarded-For": "198.51.100.9"})
    assert r.json()["client"] == "127.0.0.1"  # loopback no longer picks its own address


def test_x_forwarded_for_is_believed_from_a_trusted_proxy():
    with serve(app, ApiSettings(trusted_proxies=("127.0.0.0/8",))) as port:
        r = httpx.get(f"http://127.0.0.1:{port}/whoami", headers={"X-Forwarded-For": "198.51.100.9"})
    assert r.json()["client"] == "198.51.100.9"


def test_trusted_proxies_must_be_addresses_or_cidrs():
    with pytest.raises(ValueError, match="not an address or CIDR"):
        ApiSettings(trusted_proxies=("proxy.example.com",))
    with pytest.raises(ValueError, match="go together"):
        ApiSettings(tls_cert_file="/x.crt")


def test_api_serves_https_with_a_fleet_ca_certificate(tmp_path):
    pki = Pki.init(tmp_path / "pki")
    pki.issue("server", "localhost", sans=["127.0.0.1"])
    api = ApiSettings(tls_cert_file=pki.cert_path("localhost"), tls_key_file=pki.key_path("localhost"))
    with serve(app, api) as port:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert_path))
        r = httpx.get(f"https://127.0.0.1:{port}/whoami", verify=ctx)
        assert r.json() == {"client": "127.0.0.1", "scheme": "https"}
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the fleet CA refuses it
            httpx.get(f"https://127.0.0.1:{port}/whoami", verify=ssl.create_default_context())
        with pytest.raises(httpx.RemoteProtocolError):  # and plain http is not served
            httpx.get(f"http://127.0.0.1:{port}/whoami")
