"""The console's routes: pages, the writes an admin (or operator) makes from them, and the
server-sent event stream that keeps the counts live.

Every page needs a session (`session.Sessions`); without one a page redirects to the
sign-in form and a write or the event stream answers 401. A write needs the session's
CSRF token and a role that may make the API call it stands for (`roles.refusal` decides
for both, from the API path), and is recorded in the audit log under the signed-in
name, "via console"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from server_stub.console import HERE
from server_stub.console.fleet import DEVICE_STATES, FleetView
from server_stub.console.plot import timeline_svg
from server_stub.console.session import COOKIE, LOGIN_COOKIE, Session, Sessions, csrf_ok
from server_stub.db import TRANSIENT_ERRORS
from server_stub.explain import render_explain
from server_stub.roles import Principals, Role, refusal
from server_stub.service import NotFound, OperationError, Service
from server_stub.service.unit_of_work import CURRENT_ACTOR, Actor

log = logging.getLogger("addin_server.console")

PAGE_SIZE = 200
"""Rows per page in long lists (an add-in's devices, users): a page stays small with 10,000."""
IDLE_AFTER = 300.0
"""Seconds without a console request after which counting stops (a server nobody watches
does no console work)."""
REFRESH_EVERY = 1.0
FIRST_COUNT_WAIT = 0.1
"""How long a page waits for the very first count before it renders without it."""
KEEPALIVE_EVERY = 15.0
RECENT_ROLLOUT = 600.0
"""Seconds after its last advance that an ended rollout's ring counts stay live."""


def _time(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


class _NoSession(Exception):
    pass


class Console:
    def __init__(self, service: Service, principals: Principals, *, https: bool) -> None:
        self.service = service
        self.sessions = Sessions(principals, https=https)
        self.fleet = FleetView(service.database, service.tenant)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters["time"] = _time
        env.filters["ago"] = _ago
        env.globals["STATES"] = DEVICE_STATES
        self._task: asyncio.Task[None] | None = None
        self._counted = asyncio.Event()
        self._last_request = 0.0

    # -- counting while someone watches ------------------------------------------------------

    async def _touch(self) -> None:
        self._last_request = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh_loop())
        if self.fleet.snapshot is None:
            # The first count after a start reads every report (~1.5 s with 10,000): the
            # page does not wait for it; its counts arrive by the event stream.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._counted.wait(), FIRST_COUNT_WAIT)

    async def _refresh_loop(self) -> None:
        while time.monotonic() - self._last_request < IDLE_AFTER:
            try:
                await self.fleet.refresh()
                self._counted.set()
            except TRANSIENT_ERRORS as e:  # a busy database: the next round reads it
                log.warning("console counts not refreshed: %s", e)
            await asyncio.sleep(REFRESH_EVERY)

    # -- sessions and rendering --------------------------------------------------------------

    def _session(self, request: Request) -> tuple[str, Session]:
        sid = request.cookies.get(COOKIE)
        session = self.sessions.get(sid)
        if sid is None or session is None:
            raise _NoSession()
        return sid, session

    def _page(self, request: Request, name: str, session: Session, **ctx: Any) -> HTMLResponse:
        ctx.update(
            request=request,
            me=session.principal,
            csrf=session.csrf,
            may_admin=session.principal.role is Role.ADMIN,
            may_rollout=session.principal.role in (Role.ADMIN, Role.OPERATOR),
            now=time.time(),
        )
        response = self.templates.TemplateResponse(request, name, ctx)
        response.headers["cache-control"] = "no-store"
        return response

    async def _view(
        self,
        request: Request,
        render: Callable[[Session], Awaitable[Response]],
    ) -> Response:
        try:
            _, session = self._session(request)
        except _NoSession:
            target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
            return RedirectResponse(f"/console/login?next={target}", status_code=303)
        await self._touch()
        try:
            return await render(session)
        except OperationError as e:
            return self._page(request, "error.html", session, message=e.message, status=e.status)

    def _flash(self, message: str, status: int = 200, ok: bool = True) -> HTMLResponse:
        cls = "flash ok" if ok else "flash refused"
        from html import escape

        return HTMLResponse(f'<div class="{cls}" role="status">{escape(message)}</div>', status)

    async def _form(self, request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def _cross_site(self, request: Request) -> bool:
        """A browser names the page a write comes from: refuse one from another origin
        (besides the CSRF token, which another site cannot read)."""
        origin = request.headers.get("origin")
        if origin is None:
            return False
        return origin != f"{request.url.scheme}://{request.headers.get('host', '')}"

    async def _write(
        self,
        request: Request,
        api_path: str,
        op: Callable[[dict[str, str]], Awaitable[str]],
    ) -> Response:
        """A write from a console page: session, CSRF token, the role's right to POST
        `api_path`, then `op` under the signed-in actor. Answers a fragment for htmx."""
        try:
            _, session = self._session(request)
        except _NoSession:
            return self._flash("not signed in (or the session expired): sign in again", 401, False)
        form = await self._form(request)
        given = request.headers.get("x-csrf-token") or form.get("csrf")
        if self._cross_site(request) or not csrf_ok(session.csrf, given):
            return self._flash(
                "refused: this request does not carry the console's CSRF token "
                "(reload the page and try again)",
                403,
                False,
            )
        why = refusal(session.principal, "POST", api_path)
        if why is not None:
            return self._flash(f"refused: {why}", 403, False)
        p = session.principal
        token = CURRENT_ACTOR.set(Actor(p.name, p.role.value, "console"))
        try:
            message = await op(form)
        except OperationError as e:
            return self._flash(f"refused: {e.message}", e.status, False)
        except TRANSIENT_ERRORS as e:
            return self._flash(f"the database could not be written ({e}); nothing changed", 503, False)
        finally:
            CURRENT_ACTOR.reset(token)
        await self.fleet.refresh()
        return self._flash(message)

    # -- routes ------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        r = APIRouter(include_in_schema=False)
        service, fleet = self.service, self.fleet

        @r.get("/console")
        async def home() -> Response:
            return RedirectResponse("/console/addins", status_code=303)

        @r.get("/console/login")
        async def login_form(request: Request, next: str = "/console/addins") -> Response:
            nonce = self._login_nonce()
            response = self.templates.TemplateResponse(
                request, "login.html", {"nonce": nonce, "next": _local(next), "error": None}
            )
            response.headers["set-cookie"] = self.sessions.cookie(LOGIN_COOKIE, nonce, 600)
            return response

        @r.post("/console/login")
        async def login(request: Request) -> Response:
            form = await self._form(request)
            nonce = request.cookies.get(LOGIN_COOKIE, "")
            next_page = _local(form.get("next", "/console/addins"))
            error = None
            signed = None
            if self._cross_site(request) or not csrf_ok(nonce, form.get("nonce")):
                error = "The sign-in form expired or came from another site: try again."
            else:
                signed = self.sessions.sign_in(form.get("token", ""))
                if signed is None:
                    error = "That token is not one this server accepts."
            if signed is None:
                fresh = self._login_nonce()
                response: Response = self.templates.TemplateResponse(
                    request,
                    "login.html",
                    {"nonce": fresh, "next": next_page, "error": error},
                    status_code=401,
                )
                response.headers["set-cookie"] = self.sessions.cookie(LOGIN_COOKIE, fresh, 600)
                return response
            sid, _ = signed
            response = RedirectResponse(next_page, status_code=303)
            response.headers.append("set-cookie", self.sessions.cookie(COOKIE, sid))
            response.headers.append("set-cookie", self.sessions.cookie(LOGIN_COOKIE, "", 0))
            return response

        @r.post("/console/logout")
        async def logout(request: Request) -> Response:
            sid = request.cookies.get(COOKIE)
            session = self.sessions.get(sid)
            form = await self._form(request)
            if session is not None and csrf_ok(session.csrf, form.get("csrf")):
                self.sessions.sign_out(sid)
            response = RedirectResponse("/console/login", status_code=303)
            response.headers["set-cookie"] = self.sessions.cookie(COOKIE, "", 0)
            return response

        @r.get("/console/addins")
        async def addins(request: Request) -> Response:
            async def render(session: Session) -> Response:
                d = fleet.directory
                rows = sorted(d.addins.values(), key=lambda a: a.name.lower()) if d else []
                return self._page(request, "addins.html", session, addins=rows,
                                  counts=fleet.counts(), devices=len(fleet.devices),
                                  rollouts=await self._active_rollouts())  # fmt: skip

            return await self._view(request, render)

        @r.get("/console/addins/{addin_id}")
        async def addin(
            request: Request, addin_id: str, state: str | None = None, page: int = 0
        ) -> Response:
            async def render(session: Session) -> Response:
                a = await service.get_addin(addin_id)
                aid = a["addin_id"]
                chosen = state if state in DEVICE_STATES else None
                total, devices = fleet.devices_of(aid, chosen, max(0, page) * PAGE_SIZE, PAGE_SIZE)
                marks = [
                    (e["at"], f"r{e['revision']} {e['operation']} by {e['actor']}")
                    for e in await service.audit.entries(limit=200)
                    if aid in (e["detail"].get("id"), e["detail"].get("addin_id"), e["detail"].get("addin"))
                ]
                rollouts = await self._rollouts_of(aid)
                for ro in rollouts:
                    marks += [(e["at"], f"r{e.get('revision', '')} rollout {ro['id']} {e['event']} "
                                        f"{e.get('ring') or ''} by {e.get('actor', '')}")
                              for e in ro["history"]]  # fmt: skip
                    ro["ring_counts"] = fleet.rollout_rings(
                        aid, [(x["name"], x["targets"]) for x in ro["rings"]], ro["version"]
                    )
                versions = [
                    str(v[0]) for v in await service.database.rows(
                        "SELECT version FROM addin_versions WHERE addin_id=? ORDER BY added_revision",
                        (aid,),
                    )
                ]  # fmt: skip
                svg = timeline_svg(list(fleet.timeline.get(aid, ())), marks, time.time())
                return self._page(
                    request, "addin.html", session, a=a, counts=fleet.counts().get(aid, {}),
                    devices=devices, total=total, state=chosen, page=max(0, page),
                    pages=max(1, -(-total // PAGE_SIZE)), failures=fleet.failures(aid),
                    timeline=svg, rollouts=rollouts, versions=versions,
                    exceptions=await self._exceptions(aid),
                )  # fmt: skip

            return await self._view(request, render)

        def addin_action(action: str, verb: str) -> None:
            async def handler(request: Request, addin_id: str) -> Response:
                async def op(form: dict[str, str]) -> str:
                    if action in ("enable", "disable"):
                        res = await service.set_enabled(addin_id, action == "enable")
                    elif action == "consent":
                        res = await service.consent(addin_id)
                    elif action == "assign":
                        res = await service.assign(addin_id, form.get("target", ""),
                                                   form.get("target_id") or None,
                                                   form.get("mode", ""))  # fmt: skip
                    else:
                        res = await service.unassign(addin_id, form.get("target", ""),
                                                     form.get("target_id") or None)  # fmt: skip
                    return f"{verb} {addin_id}: revision {res['revision']}"

                return await self._write(request, f"/v1/addins/{addin_id}/{action}", op)

            r.add_api_route(f"/console/addins/{{addin_id}}/{action}", handler, methods=["POST"])

        for action, verb in (("enable", "turned on"), ("disable", "turned off"),
                             ("consent", "consented to"), ("assign", "assigned"),
                             ("unassign", "unassigned")):  # fmt: skip
            addin_action(action, verb)

        def start_rollout(kind: str) -> None:
            async def handler(request: Request, addin_id: str) -> Response:
                async def op(form: dict[str, str]) -> str:
                    rings = form.get("rings", "").split()
                    res = await service.rollouts.start(
                        addin_id, form.get("version", ""), rings, form.get("gate") or None,
                        rollback=kind == "rollback",
                    )
                    what = "rollback to" if kind == "rollback" else "rollout of"
                    return (f"rollout {res['rollout_id']}: {what} {res['version']} started, "
                            f"{res['state']}: revision {res['revision']}")  # fmt: skip

                return await self._write(request, "/v1/rollouts", op)

            r.add_api_route(f"/console/addins/{{addin_id}}/{kind}", handler, methods=["POST"])

        start_rollout("rollout")
        start_rollout("rollback")

        def rollout_action(action: str) -> None:
            async def handler(request: Request, rollout_id: int) -> Response:
                async def op(_: dict[str, str]) -> str:
                    if action == "advance":
                        res = await service.rollouts.advance(rollout_id)
                    else:
                        res = await service.rollouts.set_state(rollout_id, action)
                    return (f"rollout {rollout_id}: {action}, now {res['state']} at ring "
                            f"{res['current_ring']}: revision {res['revision']}")  # fmt: skip

                return await self._write(request, f"/v1/rollouts/{rollout_id}/{action}", op)

            r.add_api_route(f"/console/rollouts/{{rollout_id}}/{action}", handler, methods=["POST"])

        for action in ("advance", "pause", "resume", "abort"):
            rollout_action(action)

        @r.get("/console/users")
        async def users(request: Request, q: str = "", page: int = 0) -> Response:
            async def render(session: Session) -> Response:
                like = f"%{q}%"
                rows = await service.database.rows(
                    "SELECT id, name FROM users WHERE id LIKE ? OR name LIKE ? ORDER BY id "
                    "LIMIT ? OFFSET ?",
                    (like, like, PAGE_SIZE, max(0, page) * PAGE_SIZE),
                )
                total = (await service.database.rows(
                    "SELECT count(*) FROM users WHERE id LIKE ? OR name LIKE ?", (like, like)
                ))[0][0]  # fmt: skip
                per_user = fleet.snapshot.devices_of_user if fleet.snapshot else {}
                found = [
                    {"id": u[0], "name": u[1], "devices": len(per_user.get(u[0], []))}
                    for u in rows
                ]
                return self._page(request, "users.html", session, users=found, q=q,
                                  total=total, page=max(0, page),
                                  pages=max(1, -(-total // PAGE_SIZE)))  # fmt: skip

            return await self._view(request, render)

        @r.get("/console/users/{user_id}")
        async def user(request: Request, user_id: str, addin: str = "") -> Response:
            async def render(session: Session) -> Response:
                u = await service.get_user(user_id)
                devices = fleet.devices_of_user(user_id)
                explained = render_explain(await service.explain(user_id, addin)) if addin else None
                names = sorted((a.name, a.addin_id) for a in fleet.directory.addins.values()) if fleet.directory else []
                return self._page(request, "user.html", session, u=u, devices=devices,
                                  addins=names, addin=addin, explained=explained,
                                  names={i: n for n, i in names})  # fmt: skip

            return await self._view(request, render)

        @r.get("/console/explain")
        async def explain(request: Request, user: str, addin: str) -> Response:
            try:
                self._session(request)
            except _NoSession:
                return self._flash("not signed in: sign in again", 401, False)
            try:
                text = render_explain(await service.explain(user, addin))
            except OperationError as e:
                return self._flash(e.message, e.status, False)
            from html import escape

            return HTMLResponse(f'<pre class="explain">{escape(text)}</pre>')

        @r.get("/console/devices/{client_id}")
        async def device(request: Request, client_id: str) -> Response:
            async def render(session: Session) -> Response:
                d = fleet.devices.get(client_id)
                if d is None:
                    raise NotFound(f"no device {client_id!r} has reported")
                hosts: dict[str, list[tuple[str, str]]] = {}
                for addin_id, per_host in sorted(d.applied.items()):
                    for host, version in per_host.items():
                        hosts.setdefault(host, []).append((addin_id, version))
                names = {a.addin_id: a.name for a in fleet.directory.addins.values()} if fleet.directory else {}
                return self._page(request, "device.html", session, d=d, hosts=sorted(hosts.items()),
                                  names=names)  # fmt: skip

            return await self._view(request, render)

        @r.get("/console/directory")
        async def directory(request: Request, q: str = "") -> Response:
            async def render(session: Session) -> Response:
                return self._page(request, "directory.html", session, q=q,
                                  **await self._directory(q))  # fmt: skip

            return await self._view(request, render)

        def directory_action(action: str) -> None:
            async def handler(request: Request) -> Response:
                async def op(form: dict[str, str]) -> str:
                    child, parent = form.get("child", ""), form.get("parent", "")
                    if action == "nest":
                        res = await service.nest(child, parent)
                        return f"{child} is now nested in {parent}: revision {res['revision']}"
                    res = await service.unnest(child, parent)
                    return f"{child} is no longer nested in {parent}: revision {res['revision']}"

                form_path = "/v1/groups/CHILD/parents/PARENT"
                return await self._write(request, form_path, op)

            r.add_api_route(f"/console/directory/{action}", handler, methods=["POST"])

        directory_action("nest")
        directory_action("unnest")

        @r.get("/console/audit")
        async def audit(
            request: Request, actor: str = "", operation: str = "", since: str = ""
        ) -> Response:
            async def render(session: Session) -> Response:
                from server_stub.cli.audit import parse_since

                problem = None
                start = None
                if since:
                    try:
                        start = parse_since(since, time.time())
                    except ValueError as e:
                        problem = str(e)
                rows = await service.audit.entries(
                    since=start, actor=actor or None, operation=operation or None, limit=PAGE_SIZE
                )
                for row in rows:
                    row["detail_text"] = json.dumps(row["detail"], sort_keys=True)
                return self._page(request, "audit.html", session, rows=rows, actor=actor,
                                  operation=operation, since=since, problem=problem,
                                  actors=await service.audit.actors())  # fmt: skip

            return await self._view(request, render)

        @r.get("/console/events")
        async def events(request: Request) -> Response:
            try:
                self._session(request)
            except _NoSession:
                return Response("not signed in", 401)
            await self._touch()
            return StreamingResponse(
                self._stream(request),
                media_type="text/event-stream",
                headers={"cache-control": "no-store", "x-accel-buffering": "no"},
            )

        return r

    def _login_nonce(self) -> str:
        import secrets

        return secrets.token_urlsafe(24)

    async def _stream(self, request: Request) -> AsyncIterator[str]:
        """The counts now, then whenever one changes (a comment every 15 s keeps proxies
        from closing the stream), until the browser goes or its session ends."""
        sent = -1
        while not await request.is_disconnected():
            if self.sessions.get(request.cookies.get(COOKIE)) is None:
                return
            self._last_request = time.monotonic()
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._refresh_loop())
            if self.fleet.version != sent:
                sent = self.fleet.version
                data = {"version": sent, "at": time.time(), "counts": self.fleet.counts(),
                        "rings": await self._ring_cells()}  # fmt: skip
                yield f"event: counts\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
            else:
                yield ": keepalive\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.fleet.changed.wait(), KEEPALIVE_EVERY)

    async def _ring_cells(self) -> dict[str, int]:
        """"ROLLOUT:RING:devices|applied|failed" -> count, for the running and paused
        rollouts and those that ended in the last 10 minutes (their last ring is still
        converging): the add-in page's ring table follows the fleet live too."""
        cells: dict[str, int] = {}
        for rid, addin_id, version, rings in await self.service.database.rows(
            "SELECT id, addin_id, version, rings FROM rollouts "
            "WHERE state IN ('running', 'paused') OR ring_since > ?",
            (time.time() - RECENT_ROLLOUT,),
        ):
            parsed = [(x["name"], x["targets"]) for x in json.loads(rings)]
            for ring in self.fleet.rollout_rings(str(addin_id), parsed, str(version)):
                for what in ("devices", "applied", "failed"):
                    cells[f"{rid}:{ring['name']}:{what}"] = ring[what]
        return cells

    async def _active_rollouts(self) -> dict[str, str]:
        """add-in -> one line on its running or paused rollout (one query: the add-ins page
        shows 200 add-ins)."""
        out = {}
        for addin_id, version, state, rings, reached, rollback in await self.service.database.rows(
            "SELECT addin_id, version, state, rings, reached, rollback FROM rollouts "
            "WHERE state IN ('running', 'paused')"
        ):
            names = [x["name"] for x in json.loads(rings)]
            what = "rollback to" if rollback else "→"
            out[str(addin_id)] = (f"{what} {version}: ring {names[int(reached) - 1]} "
                                  f"({reached} of {len(names)}), {state}")  # fmt: skip
        return out

    async def _rollouts_of(self, addin_id: str, limit: int = 5) -> list[dict[str, Any]]:
        """The add-in's latest rollouts, newest first, as stored (the page counts their
        rings from the console's own counts, not by reading every report again)."""
        rows = await self.service.database.rows(
            "SELECT * FROM rollouts WHERE addin_id=? ORDER BY id DESC LIMIT ?", (addin_id, limit)
        )
        return [
            {
                "id": int(r["id"]), "version": r["version"], "from_version": r["from_version"],
                "rollback": bool(r["rollback"]), "state": r["state"], "gate": r["gate"],
                "rings": json.loads(r["rings"]), "reached": int(r["reached"]),
                "ring_since": float(r["ring_since"]), "history": json.loads(r["history"]),
                "active": r["state"] in ("running", "paused"),
            }
            for r in rows
        ]  # fmt: skip

    async def _exceptions(self, addin_id: str | None = None) -> dict[tuple[str, str, str], list[str]]:
        """(add-in, target, target id) -> "group:G" / "user:U" it excludes."""
        sql = "SELECT addin_id, target, target_id, kind, id FROM assignment_exceptions"
        rows = await self.service.database.rows(
            sql + (" WHERE addin_id=?" if addin_id else "") + " ORDER BY kind, id",
            (addin_id,) if addin_id else (),
        )
        out: dict[tuple[str, str, str], list[str]] = {}
        for a, t, tid, kind, ident in rows:
            out.setdefault((str(a), str(t), str(tid)), []).append(f"{kind}:{ident}")
        return out

    async def _directory(self, q: str) -> dict[str, Any]:
        """Groups as a forest (each under its parents; a group nested in two appears under
        both), with member counts; assignments with their modes."""
        rows = self.service.database.rows
        groups = {str(g[0]): str(g[1]) for g in await rows("SELECT id, name FROM groups")}
        size = {str(g): int(n) for g, n in await rows(
            "SELECT group_id, count(*) FROM memberships GROUP BY group_id")}  # fmt: skip
        children: dict[str, list[str]] = {}
        has_parent: set[str] = set()
        for c, p in await rows("SELECT child, parent FROM nesting ORDER BY child"):
            children.setdefault(str(p), []).append(str(c))
            has_parent.add(str(c))
        tree: list[tuple[int, str, str, int, bool]] = []
        limit = 1000

        def walk(g: str, depth: int, path: tuple[str, ...]) -> None:
            if len(tree) >= limit:
                return
            cycle = g in path
            tree.append((depth, g, groups.get(g, g), size.get(g, 0), cycle))
            if not cycle:
                for c in children.get(g, []):
                    walk(c, depth + 1, (*path, g))

        wanted = [g for g in sorted(groups) if not q or q.lower() in g.lower() or q.lower() in groups[g].lower()]
        roots = [g for g in wanted if g not in has_parent] if not q else wanted
        for g in roots:
            walk(g, 0, ())
        # Groups only inside a cycle have no root: show them too.
        shown = {t[1] for t in tree}
        for g in wanted:
            if g not in shown and len(tree) < limit:
                walk(g, 0, ())
                shown = {t[1] for t in tree}
        assigns = await rows(
            "SELECT a.addin_id, a.target, a.target_id, a.mode, v.display_name FROM assignments a "
            "JOIN addins d ON d.id=a.addin_id JOIN addin_versions v ON v.addin_id=d.id "
            "AND v.version=d.current_version ORDER BY v.display_name, a.target, a.target_id "
            "LIMIT 2000"
        )
        exceptions = await self._exceptions()
        return {
            "exceptions": exceptions,
            "tree": tree,
            "truncated": len(tree) >= limit,
            "groups_total": len(groups),
            "nested": await self.service.nested_groups(),
            "assignments": [dict(zip(("addin_id", "target", "target_id", "mode", "name"), a, strict=True)) for a in assigns],
        }


def _local(path: str) -> str:
    """Only a path inside the console after sign-in: never another site (open redirect)."""
    if path.startswith("/console") and not path.startswith("//") and "\\" not in path:
        return path
    return "/console/addins"
