"""The one images/Containerfile and the roles scripts/build_images.py builds from it, checked without building.

Each image's uid (the Containerfile's ``USER``, from the build argument ``USER_ID``) is the
``runAsUser``/``runAsGroup`` its containers run with in the manifests; the script passes every
build argument the Containerfile requires, and only ones it declares; the import checks are
Python. The images themselves are built by ``make images`` and run by test_shop_in_a_box.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.manifests import support as s
from tests.support.images import build_images_module, containerfile_args

BI = build_images_module()
SPECS = {spec.name: spec for spec in BI.IMAGES}


def _containers_by_image() -> dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]]:
    out: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    for obj, spec in s.workloads(s.all_objects()):
        for c in spec["containers"]:  # init containers may run as another uid (model-stage does)
            if c["image"].startswith(s.SHOPFLEET_IMAGES):
                name = c["image"][len(s.SHOPFLEET_IMAGES):].split("@")[0].split(":")[0]
                out.setdefault(name, []).append((f"{obj['metadata']['name']}/{c['name']}", spec, c))
    return out


CONTAINERS = _containers_by_image()


def test_every_manifest_image_is_built_and_every_built_image_runs_somewhere():
    assert sorted(CONTAINERS) == sorted(SPECS)


# Containers that deliberately run an image under another pod's uid, and why.
OTHER_UID = {
    # 'shopfleet broker-denials' reads and truncates the log Mosquitto writes as its own user.
    "mosquitto/denials": 1883,
    # fusion runs the vision image (it needs numpy, no GPU) as a fleet node of its own, with its own
    # state directory and password files on the GPU node: a uid apart from the camera's (docs/manifests.md).
    "fusion/fusion": 10005,
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_image_runs_as_its_pods_uid(name):
    spec = SPECS[name]
    for where, pod, c in CONTAINERS[name]:
        ctx = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
        uid = OTHER_UID.get(where, spec.uid)
        assert (ctx.get("runAsUser"), ctx.get("runAsGroup")) == (uid, uid), (
            f"{where} runs as {ctx.get('runAsUser')}:{ctx.get('runAsGroup')}, the {name} image as {spec.uid}:{spec.uid}")


def test_the_script_passes_exactly_the_build_arguments_the_containerfile_takes():
    declared = containerfile_args(BI.CONTAINERFILE)
    required = {k for k, default in declared.items() if default is None}
    assert required == {"TITLE", "USER_ID", "IMPORT_CHECK"}, "a required ARG without its guard in the app stage"
    text = BI.CONTAINERFILE.read_text()
    for arg in required:
        assert f"${{{arg}:?" in text, f"{arg}: a build without it must stop with a message naming it"
    for spec in BI.IMAGES:
        passed = set(spec.build_args()) | {"ARCH", "PIP_CERT"}
        assert required <= passed and passed <= set(declared), (spec.name, passed ^ set(declared))
        assert all(v or k == "DROP" for k, v in spec.build_args().items()), spec.name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_titles_and_checks(name):
    spec = SPECS[name]
    args = spec.build_args()
    assert args["TITLE"] == f"shopfleet-{name}" and args["USER_ID"] == str(spec.uid)
    assert '"' not in spec.build_check, "IMPORT_CHECK is expanded inside double quotes in the RUN line"
    compile(spec.build_check, f"{name} build check", "exec")
    compile(spec.check, f"{name} check", "exec")
    assert spec.build_check.startswith("import shopfleet.cli"), "every image runs the shopfleet CLI"
