"""The controller's side of model delivery: storing packages, the model token, the archive route with ranges."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from edge_agent.apply.model_fetch import package_digest
from fleet_controller.rollout.models_store import (
    CHUNK_BYTES,
    TOKEN_PREFIX,
    ModelStore,
    archive_bytes_of,
    check_token,
    make_token,
    token_payload,
)
from fleet_controller.rollout.releases import (
    ReleaseError,
    ReleaseSpec,
    ReleaseStore,
    desired_state_for,
    model_package_digest,
    store_model,
)
from fleet_controller.rollout.signing import Signer, generate_keypair
from tests.support.models import ModelApi, make_package

SHOP = "berlin-01"
DIG = "sha256:" + "9f" * 32


@pytest.fixture
def api(tmp_path: Path):
    a = ModelApi(tmp_path)
    yield a
    a.stop()


def _token(api: ModelApi, sha: str, shop: str = SHOP, exp: float | None = None, signer: Signer | None = None) -> str:
    payload = token_payload(shop, sha, time.time() + 3600 if exp is None else exp)
    return make_token(payload, (signer or api.signer).sign_bytes(TOKEN_PREFIX + payload))


def test_agent_and_controller_compute_the_same_package_digest(tmp_path: Path):
    d = make_package(tmp_path)
    (d / "sub").mkdir()
    (d / "sub" / "labels.txt").write_text("person\n")
    assert package_digest(d) == model_package_digest(d).sha256


def test_store_is_content_addressed_and_the_archive_deterministic(tmp_path: Path, api: ModelApi):
    d = make_package(tmp_path, size=CHUNK_BYTES * 2 + 12345)  # three stored rows
    ref = store_model(api.engine, d)
    assert ref.sha256 == model_package_digest(d).sha256
    archive = archive_bytes_of(d)
    assert (ref.archive_bytes, ref.archive_sha256) == (len(archive), hashlib.sha256(archive).hexdigest())
    assert store_model(api.engine, d) == ref  # storing again is a no-op
    store = ModelStore(api.engine)
    across = b"".join(store.read(ref.sha256, CHUNK_BYTES - 10, CHUNK_BYTES + 9))  # a range across two rows
    assert across == archive[CHUNK_BYTES - 10:CHUNK_BYTES + 10]


def test_a_release_naming_an_unstored_package_is_refused(tmp_path: Path, api: ModelApi):
    ref = store_model(api.engine, make_package(tmp_path))
    releases = ReleaseStore(api.engine)
    forged = ref.model_copy(update={"archive_sha256": "0" * 64})
    with pytest.raises(ReleaseError, match="not stored on the controller"):
        releases.create(ReleaseSpec(name="r1", version="1", model=forged))
    releases.create(ReleaseSpec(name="r1", version="1", model=ref))
    assert releases.get("r1").model == ref


def test_upload_needs_a_login_and_download_needs_the_model_token(tmp_path: Path, api: ModelApi):
    d = make_package(tmp_path)
    archive = archive_bytes_of(d)
    with httpx.Client(base_url=api.url) as c:
        assert c.post("/api/v1/models", params={"name": "x"}, content=archive).status_code == 401  # no login
        user = {"Authorization": f"Bearer {api.user_token}"}
        r = c.post("/api/v1/models", params={"name": d.name}, content=archive, headers=user)
        assert r.status_code == 201, r.text
        ref = r.json()
        assert ref["sha256"] == model_package_digest(d).sha256 and ref["archive_sha256"] == hashlib.sha256(archive).hexdigest()
        assert [m["sha256"] for m in c.get("/api/v1/models", headers=user).json()] == [ref["sha256"]]
        bad = c.post("/api/v1/models", params={"name": "x"}, content=b"not a tar", headers=user)
        assert bad.status_code == 422 and "tar" in bad.json()["detail"]

        url = f"/api/v1/models/{ref['sha256']}/archive"
        assert c.get(url).status_code == 401
        assert c.get(url, headers=user).status_code == 403  # a user's API token is not a model token
        generate_keypair(tmp_path / "other.pem")
        for token, reason in (
            (_token(api, ref["sha256"], signer=Signer.from_file(tmp_path / "other.pem")), "forged"),
            (_token(api, "ab" * 32), "wrong_package"),
            (_token(api, ref["sha256"], exp=time.time() - 1), "expired"),
        ):
            r = c.get(url, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 403 and r.json()["detail"].startswith(reason), r.text
            assert api.metric("shopfleet_controller_model_downloads_refused_total", reason=reason) == 1

        auth = {"Authorization": f"Bearer {_token(api, ref['sha256'])}"}
        full = c.get(url, headers=auth)
        assert full.status_code == 200 and full.content == archive and full.headers["etag"] == f'"{ref["archive_sha256"]}"'
        part = c.get(url, headers={**auth, "Range": "bytes=1000-"})
        assert part.status_code == 206 and part.content == archive[1000:]
        assert part.headers["content-range"] == f"bytes 1000-{len(archive) - 1}/{len(archive)}"
        assert c.get(url, headers={**auth, "Range": "bytes=10-19"}).content == archive[10:20]
        assert c.get(url, headers={**auth, "Range": "bytes=-16"}).content == archive[-16:]
        r = c.get(url, headers={**auth, "Range": f"bytes={len(archive)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(archive)}"
        head = c.head(url, headers=auth)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(archive) and not head.content
        missing = "cd" * 32
        r = c.get(f"/api/v1/models/{missing}/archive", headers={"Authorization": f"Bearer {_token(api, missing)}"})
        assert r.status_code == 404
    assert api.metric("shopfleet_controller_model_bytes_served_total") == 2 * len(archive) - 1000 + 10 + 16


def test_desired_state_carries_a_token_for_its_shop_and_package_only(tmp_path: Path, api: ModelApi):
    ref = store_model(api.engine, make_package(tmp_path))
    spec = ReleaseSpec(name="r1", version="1", images={"vision": f"reg.example/vision@{DIG}"}, model=ref)
    state = desired_state_for(SHOP, spec, 1, api.signer, node_classes=frozenset({"pi"}))
    assert state.model is not None and {k: state.model[k] for k in ref.model_dump()} == ref.model_dump()
    pub = [serialization.load_pem_public_key(api.public_key_file.read_bytes())]
    assert check_token(state.model["token"], ref.sha256, pub) == SHOP
    vision = next(o for o in state.objects if o["metadata"]["name"] == "vision-arm64")
    assert vision["spec"]["template"]["metadata"]["annotations"]["shopfleet.io/model-sha256"] == ref.sha256
    # A desired-state signature is no token (domain separation), and a package without an archive gets none.
    assert state.signature is not None
    fake = make_token(token_payload(SHOP, ref.sha256, time.time() + 60), base64.b64decode(state.signature.sig))
    with pytest.raises(ValueError, match="forged"):
        check_token(fake, ref.sha256, pub)
    bare = spec.model_copy(update={"model": ref.model_copy(update={"archive_sha256": None})})
    assert "token" not in (desired_state_for(SHOP, bare, 2, api.signer).model or {})


def test_a_model_change_alone_changes_only_the_vision_pod_templates(tmp_path: Path, api: ModelApi):
    a = store_model(api.engine, make_package(tmp_path / "a", seed=1))
    b = store_model(api.engine, make_package(tmp_path / "b", seed=2))
    images = {"vision": f"reg.example/vision@{DIG}"}
    sa = desired_state_for(SHOP, ReleaseSpec(name="r", version="1", images=images, model=a), 1, api.signer)
    sb = desired_state_for(SHOP, ReleaseSpec(name="r", version="1", images=images, model=b), 1, api.signer)
    changed = [o["metadata"]["name"] for o, p in zip(sa.objects, sb.objects, strict=True) if o != p]
    assert changed == ["vision-arm64", "vision-gpu"]
    for o in sb.objects:
        if o["metadata"]["name"] in changed:
            c = o["spec"]["template"]["spec"]["containers"][0]
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/opt/shopfleet/model")
            assert mount["subPathExpr"] == "$(SHOPFLEET_MODEL_SHA256)" and mount["readOnly"] is True
            assert o["spec"]["template"]["metadata"]["annotations"]["shopfleet.io/model-sha256"] == b.sha256
    # The model-stage init container runs the release's vision build, like the vision container.
    vision = next(o for o in sb.objects if o["metadata"]["name"] == "vision-arm64")["spec"]["template"]["spec"]
    stage = next(c for c in vision["initContainers"] if c["name"] == "model-stage")
    assert stage["image"] == vision["containers"][0]["image"] == images["vision"]


def test_cli_release_create_uploads_the_model_through_the_api(tmp_path: Path, api: ModelApi):
    d = make_package(tmp_path)
    env = {"SHOPFLEET_TOKEN": api.user_token, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "shopfleet", "release", "create", "--name", "m1", "--version", "1", "--model", str(d),
                           "--api", api.url, "--json"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    rel = ReleaseStore(api.engine).get("m1")
    assert rel.model is not None and rel.model.sha256 == model_package_digest(d).sha256
    assert ModelStore(api.engine).get(rel.model.sha256) is not None


def test_store_round_trip_on_each_engine(tmp_path: Path, db_url: str):
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.migrations import upgrade

    engine = create_engine(db_url)
    upgrade(engine)
    try:
        d = make_package(tmp_path, size=CHUNK_BYTES + 100)
        ref = store_model(engine, d)
        archive = archive_bytes_of(d)
        assert b"".join(ModelStore(engine).read(ref.sha256, 0, len(archive) - 1)) == archive
        ModelStore(engine).delete(ref.sha256)
        assert ModelStore(engine).get(ref.sha256) is None
    finally:
        engine.dispose()
