"""The guard on every route, through HTTP: logins, cookies, CSRF, roles, tokens, rate limit."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from fleet_controller.alerts.rules import AlertRules
from fleet_controller.intake.core import RegistryWriter
from fleet_controller.registry.read import RegistryReader
from fleet_controller.rollout.api import build_router as rollout_router
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.admin import admin_router
from fleet_controller.web.app import create_app
from fleet_controller.web.dashboard.live import LiveHub
from fleet_controller.web.dashboard.router import dashboard_router
from fleet_controller.web.remote_actions import RemoteActions, actions_router
from tests.support.controller import FAST, csrf_of, login, role_users

OPEN = {"/login", "/healthz", "/metrics", "/static/{name}", "/static/docs-init.js", "/static/vendor/{name:path}", "/static/vendor/uplot/{name}"}
# FastAPI serves its API docs outside the dependency system; they describe the API and hold no
# fleet data, so they stay open (docs/dashboard.md says so). Everything else must refuse.
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def all_routes(app):
    """Yield (path, methods) of every route, including those of included routers."""
    for r in app.routes:
        if hasattr(r, "effective_route_contexts"):
            for c in r.effective_route_contexts():
                yield c.path, c.methods
        elif getattr(r, "path", None):
            yield r.path, getattr(r, "methods", None) or {"GET"}


@pytest.fixture
def app_and_store(registry, db_url):
    store = AccountStore(registry.engine, FAST)
    creds = role_users(store)
    mreg = CollectorRegistry()
    auth = build_auth(store, mreg)
    reader = RegistryReader(registry.engine)
    writer = RegistryWriter(db_url, mode="thread")
    app = create_app(reader, mreg, writer=writer, routers=[auth.router, dashboard_router(reader, LiveHub(mreg), AlertRules()),
                                                           rollout_router(registry.engine), admin_router(store),
                                                           actions_router(RemoteActions(registry.engine, reader, None, lambda: None))],
                     dependencies=[auth.dependency])
    yield app, store, creds, mreg
    writer.close()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_refuses_a_logged_out_request(app_and_store):
    app, *_ = app_and_store
    client = TestClient(app)
    checked = 0
    for path, methods in all_routes(app):
        if path in OPEN | DOCS:
            continue
        for method in methods:
            r = client.request(method, _concrete(path), follow_redirects=False)
            assert r.status_code == 401, f"{method} {path} answered {r.status_code} to a stranger"
            assert "log in" in r.json()["detail"]
            checked += 1
    assert checked >= 20  # registry API, dashboard pages and API, the rollout API


def test_a_page_redirects_a_browser_to_login_and_back(app_and_store):
    app, _, creds, _ = app_and_store
    client = TestClient(app)
    r = client.get("/shops/x?tab=1", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fshops%2Fx%3Ftab%3D1"
    r = login(client, "viewer", creds["viewer"], "/alerts")
    assert r.status_code == 303 and r.headers["location"] == "/alerts"


def test_open_paths_answer_without_login(app_and_store):
    client = TestClient(app_and_store[0])
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/login").status_code == 200
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/..%2Fsetup.py").status_code == 404


@pytest.mark.parametrize(("base", "secure"), [pytest.param("http://testserver", False, id="http"),
                                              pytest.param("https://testserver", True, id="https-marks-secure")])
def test_session_cookie_flags(app_and_store, base, secure):
    app, _, creds, _ = app_and_store
    client = TestClient(app, base_url=base)
    r = login(client, "operator", creds["operator"])
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("sf_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert ("Secure" in cookie) is secure


def test_wrong_password_and_rate_limit(app_and_store):
    app, _, creds, mreg = app_and_store
    client = TestClient(app)
    for _ in range(3):  # LoginBackoff's free failures
        r = login(client, "operator", "not the password")
        assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = login(client, "operator", creds["operator"])  # even the right password waits now, from this address
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert mreg.get_sample_value("shopfleet_auth_logins_total", {"result": "rate_limited"}) == 1
    assert mreg.get_sample_value("shopfleet_auth_logins_total", {"result": "bad_credentials"}) == 3


def test_a_guesser_elsewhere_cannot_lock_the_real_user_out(app_and_store):
    app, _, creds, _ = app_and_store
    attacker = TestClient(app, client=("203.0.113.7", 40000))
    for _ in range(6):
        login(attacker, "operator", "guess")
    assert login(attacker, "operator", creds["operator"]).status_code == 429
    real = TestClient(app, client=("10.1.2.3", 50000))
    assert login(real, "operator", creds["operator"]).status_code == 303  # the real user, from their own address
    assert login(attacker, "viewer", creds["viewer"]).status_code == 303  # the pair is throttled, not the address


def test_login_form_needs_its_csrf_cookie(app_and_store):
    app, _, creds, _ = app_and_store
    client = TestClient(app)
    r = client.post("/login", data={"username": "operator", "password": creds["operator"], "csrf_token": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403 and "expired" in r.text


def test_state_changing_requests_need_the_csrf_token(app_and_store):
    app, _, creds, mreg = app_and_store
    client = TestClient(app)
    login(client, "operator", creds["operator"])
    r = client.post("/api/v1/alerts/1/ack")
    assert r.status_code == 403 and "x-csrf-token" in r.json()["detail"]
    r = client.post("/api/v1/alerts/1/ack", headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    r = client.post("/api/v1/alerts/1/ack", headers={"X-CSRF-Token": csrf_of(client)})
    assert r.status_code == 404 and "no alert 1" in r.json()["detail"]  # past the guard
    assert mreg.get_sample_value("shopfleet_auth_refused_total", {"reason": "csrf"}) == 2


@pytest.mark.parametrize(
    ("user", "method", "path", "status"),
    [
        pytest.param("viewer", "GET", "/api/v1/rollouts", 200, id="viewer-reads-rollouts"),
        pytest.param("operator", "POST", "/api/v1/rollouts/1/pause", 403, id="operator-cannot-pause-rollout"),
        pytest.param("mlops", "POST", "/api/v1/rollouts/1/pause", 404, id="ml-engineer-past-the-guard-no-such-rollout"),
        pytest.param("viewer", "GET", "/api/v1/releases", 200, id="viewer-reads-releases"),
        pytest.param("operator", "POST", "/api/v1/releases", 403, id="operator-cannot-create-release"),
        pytest.param("viewer", "POST", "/api/v1/alerts/1/ack", 403, id="viewer-cannot-ack"),
        pytest.param("mlops", "POST", "/api/v1/alerts/1/ack", 403, id="ml-engineer-cannot-ack"),
        pytest.param("operator", "PUT", "/api/v1/shops/shop-z", 403, id="operator-cannot-enroll"),
        pytest.param("admin", "PUT", "/api/v1/shops/shop-z", 200, id="admin-enrolls"),
    ],
)
def test_roles_through_http(app_and_store, user, method, path, status):
    app, _, creds, _ = app_and_store
    client = TestClient(app)
    login(client, user, creds[user])
    r = client.request(method, path, headers={"X-CSRF-Token": csrf_of(client)}, json={"name": "Z"} if method == "PUT" else None)
    assert r.status_code == status, r.text


def test_rollouts_page_shows_controls_only_to_roles_that_may_use_them(app_and_store):
    app, _, creds, _ = app_and_store
    for user, can in (("operator", "no"), ("mlops", "yes")):
        client = TestClient(app)
        login(client, user, creds[user])
        html = client.get("/rollouts").text
        assert f'data-can-rollout="{can}"' in html and 'data-rollouts-api="yes"' in html


def test_api_tokens_authenticate_without_csrf_and_die_when_revoked(app_and_store):
    app, store, _, _ = app_and_store
    token = store.create_token("operator", "automation")
    client = TestClient(app)
    h = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/shops", headers=h).status_code == 200
    assert client.post("/api/v1/alerts/1/ack", headers=h).status_code == 404  # no CSRF needed, past the guard
    store.revoke_token(token)
    assert client.get("/api/v1/shops", headers=h).status_code == 401


def test_one_time_password_must_be_changed_first(app_and_store):
    app, store, _, _ = app_and_store
    store.add_user("newbie", "one-time-pass-123", "operator", must_change_password=True)
    client = TestClient(app)
    r = login(client, "newbie", "one-time-pass-123")
    assert r.status_code == 303
    r = client.get("/fleet", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/account/password"
    assert client.get("/api/v1/shops").status_code == 403
    page = client.get("/account/password").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = client.post("/account/password", data={"csrf_token": token, "new_password": "my own new password",
                                               "confirm": "my own new password"}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/api/v1/shops").status_code == 200
    assert store.verify_password("newbie", "my own new password")


def test_logout_ends_the_session(app_and_store):
    app, _, creds, _ = app_and_store
    client = TestClient(app)
    login(client, "viewer", creds["viewer"])
    csrf = csrf_of(client)
    r = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/api/v1/fleet").status_code == 401


@given(token=st.binary(max_size=40).filter(lambda b: not set(b) & {0, 10, 13}).map(lambda b: b.strip(b" \t")))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_csrf_header_is_refused_cleanly(app_and_store, token):
    app, _, creds, _ = app_and_store
    client = TestClient(app)
    login(client, "operator", creds["operator"])
    r = client.post("/api/v1/alerts/1/ack", headers={"X-CSRF-Token": token})
    assert r.status_code == 403
