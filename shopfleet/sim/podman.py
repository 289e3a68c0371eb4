"""Run a rendered shop's pods with podman: the Kubernetes pod template, translated field by field.

The shop's rendered objects (``shopfleet manifests render``) are the source of truth: every
container gets its command, args, env, volumes, user, groups, capabilities, read-only root and
host network from its pod template. Only what has no podman equivalent is translated, and each
such place says so:

* ``$(VAR)`` in command/args: Kubernetes expands it from the container's env; done here.
* env ``valueFrom``: ``fieldRef`` (``spec.nodeName``, ``metadata.name``, an annotation of the
  pod template) from the node and pod names given and the template; ``configMapKeyRef``/``secretKeyRef`` from the rendered ConfigMaps and the Secrets
  passed in.
* configMap/secret volumes: their keys are written to files under ``workdir`` and bind-mounted
  (with ``subPath`` or ``subPathExpr``, the one entry); hostPath volumes map under ``host_root`` (a scratch "node
  disk", so nothing touches the real /var/lib or /etc); emptyDir becomes a 1777 directory on disk
  (a tmpfs for medium Memory).
* extended resources (``shopfleet.io/shelf-board``, ``shopfleet.io/camera``): a device plugin
  hands the pod a device; here ``devices`` maps the resource to ``(host path, container path)``
  for ``--device`` (a pseudo-terminal is bind-mounted instead: it belongs to the host's devpts).
* initContainers run first, to completion, with their own argv; their image (busybox, which no
  build here can pull) is replaced by ``init_image`` when given (the base image's coreutils
  have the same chown).
* probes have no podman equivalent worth the name (podman's health checks are exec-only): the
  harness polls the same HTTP endpoints itself.

Every container also gets ``--runtime runc`` and explicit nofile/nproc ulimits (this machine's
cgroup layout makes crun and the default ulimits fail) - run options, not pod fields.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

RUN_OPTIONS = ("--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")


class TranslateError(ValueError):
    """A pod field this translator cannot express with podman; the message names it."""


@dataclass
class PodContext:
    """What the node would supply: its name, files, devices and the cluster's objects."""

    node: str
    workdir: Path
    host_root: Path
    configmaps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    images: Mapping[str, str] = field(default_factory=dict)
    """Container name -> local image to run instead of the rendered one (a release's digest is
    pulled by a cluster; here the same build sits in local storage)."""
    devices: Mapping[str, tuple[str, str] | None] = field(default_factory=dict)
    """Extended resource -> (host device, container path) for --device; None: satisfied without
    a device (the harness mounts a stand-in, e.g. a video file for the camera)."""
    extra_mounts: Mapping[str, list[str]] = field(default_factory=dict)
    """Container name -> extra --mount specs (stand-ins for what a device plugin or node provides)."""
    init_image: str | None = None
    add_hosts: Mapping[str, str] = field(default_factory=dict)
    """Service DNS names -> address (cluster DNS has no podman equivalent; --add-host does)."""
    host_ip: str = "127.0.0.1"
    """The node's address, for a fieldRef status.hostIP: every pod here runs on this machine."""
    name_prefix: str = "sf"
    host_network: bool = False
    """Put every pod on the host network: there is no cluster network here, so a pod that would
    have its own gets the host's (its ports must then not collide: the harness picks them)."""
    emptydir_on_disk: bool = False
    """emptyDir volumes as directories under workdir instead of tmpfs, so the harness can read
    what a pod wrote there (the controller's SQLite file)."""
    detach: bool = False
    """Start main containers in the background (-d) instead of --rm in the foreground."""


def _expand(s: str, env: Mapping[str, str]) -> str:
    # Kubernetes leaves an unknown $(VAR) as it is; so does this.
    return _VAR.sub(lambda m: env.get(m[1], m[0]), s)


def _env(c: Mapping[str, Any], pod_name: str, ctx: PodContext, annotations: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            out[name] = _expand(str(e["value"]), out)
            continue
        src = e.get("valueFrom") or {}
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            values = {"spec.nodeName": ctx.node, "status.hostIP": ctx.host_ip, "metadata.name": pod_name}
            ann = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
            if ann:
                values[path] = str(annotations.get(ann[1], ""))
            if path not in values:
                raise TranslateError(f"env {name}: fieldRef {path} is not supported (spec.nodeName, status.hostIP, "
                                     "metadata.name, metadata.annotations['...'] are)")
            out[name] = values[path]
        elif "configMapKeyRef" in src or "secretKeyRef" in src:
            kind, ref = ("configMap", src["configMapKeyRef"]) if "configMapKeyRef" in src else ("secret", src["secretKeyRef"])
            store = ctx.configmaps if kind == "configMap" else ctx.secrets
            try:
                out[name] = store[ref["name"]][ref["key"]]
            except KeyError:
                raise TranslateError(f"env {name}: {kind} {ref['name']} has no key {ref['key']!r}") from None
        else:
            raise TranslateError(f"env {name}: valueFrom {sorted(src)} is not supported")
    return out


def _volume_sources(obj: Mapping[str, Any], spec: Mapping[str, Any], pod_name: str, ctx: PodContext) -> dict[str, tuple[str, Path | str]]:
    """Volume name -> ('bind', host path) or ('tmpfs', options)."""
    out: dict[str, tuple[str, Path | str]] = {}
    fs_group = (spec.get("securityContext") or {}).get("fsGroup")
    # A StatefulSet's claims: a directory of the node root per claim, given to fsGroup like a volume.
    for claim in (obj.get("spec") or {}).get("volumeClaimTemplates") or []:
        d = ctx.host_root / "pvc" / pod_name / claim["metadata"]["name"]
        d.mkdir(parents=True, exist_ok=True)
        if fs_group is not None:
            os.chown(d, -1, int(fs_group))
            os.chmod(d, 0o2775)
        out[claim["metadata"]["name"]] = ("bind", d)
    for v in spec.get("volumes") or []:
        name = v["name"]
        if "hostPath" in v:
            hp = v["hostPath"]
            path = ctx.host_root / hp["path"].lstrip("/")
            if hp.get("type") in ("DirectoryOrCreate", None, "") and not path.exists():
                path.mkdir(parents=True, exist_ok=True)
            elif hp.get("type") in ("File", "Directory") and not path.exists():
                raise TranslateError(f"volume {name}: hostPath {hp['path']} ({hp['type']}) does not exist on the node "
                                     f"(expected at {path})")
            out[name] = ("bind", path)
        elif "configMap" in v or "secret" in v:
            kind = "configMap" if "configMap" in v else "secret"
            src_name = v[kind]["name" if kind == "configMap" else "secretName"]
            data = (ctx.configmaps if kind == "configMap" else ctx.secrets).get(src_name)
            if data is None:
                raise TranslateError(f"volume {name}: {kind} {src_name} is not among those given")
            d = ctx.workdir / pod_name / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            mode = int(v[kind].get("defaultMode", 0o644))
            for key, value in data.items():
                f = d / key
                f.write_text(value)
                os.chmod(f, mode)
                if fs_group is not None:
                    # The kubelet gives volume files to fsGroup: a 0440 Secret is readable by the pod.
                    os.chown(f, -1, int(fs_group))
            out[name] = ("bind", d)
        elif "emptyDir" in v and (ctx.emptydir_on_disk or (v["emptyDir"] or {}).get("medium") != "Memory"):
            # Kubernetes keeps an emptyDir on the node's disk unless medium is Memory, and makes it
            # 0777. (podman's --tmpfs also ignores its mode= over a directory the image has, e.g.
            # Debian mosquitto's /var/log/mosquitto: the broker could not open its log there.)
            d = ctx.workdir / pod_name / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o1777)
            out[name] = ("bind", d)
        elif "emptyDir" in v:
            opts = "rw,mode=1777"
            limit = (v["emptyDir"] or {}).get("sizeLimit")
            if limit:
                opts += f",size={str(limit).lower().replace('mi', 'm').replace('gi', 'g')}"
            out[name] = ("tmpfs", opts)
        else:
            raise TranslateError(f"volume {name}: type {sorted(set(v) - {'name'})} is not supported")
    return out


def container_argv(obj: Mapping[str, Any], container: str, ctx: PodContext, *, init: bool = False) -> list[str]:
    """The ``podman run`` argv of one container of a rendered workload (DaemonSet, Deployment, ...)."""
    template = obj["spec"]["template"] if obj.get("kind") != "Pod" else obj
    spec = template["spec"]
    pod_name = f"{obj['metadata']['name']}-{ctx.node}"
    group = spec.get("initContainers" if init else "containers") or []
    try:
        c = next(x for x in group if x["name"] == container)
    except StopIteration:
        raise TranslateError(f"{obj['kind']} {obj['metadata']['name']} has no {'init ' if init else ''}container {container!r}") from None
    run = ["-d"] if ctx.detach and not init else ["--rm"]
    argv = ["podman", "run", *run, *RUN_OPTIONS, "--name", f"{ctx.name_prefix}-{pod_name}-{container}"]
    if spec.get("hostNetwork") or ctx.host_network:
        argv += ["--network", "host"]
    for host, addr in ctx.add_hosts.items():
        argv += ["--add-host", f"{host}:{addr}"]
    psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is not None:
        argv += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    for g in psc.get("supplementalGroups") or []:
        argv += ["--group-add", str(g)]
    if psc.get("fsGroup") is not None:
        argv += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        # Kubernetes' read-only root has no writable /tmp either: only volumes are writable.
        argv += ["--read-only", "--read-only-tmpfs=false"]
    if csc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        argv += ["--cap-drop", str(cap)]
    for cap in caps.get("add") or []:
        argv += ["--cap-add", str(cap)]
    if csc.get("privileged"):
        argv += ["--privileged"]
    limits = (c.get("resources") or {}).get("limits") or {}
    for res, dev in ctx.devices.items():
        if res in limits and dev is not None:
            if dev[0].startswith("/dev/pts/"):
                # A pseudo-terminal lives in the host's devpts instance; the container mounts its
                # own, where the same major:minor is another (absent) pty, so --device would
                # open nothing (EIO). The host's node itself is bind-mounted instead; runc's
                # default device rules allow ptys (char 136:*).
                argv += ["--mount", f"type=bind,source={dev[0]},destination={dev[1]}"]
            else:
                argv += ["--device", f"{dev[0]}:{dev[1]}"]
    for res in limits:
        if "/" in res and res not in ctx.devices:
            raise TranslateError(f"container {container}: extended resource {res} needs a device (PodContext.devices)")
    env = _env(c, pod_name, ctx, (template.get("metadata") or {}).get("annotations") or {})
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    sources = _volume_sources(obj, spec, pod_name, ctx)
    mounts = c.get("volumeMounts") or []
    # A mount inside another (the server certificate under /etc/shopfleet/pki): the kubelet makes
    # the mount point in the outer volume; a read-only outer bind mount would refuse the mkdir.
    for inner in mounts:
        for outer in mounts:
            kind, src = sources[outer["name"]]
            if inner is not outer and kind == "bind" and not outer.get("subPath") and inner["mountPath"].startswith(outer["mountPath"].rstrip("/") + "/"):
                (Path(src) / inner["mountPath"][len(outer["mountPath"]):].lstrip("/")).mkdir(parents=True, exist_ok=True)
    for m in mounts:
        kind, src = sources[m["name"]]
        if kind == "tmpfs":
            argv += ["--tmpfs", f"{m['mountPath']}:{src}"]
            continue
        sub = m.get("subPath") or (_expand(m["subPathExpr"], env) if m.get("subPathExpr") else None)
        host = Path(src) / sub if sub else Path(src)
        ro = ",ro" if m.get("readOnly") else ""
        argv += ["--mount", f"type=bind,source={host},destination={m['mountPath']}{ro}"]
    for extra in ctx.extra_mounts.get(container, []):
        argv += ["--mount", extra]
    image = ctx.images.get(container, c["image"])
    if init and container not in ctx.images and ctx.init_image:
        image = ctx.init_image
    command = [_expand(s, env) for s in c.get("command") or []]
    args = [_expand(s, env) for s in c.get("args") or []]
    if command:
        argv += ["--entrypoint", command[0]]
        args = command[1:] + args
    return [*argv, image, *args]


def pod_argvs(obj: Mapping[str, Any], ctx: PodContext) -> list[tuple[str, bool, list[str]]]:
    """(container, is_init, argv) of every init container then every container, in pod order."""
    template = obj["spec"]["template"] if obj.get("kind") != "Pod" else obj
    spec = template["spec"]
    out = [(c["name"], True, container_argv(obj, c["name"], ctx, init=True)) for c in spec.get("initContainers") or []]
    out += [(c["name"], False, container_argv(obj, c["name"], ctx)) for c in spec.get("containers") or []]
    return out


def configmaps_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The rendered ConfigMaps' data by name."""
    return {o["metadata"]["name"]: dict(o.get("data") or {}) for o in objects if o.get("kind") == "ConfigMap"}
