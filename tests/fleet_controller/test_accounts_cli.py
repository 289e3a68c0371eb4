"""``shopfleet users`` and ``shopfleet tokens`` against a real database file."""

from __future__ import annotations

import io
import re

import pytest

from fleet_controller.registry.db import create_engine
from fleet_controller.web.accounts.store import AccountStore
from shopfleet.cli import main


@pytest.fixture
def db(tmp_path) -> list[str]:
    return ["--db-url", f"sqlite:///{tmp_path / 'ctl.db'}"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_users_lifecycle(capsys, db):
    code, out, _ = run(capsys, "users", "add", "ana", "--role", "operator", *db)
    assert code == 0 and "one-time password:" in out
    password = re.search(r"one-time password: (\S+)", out).group(1)
    store = AccountStore(create_engine(db[1]))
    assert store.verify_password("ana", password) and store.list_users()[0].must_change_password
    assert run(capsys, "users", "add", "boss", "--role", "admin", *db)[0] == 0
    code, out, _ = run(capsys, "users", "list", *db)
    assert re.search(r"ana\s+operator", out) and re.search(r"boss\s+admin", out)
    assert run(capsys, "users", "set-role", "ana", "ml-engineer", *db)[0] == 0
    assert store.list_users()[0].role.value == "ml-engineer"
    code, _, err = run(capsys, "users", "remove", "boss", *db)
    assert code == 2 and "last admin" in err
    code, _, err = run(capsys, "users", "remove", "nobody", *db)
    assert code == 2 and "no user 'nobody'" in err
    assert run(capsys, "users", "remove", "ana", *db)[0] == 0
    assert [u.username for u in store.list_users()] == ["boss"]
    from fleet_controller.registry.audit import AuditLog, AuditQuery

    audited = [(e.action, e.target, e.via) for e in reversed(AuditLog(store.engine).query(AuditQuery()))]
    assert audited == [("user.create", "ana", "cli"), ("user.create", "boss", "cli"), ("user.role", "ana", "cli"), ("user.remove", "ana", "cli")]
    assert all(e.actor.startswith("cli:") for e in AuditLog(store.engine).query(AuditQuery()))


def test_password_from_stdin(capsys, db, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough secret\n"))
    code, out, _ = run(capsys, "users", "add", "bo", "--role", "viewer", "--password-stdin", *db)
    assert code == 0 and "one-time" not in out
    assert AccountStore(create_engine(db[1])).verify_password("bo", "a long enough secret")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    code, _, err = run(capsys, "users", "add", "cy", "--role", "viewer", "--password-stdin", *db)
    assert code == 2 and "too short" in err


def test_tokens_create_list_revoke(capsys, db):
    run(capsys, "users", "add", "ci", "--role", "ml-engineer", *db)
    code, out, err = run(capsys, "tokens", "create", "--user", "ci", "--name", "pipeline", *db)
    token = out.strip()
    assert code == 0 and token.startswith("sft_") and "shown once" in err
    store = AccountStore(create_engine(db[1]))
    assert store.token_principal(token).username == "ci"
    code, out, _ = run(capsys, "tokens", "list", *db)
    prefix = token.split("_")[1]
    assert prefix in out and "pipeline" in out and token not in out
    assert run(capsys, "tokens", "revoke", prefix, *db)[0] == 0
    assert store.token_principal(token) is None
    code, _, err = run(capsys, "tokens", "revoke", prefix, *db)
    assert code == 2 and "no active token" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["users", "add", "--help"])
    out = capsys.readouterr().out
    for option in ("--role", "--password-stdin", "--db-url", "--config", "--data-dir"):
        assert option in out
    with pytest.raises(SystemExit):
        main(["tokens", "create", "--help"])
    assert "--user" in capsys.readouterr().out


def test_help_works_without_the_database_packages():
    """``shopfleet --help`` on an agent-only machine: SQLAlchemy, Alembic and argon2 are not installed there."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys\n"
        "for m in ('sqlalchemy', 'alembic', 'argon2'): sys.modules[m] = None  # importing them now fails\n"
        "from shopfleet.cli import main\n"
        "sys.exit(main(['--help']))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "users" in proc.stdout and "ModuleNotFoundError" not in proc.stderr
