"""``kubectl shopfleet``: the fleet from a platform engineer's terminal, as a kubectl plugin.

Platform engineers live in kubectl, and the field ships cluster tools as kubectl plugins through
Krew: an executable named ``kubectl-shopfleet`` on ``PATH`` becomes ``kubectl shopfleet``. This
plugin is a thin client of the controller's REST API (never of the database), authenticated with
the user's own API token, so it sees and may do exactly what that user's role allows, and every
action it takes is the API's (guarded, audited) action.

Where to find the controller: ``--server`` or ``SHOPFLEET_SERVER``; the token: ``--token`` or
``SHOPFLEET_TOKEN`` (create one with ``shopfleet tokens create``). It uses only the standard
library, so it runs as a single-file zipapp on any machine with Python 3.11, which is what the
Krew package ships (``scripts/build_kubectl_plugin.py`` builds it and its Krew manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class PluginError(Exception):
    """A failure the user can act on; the message says what to do."""


class Api:
    """The few REST calls the plugin makes, with errors turned into actionable messages."""

    def __init__(self, server: str, token: str, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.server}/api/v1{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Accept": "application/json", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            status, detail = exc.code, _detail(exc.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PluginError(f"cannot reach the controller at {self.server} ({exc}); check --server / SHOPFLEET_SERVER") from None
        if status == 401:
            raise PluginError("the controller refused the token (401): create one with 'shopfleet tokens create' and pass --token or SHOPFLEET_TOKEN")
        if status == 403:
            raise PluginError(f"your role may not do this (403): {detail}")
        raise PluginError(f"{method} {path} failed with HTTP {status}: {detail}")

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, body)


def _detail(raw: bytes) -> str:
    try:
        detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = raw.decode(errors="replace")
    return str(detail)[:300]


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    s = max(0, int(now - ts))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Return rows as kubectl-style columns: upper-case header, two spaces between columns."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


# ---- commands: each returns (rows-as-text, data) so -o json prints the data unchanged ----------


def cmd_status(api: Api, args: argparse.Namespace) -> tuple[str, Any]:
    """Fleet status: one line per shop with node counts by presence."""
    page = api.get(f"/shops?limit={args.limit}")
    rows = []
    for s in page["items"]:
        by = s.get("nodes_by_presence", {})
        rows.append([s["id"], s.get("region", ""), f"{by.get('online', 0)}/{s['nodes']}", by.get("stale", 0),
                     by.get("offline", 0), ",".join(f"{k}={v}" for k, v in sorted(s.get("labels", {}).items()))])
    text = table(rows, ["SHOP", "REGION", "ONLINE", "STALE", "OFFLINE", "LABELS"])
    if page["total"] > len(page["items"]):
        text += f"\n({len(page['items'])} of {page['total']} shops; --limit shows more)"
    return text, page


def cmd_shop(api: Api, args: argparse.Namespace) -> tuple[str, Any]:
    """One shop: its nodes with presence and release, and every pipeline with state and fps."""
    shop = api.get(f"/shops/{args.shop}")
    now = time.time()
    nodes = [[n["node"], n["node_class"], n["arch"], n["presence"], _ago(n["last_seen"], now), n["release"] or "-"]
             for n in shop["nodes"]]
    pipes = []
    for n in shop["nodes"]:
        detail = api.get(f"/shops/{args.shop}/nodes/{n['node']}")
        for name, p in sorted(detail.get("pipelines", {}).items()):
            fps = p.get("fps")
            pipes.append([n["node"], name, p.get("kind", ""), p.get("state", ""), p.get("restarts", 0),
                          "-" if fps is None else f"{fps:.1f}", (p.get("detail") or "")[:60]])
        shop.setdefault("pipelines", {})[n["node"]] = detail.get("pipelines", {})
    text = table(nodes, ["NODE", "CLASS", "ARCH", "PRESENCE", "SEEN", "RELEASE"])
    text += "\n\n" + (table(pipes, ["NODE", "PIPELINE", "KIND", "STATE", "RESTARTS", "FPS", "DETAIL"]) if pipes else "no pipelines reported")
    rs = shop.get("reported_state")
    if rs:
        text += f"\n\nreported state: {rs.get('status')} release {rs.get('release')} revision {rs.get('revision')}"
    return text, shop


def _rollout_text(r: dict[str, Any]) -> str:
    head = f"rollout {r['id']}  release {r['release']}  {r['status']}" + (f"  ({r['reason']})" if r.get("reason") else "")
    waves = table([[w["index"], w["name"], f"{w['done']}/{w['shops']}",
                    ",".join(f"{k}={v}" for k, v in sorted(w["states"].items()))] for w in r["waves"]],
                  ["WAVE", "NAME", "DONE", "STATES"])
    text = f"{head}\n{waves}"
    if r.get("problem_shops"):
        text += "\n\nproblem shops:\n" + "\n".join(f"  {p['shop']}: {p['reason']}" for p in r["problem_shops"])
    return text


def cmd_rollout_list(api: Api, args: argparse.Namespace) -> tuple[str, Any]:
    """The newest rollouts."""
    rows = api.get(f"/rollouts?limit={args.limit}")
    return table([[r["id"], r["release"], r["status"], r.get("reason", "")[:60]] for r in rows],
                 ["ID", "RELEASE", "STATUS", "REASON"]), rows


def cmd_rollout_status(api: Api, args: argparse.Namespace) -> tuple[str, Any]:
    """One rollout with progress per wave and the shops in trouble."""
    r = api.get(f"/rollouts/{args.id}")
    return _rollout_text(r), r


def _action(action: str) -> Callable[[Api, argparse.Namespace], tuple[str, Any]]:
    def run(api: Api, args: argparse.Namespace) -> tuple[str, Any]:
        body = {"reason": args.reason or f"{action} via kubectl shopfleet"}
        scope = ""
        if action in ("abort", "rollback"):  # the API acts only on the scope it showed (its token)
            shown = api.get(f"/rollouts/{args.id}/{action}/scope")
            body["confirm"], scope = shown["token"], shown["scope"] + "\n"
        r = api.post(f"/rollouts/{args.id}/{action}", body)
        return f"{scope}rollout {args.id}: {action} requested\n" + _rollout_text(r), r

    run.__doc__ = f"Request '{action}' of a rollout (the controller's executor carries it out)."
    return run


def build_parser() -> argparse.ArgumentParser:
    """Return the plugin's argument parser (also used by the docs test)."""
    p = argparse.ArgumentParser(
        prog="kubectl shopfleet",
        description="The shopfleet fleet from kubectl: fleet status, a shop's nodes and pipelines, rollouts. "
        "A client of the controller's REST API, authenticated with your API token.",
        epilog="Environment: SHOPFLEET_SERVER (controller URL), SHOPFLEET_TOKEN (API token from 'shopfleet tokens create').",
    )
    p.add_argument("--server", default=os.environ.get("SHOPFLEET_SERVER"), help="controller URL, e.g. https://fleet.example (default: $SHOPFLEET_SERVER)")
    p.add_argument("--token", default=os.environ.get("SHOPFLEET_TOKEN"), help="API token (default: $SHOPFLEET_TOKEN)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the controller (default: 10)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="fleet status: shops with nodes online, stale, offline")
    s.add_argument("--limit", type=int, default=500, help="at most this many shops (default: 500)")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("shop", help="one shop: nodes, pipelines, reported state")
    s.add_argument("shop", help="shop id")
    s.set_defaults(func=cmd_shop)
    r = sub.add_parser("rollout", help="list rollouts, show one, pause, resume, abort or roll back")
    rsub = r.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    s = rsub.add_parser("list", help="the newest rollouts")
    s.add_argument("--limit", type=int, default=20, help="how many (default: 20)")
    s.set_defaults(func=cmd_rollout_list)
    s = rsub.add_parser("status", help="one rollout's waves and problem shops")
    s.add_argument("id", type=int, help="rollout id")
    s.set_defaults(func=cmd_rollout_status)
    for action, what in (("pause", "hold new waves"), ("resume", "continue a paused rollout"),
                         ("abort", "stop it; shops keep what they run"), ("rollback", "put every touched shop back on its previous release")):
        s = rsub.add_parser(action, help=what)
        s.add_argument("id", type=int, help="rollout id")
        s.add_argument("--reason", default="", help="why, recorded with the action")
        if action == "rollback":
            s.add_argument("--yes", action="store_true", help="confirm: a rollback changes every shop the rollout touched")
        s.set_defaults(func=_action(action))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the plugin; return the exit code (0 ok, 1 failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    if not args.server:
        print("error: no controller URL: pass --server or set SHOPFLEET_SERVER", file=sys.stderr)
        return EXIT_USAGE
    if not args.server.startswith(("http://", "https://")):
        print(f"error: --server {args.server!r} is not an http:// or https:// URL", file=sys.stderr)
        return EXIT_USAGE
    if not args.token:
        print("error: no API token: pass --token or set SHOPFLEET_TOKEN (create one with 'shopfleet tokens create')", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "rollout_command", None) == "rollback" and not args.yes:
        print(f"error: rolling back rollout {args.id} changes every shop it touched; add --yes to confirm", file=sys.stderr)
        return EXIT_USAGE
    api = Api(args.server, args.token, args.timeout)
    try:
        text, data = args.func(api, args)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(data, indent=2, sort_keys=True) if args.output == "json" else text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
