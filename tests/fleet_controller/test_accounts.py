"""Accounts: roles and route permissions, rate limiting, and the account store on both engines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_controller.web.accounts.ratelimit import LoginRateLimiter
from fleet_controller.web.accounts.roles import (
    Permission,
    Role,
    has_permission,
    parse_role,
    required_permission,
)
from fleet_controller.web.accounts.store import AccountError, AccountStore, sha256_hex
from fleet_controller.web.accounts.web import safe_next
from tests.support.controller import FAST


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(registry) -> AccountStore:
    """An account store on the migrated database of each engine, with a cheap hash and a hand clock."""
    return AccountStore(registry.engine, FAST, clock=Clock())


# ----- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "permission", "allowed"),
    [
        pytest.param(Role.VIEWER, Permission.VIEW, True, id="viewer-views"),
        pytest.param(Role.VIEWER, Permission.ALERTS_ACK, False, id="viewer-cannot-ack"),
        pytest.param(Role.OPERATOR, Permission.ALERTS_ACK, True, id="operator-acks"),
        pytest.param(Role.OPERATOR, Permission.ALERTS_SILENCE, True, id="operator-silences"),
        pytest.param(Role.OPERATOR, Permission.ROLLOUTS, False, id="operator-no-rollouts"),
        pytest.param(Role.OPERATOR, Permission.USERS, False, id="operator-no-users"),
        pytest.param(Role.ML_ENGINEER, Permission.ROLLOUTS, True, id="ml-engineer-rollouts"),
        pytest.param(Role.ML_ENGINEER, Permission.ALERTS_ACK, False, id="ml-engineer-cannot-ack"),
        pytest.param(Role.ADMIN, Permission.USERS, True, id="admin-users"),
        pytest.param(Role.ADMIN, Permission.FLEET_ADMIN, True, id="admin-enrolls"),
    ],
)
def test_role_permissions(role, permission, allowed):
    assert has_permission(role, permission) is allowed


@pytest.mark.parametrize(
    ("method", "path", "permission"),
    [
        pytest.param("GET", "/api/v1/rollouts", Permission.VIEW, id="read-rollouts"),
        pytest.param("HEAD", "/fleet", Permission.VIEW, id="head-page"),
        pytest.param("POST", "/api/v1/rollouts/7/pause", Permission.ROLLOUTS, id="pause-rollout"),
        pytest.param("POST", "/api/v1/releases", Permission.ROLLOUTS, id="create-release"),
        pytest.param("POST", "/api/v1/alerts/3/ack", Permission.ALERTS_ACK, id="ack"),
        pytest.param("DELETE", "/api/v1/tokens/ab", Permission.USERS, id="tokens"),
        pytest.param("PUT", "/api/v1/shops/shop-a", Permission.FLEET_ADMIN, id="enroll-shop-unknown-prefix-needs-admin"),
        pytest.param("POST", "/api/v1/rolloutsx", Permission.FLEET_ADMIN, id="prefix-must-end-at-segment"),
        pytest.param("POST", "/brand-new-route", Permission.FLEET_ADMIN, id="deny-by-default"),
        pytest.param("POST", "/logout", Permission.VIEW, id="logout"),
    ],
)
def test_required_permission(method, path, permission):
    assert required_permission(method, path) == permission


def test_parse_role_names_the_valid_roles():
    assert parse_role("ml-engineer") is Role.ML_ENGINEER
    with pytest.raises(ValueError, match="viewer, auditor, operator, ml-engineer, admin"):
        parse_role("root")


@given(st.text(max_size=60))
def test_safe_next_never_leaves_the_site(value):
    out = safe_next(value)
    assert out.startswith("/") and not out.startswith("//") and "\\" not in out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("/shops/a?x=1", "/shops/a?x=1", id="local"),
        pytest.param("//evil.example/", "/", id="protocol-relative"),
        pytest.param("https://evil.example/", "/", id="absolute"),
        pytest.param("/\\evil.example", "/", id="backslash"),
        pytest.param("/login?next=/x", "/", id="login-loop"),
        pytest.param(None, "/", id="none"),
    ],
)
def test_safe_next_table(value, expected):
    assert safe_next(value) == expected


# ----- rate limiter -------------------------------------------------------------------------------


def test_rate_limiter_blocks_after_failures_and_forgets_after_the_window():
    clock = Clock(0.0)
    rl = LoginRateLimiter(max_failures=3, window_s=60, clock=clock)
    for _ in range(3):
        assert rl.retry_after("user:a") == 0
        rl.failed("user:a")
    assert rl.retry_after("user:a") == pytest.approx(60)
    assert rl.retry_after("user:b") == 0  # other keys are not affected
    clock.t = 30
    assert rl.retry_after("user:a") == pytest.approx(30)
    clock.t = 60.5
    assert rl.retry_after("user:a") == 0


def test_rate_limiter_success_resets():
    rl = LoginRateLimiter(max_failures=2, window_s=60, clock=Clock(0.0))
    rl.failed("k")
    rl.succeeded("k")
    rl.failed("k")
    assert rl.retry_after("k") == 0


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=30))
def test_rate_limiter_never_allows_more_than_max_failures_in_a_window(times):
    clock = Clock(0.0)
    rl = LoginRateLimiter(max_failures=4, window_s=100, clock=clock)
    accepted: list[float] = []
    for t in sorted(times):
        clock.t = t
        if rl.retry_after("k") == 0:
            rl.failed("k")
            accepted.append(t)
    for t in accepted:
        assert sum(1 for a in accepted if t - 100 < a <= t) <= 4


# ----- store on both engines ------------------------------------------------------------------------


def test_users_lifecycle(store):
    store.add_user("ana", "correct horse battery", "operator")
    store.add_user("bo", "correct horse battery", Role.ADMIN)
    assert [(u.username, u.role) for u in store.list_users()] == [("ana", Role.OPERATOR), ("bo", Role.ADMIN)]
    with pytest.raises(AccountError, match="exists"):
        store.add_user("ana", "another long password", "viewer")
    store.set_role("ana", "ml-engineer")
    assert store.list_users()[0].role is Role.ML_ENGINEER
    with pytest.raises(AccountError, match="last admin"):
        store.set_role("bo", "viewer")
    with pytest.raises(AccountError, match="last admin"):
        store.remove_user("bo")
    store.remove_user("ana")
    assert [u.username for u in store.list_users()] == ["bo"]


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        pytest.param("", "long enough pw", "invalid username", id="empty-name"),
        pytest.param("a b", "long enough pw", "invalid username", id="space-in-name"),
        pytest.param("ok", "short", "too short", id="short-password"),
    ],
)
def test_add_user_rejects_bad_input(store, username, password, message):
    with pytest.raises(AccountError, match=message):
        store.add_user(username, password, "viewer")


def test_passwords_are_hashed_with_argon2_and_verified(store):
    store.add_user("ana", "correct horse battery", "viewer")
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from fleet_controller.web.accounts.models import User

    with Session(store.engine) as s:
        stored = s.scalars(select(User.password_hash)).one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert store.verify_password("ana", "correct horse battery")
    assert not store.verify_password("ana", "wrong password!!")
    assert not store.verify_password("nobody", "correct horse battery")


def test_sessions_expire_and_end(store):
    store.add_user("ana", "correct horse battery", "operator")
    sid, csrf = store.create_session("ana", ttl_s=60)
    p = store.session_principal(sid)
    assert p is not None and p.username == "ana" and p.role is Role.OPERATOR and p.csrf_token == csrf
    assert store.session_principal(sid + "x") is None
    store.clock.t += 61
    assert store.session_principal(sid) is None
    sid2, _ = store.create_session("ana")
    store.end_session(sid2)
    assert store.session_principal(sid2) is None


def test_tokens_store_only_a_hash_and_can_be_revoked(store):
    store.add_user("ci-bot", "correct horse battery", "ml-engineer")
    token = store.create_token("ci-bot", "ci")
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from fleet_controller.web.accounts.models import ApiToken

    with Session(store.engine) as s:
        row = s.scalars(select(ApiToken)).one()
    assert row.token_hash == sha256_hex(token) and token not in (row.token_hash, row.prefix, row.name)
    p = store.token_principal(token)
    assert p is not None and p.via == "token" and p.role is Role.ML_ENGINEER
    assert store.list_tokens()[0].last_used_at is not None
    assert store.token_principal(token[:-1] + "x") is None
    store.revoke_token(store.list_tokens()[0].prefix)
    assert store.token_principal(token) is None
    with pytest.raises(AccountError, match="no active token"):
        store.revoke_token(token)


def test_first_start_admin_is_created_once_and_must_change_password(store):
    password = store.ensure_initial_admin()
    assert password and store.verify_password("admin", password)
    assert store.list_users()[0].must_change_password
    assert store.ensure_initial_admin() is None


def test_put_user_creates_then_resets_password_and_role(store):
    store.put_user("olga", "first-password-1", "viewer")
    assert store.verify_password("olga", "first-password-1")
    store.put_user("olga", "second-password-2", Role.OPERATOR)
    assert not store.verify_password("olga", "first-password-1") and store.verify_password("olga", "second-password-2")
    assert [(u.username, u.role) for u in store.list_users()] == [("olga", Role.OPERATOR)]
    with pytest.raises(AccountError):
        store.put_user("olga", "short", "viewer")
    with pytest.raises(ValueError, match="unknown role"):
        store.put_user("bob", "long-enough-password", "wizard")
    assert [(u.username, u.role) for u in store.list_users()] == [("olga", Role.OPERATOR)]  # refused requests changed nothing


def test_set_password_ends_sessions_and_clears_flag(store):
    store.add_user("ana", "correct horse battery", "viewer", must_change_password=True)
    sid, _ = store.create_session("ana")
    store.set_password("ana", "a brand new password")
    assert store.session_principal(sid) is None
    assert not store.list_users()[0].must_change_password
    assert store.verify_password("ana", "a brand new password")


def test_migration_0003_matches_the_models(registry):
    from sqlalchemy import inspect

    from fleet_controller.alerts.models import AlertRecord, Silence
    from fleet_controller.web.accounts.models import ACCOUNT_TABLES

    insp = inspect(registry.engine)
    for table in (*ACCOUNT_TABLES, AlertRecord.__table__, Silence.__table__):
        live = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
        assert live == {c.name: c.nullable for c in table.columns}, table.name
        live_ix = {i["name"] for i in insp.get_indexes(table.name)}
        assert {i.name for i in table.indexes} <= live_ix, table.name


def test_login_backoff_doubles_per_pair_and_forgets():
    from fleet_controller.web.accounts.ratelimit import LoginBackoff

    clock = Clock(0.0)
    b = LoginBackoff(free=2, base_s=1, max_s=8, forget_s=100, max_keys=3, clock=clock)
    b.failed("u|a")
    b.failed("u|a")
    assert b.retry_after("u|a") == 1 and b.retry_after("u|b") == 0
    waits = []
    for _ in range(5):
        clock.t += b.retry_after("u|a")
        b.failed("u|a")
        waits.append(b.retry_after("u|a"))
    assert waits == [2, 4, 8, 8, 8]  # doubling, capped at max_s
    clock.t += 100
    assert b.retry_after("u|a") == 0  # forgotten after forget_s without failures
    for k in ("k1", "k2", "k3", "k4"):
        b.failed(k)
    assert len(b._state) == 3  # bounded
    b.succeeded("k4")
    assert b.retry_after("k4") == 0
