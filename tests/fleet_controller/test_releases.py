"""Releases, signing keys, the release/rollout CLI (over --db and over --api) and the REST API."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect

from fleet_controller.registry.db import Base, create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import RegistryStore
from fleet_controller.rollout.api import build_router
from fleet_controller.rollout.cli import main as cli
from fleet_controller.rollout.releases import (
    ReleaseError,
    ReleaseSpec,
    ReleaseStore,
    model_package_digest,
    parse_image_args,
)
from fleet_controller.rollout.signing import (
    Signer,
    SigningKeyError,
    generate_keypair,
    load_private_key,
)
from shopfleet.broker import free_port
from tests.support.wait import wait_for

DIG = "sha256:" + "9f" * 32


@pytest.fixture
def engine(db_url):
    e = create_engine(db_url)
    upgrade(e)
    yield e
    e.dispose()


def test_migration_matches_the_models(engine):
    insp = inspect(engine)
    for table in ("releases", "rollouts", "rollout_shops", "rollout_events", "shop_desired", "executor_leases"):
        model_cols = {c.name for c in Base.metadata.tables[table].columns}
        db_cols = {c["name"] for c in insp.get_columns(table)}
        assert model_cols == db_cols, table


def test_release_store_is_immutable_and_names_fixes(engine):
    store = ReleaseStore(engine)
    spec = ReleaseSpec(name="2026.11.1", version="2026.11.1", images={"vision": f"ghcr.io/a/vision@{DIG}"})
    store.create(spec)
    with pytest.raises(ReleaseError, match="immutable: pick a new name"):
        store.create(spec)
    assert store.get("2026.11.1") == spec
    with pytest.raises(ReleaseError, match="shopfleet release list"):
        store.get("nope")
    assert [r["name"] for r in store.list()] == ["2026.11.1"]


BAD_SPECS = [
    pytest.param({"images": {"vision": "ghcr.io/a/vision:latest"}}, "pin it by digest", id="tag"),
    pytest.param({"images": {"vision": "ghcr.io/a/vision@sha256:abc"}}, "pin it by digest", id="short-digest"),
    pytest.param({"images": {"Vision!": f"ghcr.io/a/vision@{DIG}"}}, "not a container name", id="bad-component"),
    pytest.param({"name": "Bad Name"}, "name", id="bad-name"),
    pytest.param({"extra": 1}, "extra", id="unknown-field"),
]


@pytest.mark.parametrize("change, message", BAD_SPECS)
def test_release_spec_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        ReleaseSpec.model_validate({"name": "r", "version": "1", **change})


@pytest.mark.parametrize(
    "values, error",
    [
        pytest.param(["vision"], "COMPONENT=REPO@sha256", id="no-equals"),
        pytest.param(["=x"], "COMPONENT=REPO@sha256", id="no-component"),
        pytest.param([f"a=r@{DIG}", f"a=r@{DIG}"], "twice", id="duplicate"),
    ],
)
def test_parse_image_args_errors(values, error):
    with pytest.raises(ReleaseError, match=error):
        parse_image_args(values)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_parse_image_args_is_total(values):
    try:
        out = parse_image_args(values)
    except ReleaseError:
        return
    assert len(out) == len(values)


def test_model_digest_covers_names_and_contents(tmp_path: Path):
    d = tmp_path / "yolo-shop"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"weights")
    (d / "labels.txt").write_text("cola\n")
    a = model_package_digest(d)
    assert a.name == "yolo-shop" and a.size_bytes == 12
    (d / "labels.txt").write_text("cola\nwater\n")
    assert model_package_digest(d).sha256 != a.sha256
    (d / "labels.txt").write_text("cola\n")
    (d / "labels.txt").rename(d / "names.txt")
    assert model_package_digest(d).sha256 != a.sha256  # a rename is a different package
    with pytest.raises(ReleaseError, match="does not exist"):
        model_package_digest(tmp_path / "missing")


def test_keygen_refuses_overwrite_and_loader_names_the_fix(tmp_path: Path):
    kid = generate_keypair(tmp_path / "k.pem")
    assert Signer.from_file(tmp_path / "k.pem").key_id == kid
    with pytest.raises(SigningKeyError, match="--overwrite"):
        generate_keypair(tmp_path / "k.pem")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(SigningKeyError, match="release keygen"):
        load_private_key(tmp_path / "bad.pem")
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_private_key(tmp_path / "none.pem")


def _fleet(engine, n: int = 3) -> None:
    reg = RegistryStore(engine)
    for i in range(n):
        reg.register_shop(f"shop-{i}", region="north")


def test_cli_over_the_database(engine, tmp_path: Path, capsys):
    url = engine.url.render_as_string(hide_password=False)
    _fleet(engine)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.onnx").write_bytes(b"x" * 10)
    assert cli(["release", "keygen", "--out", str(tmp_path / "k.pem")]) == 0
    rc = cli(["release", "create", "--name", "r1", "--version", "1", "--image", f"vision=reg/vision@{DIG}", "--model", str(tmp_path / "model"), "--db", url])
    assert rc == 0 and "release r1 (1): 1 images, model model" in capsys.readouterr().out
    assert cli(["release", "create", "--name", "r2", "--version", "1", "--image", "vision=reg/vision:latest", "--db", url]) == 1
    assert "pin it by digest" in capsys.readouterr().err
    assert cli(["release", "list", "--db", url, "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["r1"]
    policy = tmp_path / "p.yaml"
    policy.write_text("waves: [{name: canary, shops: [shop-1]}, {name: all, percent: 100}]\nbake_time_s: 5\n")
    assert cli(["rollout", "start", "--release", "r1", "--policy", str(policy), "--db", url]) == 0
    out = capsys.readouterr().out
    assert "rollout 1: r1 RUNNING" in out and "wave 0 canary" in out and "0/1 done" in out
    assert cli(["rollout", "pause", "1", "--reason", "lunch", "--db", url]) == 0
    assert "PAUSED (lunch)" in capsys.readouterr().out
    assert cli(["rollout", "pause", "1", "--db", url]) == 1
    assert "'pause' needs it to be running" in capsys.readouterr().err
    assert cli(["rollout", "resume", "1", "--db", url]) == 0
    assert cli(["rollout", "abort", "1", "--db", url]) == 0
    assert "ABORTED" in capsys.readouterr().out
    assert cli(["rollout", "status", "--db", url]) == 0
    assert "aborted" in capsys.readouterr().out
    policy.write_text("bake_tme_s: 5\n")
    assert cli(["rollout", "start", "--release", "r1", "--policy", str(policy), "--db", url]) == 1
    assert "bake_tme_s: unknown key" in capsys.readouterr().err


def test_cli_without_a_controller_says_how_to_name_one(monkeypatch, capsys):
    monkeypatch.delenv("SHOPFLEET_API", raising=False)
    monkeypatch.delenv("SHOPFLEET_DB_URL", raising=False)
    from fleet_controller.rollout import cli as mod

    parser_args = ["rollout", "status"]
    assert mod.main(parser_args) == 1
    assert "--api URL" in capsys.readouterr().err


def _guarded_app(engine, token: str) -> FastAPI:
    def auth(authorization: str = Header("")) -> None:
        if authorization != f"Bearer {token}":
            raise HTTPException(401, "token required")

    app = FastAPI()
    app.include_router(build_router(engine, dependencies=[Depends(auth)]))
    return app


def test_api_routes_and_router_level_dependency(engine):
    _fleet(engine)
    client = TestClient(_guarded_app(engine, "s3cret"))
    assert client.get("/api/v1/releases").status_code == 401
    client.headers["Authorization"] = "Bearer s3cret"
    body = {"name": "r1", "version": "1", "images": {"vision": f"reg/vision@{DIG}"}}
    assert client.post("/api/v1/releases", json=body).status_code == 201
    assert client.post("/api/v1/releases", json=body).status_code == 409
    assert client.post("/api/v1/releases", json={**body, "name": "r2", "images": {"vision": "reg/v:1"}}).status_code == 422
    assert client.get("/api/v1/releases/nope").status_code == 404
    r = client.post("/api/v1/rollouts", json={"release": "r1", "policy": {"bake_time_s": 1}})
    assert r.status_code == 201 and r.json()["waves"][0]["shops"] == 3
    assert client.post("/api/v1/rollouts", json={"release": "r1"}).status_code == 409  # one active rollout
    assert client.post("/api/v1/rollouts", json={"release": "r1", "policy": {"waves": []}}).status_code == 422
    assert client.post("/api/v1/rollouts", json={"release": "zz"}).status_code == 404
    rid = r.json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/pause", json={"reason": "x"}).json()["status"] == "paused"
    assert client.post(f"/api/v1/rollouts/{rid}/pause").status_code == 409
    assert client.post(f"/api/v1/rollouts/{rid}/explode").status_code == 404
    assert client.get(f"/api/v1/rollouts/{rid}").json()["status"] == "paused"
    assert client.get("/api/v1/rollouts/999").status_code == 404
    assert [x["id"] for x in client.get("/api/v1/rollouts").json()] == [rid]


def test_cli_over_the_api(engine, capsys):
    _fleet(engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_guarded_app(engine, "tok"), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_for(lambda: server.started, 10, "the API server to start")
    try:
        api = ["--api", f"http://127.0.0.1:{port}", "--token", "tok"]
        assert cli(["release", "create", "--name", "r1", "--version", "1", "--image", f"vision=reg/vision@{DIG}", *api]) == 0
        assert cli(["rollout", "start", "--release", "r1", *api]) == 0
        assert "rollout 1: r1 RUNNING" in capsys.readouterr().out
        assert cli(["rollout", "status", "1", "--json", *api]) == 0
        assert json.loads(capsys.readouterr().out)["waves"][0]["shops"] == 3
        assert cli(["rollout", "status", "1", "--api", f"http://127.0.0.1:{port}", "--token", "wrong"]) == 1
        assert "401" in capsys.readouterr().err
    finally:
        server.should_exit = True
        t.join(10)
