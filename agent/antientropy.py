"""Anti-entropy: the agent checks its resolved entitlements against the server's view
and resyncs on a real mismatch.

Every ``anti_entropy_interval`` seconds (jittered ±20 %, so a fleet started together does
not ask together) the agent fetches ``GET /v1/agents/{user}/digest`` and compares it with
the digest of its own resolution (`addin_core.digest`, over every host: the server does
not know which apps this computer has).

A mismatch is not necessarily a fault: when the server's revision is newer than anything
the agent holds, the change may simply be in flight over MQTT. So the agent acts at once
only when it holds the server's revision (or a newer one); otherwise it acts if the
mismatch is still there on the next round — by then the messages behind the first
round's revision had a whole interval to arrive. (Waiting for the *same* server revision
on the next round, as first designed, would never repair a busy tenant whose revision
moves every few minutes.)

To resync it fetches ``GET /v1/agents/{user}/state`` (the retained messages it should
hold) and feeds each one through `Agent.handle_message`, the path MQTT messages take:
its signature is checked (with a ``signing_key``), `decode()` validates it and
`ReceivedState.apply` takes it only if its revision is newer than the one held for that
topic. So a stale or hostile answer can neither downgrade nor remove anything, and nothing
is removed except by an explicit, newer tombstone. Topics that are not this agent's
(another user's, a group outside its ancestry) are dropped.

Recorded in the cache: the ``sync`` key ``anti_entropy`` (last check: time, result,
digests, revisions) for `status` and `doctor`; an event ``resync`` with the before/after
digests whenever state was fetched; an event ``anti_entropy_ok`` only when a check
succeeds after start or after a check that did not (so a healthy agent logs one line, not
one every ten minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from addin_core.digest import EntitlementDigest, entitlement_digest
from addin_core.protocol import Host, InvalidTopic, Topic, TopicKind
from addin_core.user_topics import belongs_to_user
from agent.cache import Cache, Tx, VolatileCache
from agent.config import AgentConfig
from agent.http_errors import transport_errors
from agent.readmodel import describe_last as describe_last  # re-exported
from agent.resolver import resolve
from agent.state import ReceivedState
from agent.subscriptions import ancestry
from agent.tls import TlsSetupError, explain, httpx_verify

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("addin_agent.antientropy")

JITTER = 0.2
"""Each wait is the interval times a uniform factor in [1 - JITTER, 1 + JITTER]."""

SYNC_KEY = "anti_entropy"
MAX_PARENT_ROUNDS = 64
"""Bound on the rounds that follow group nesting in a /state answer (each round adds the
parents of groups the previous one discovered)."""

Result = Literal["ok", "in_flight", "resynced", "unresolved", "error"]


class _Response(Protocol):
    status_code: int
    content: bytes


class _Http(Protocol):
    async def get(self, url: str, *, headers: dict[str, str]) -> Any: ...


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one anti-entropy round found (also stored as the ``anti_entropy`` sync value)."""

    at: float
    result: Result
    revision: int
    """Highest revision the agent held when it compared."""
    local_digest: str | None = None
    server_digest: str | None = None
    server_revision: int | None = None
    count: int | None = None
    """Entitlements in the server's digest."""
    accepted: int = 0
    """Messages of a resync newer than what the agent held."""
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def local_digest(state: ReceivedState, user_id: str) -> EntitlementDigest:
    """The digest of what this agent resolves, over every host (host-independent)."""
    ents = resolve(state, user_id, tuple(Host))
    return entitlement_digest(
        ((e.addin_id, e.mode, e.version) for e in ents.values()), state.revision
    )


def _jittered(interval: float) -> float:
    return interval * random.uniform(1 - JITTER, 1 + JITTER)


def _failure_text(e: Exception) -> str:
    """Why a request to the server failed: a TLS refusal in words (agent/tls.py), else the
    error's type and text."""
    return explain(e, "server") or (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Checked(Protocol):
    """What the check asks of the agent (agent/daemon.py's `Agent`): its state, a way to
    feed messages through its normal path, and its cache for the outcome."""

    config: AgentConfig
    stats: dict[str, int]

    @property
    def cache(self) -> Cache | VolatileCache | None: ...
    @property
    def fetcher(self) -> Any: ...
    @property
    def state(self) -> ReceivedState: ...
    @property
    def revision(self) -> int: ...
    async def handle_message(self, topic_str: str, payload_bytes: bytes) -> None: ...


class AntiEntropy:
    """The periodic check of one agent. `check()` runs one round (tests call it directly)."""

    def __init__(self, agent: Checked, interval: float, http: _Http | None = None) -> None:
        self.agent = agent
        self.interval = interval
        self._http = http
        self._own_http: httpx.AsyncClient | None = None
        """Only without an agent's fetcher (tests): the daemon uses the fetcher's pool."""
        self._task: asyncio.Task[None] | None = None
        self._suspect: int | None = None
        """Server revision of a mismatch seen last round while messages may be in flight."""
        self._unresolved: tuple[str, str, int] | None = None
        """(local digest, server digest, server revision) a resync could not reconcile:
        not fetched again until one of them changes."""
        self._last: Result | None = None
        self.last: CheckResult | None = None
        self.checks = 0
        self.resyncs = 0

    @classmethod
    def start_for(cls, agent: Checked) -> AntiEntropy | None:
        """Start the periodic check if ``anti_entropy_interval`` > 0 (the daemon's hook)."""
        interval = float(getattr(agent.config, "anti_entropy_interval", 0) or 0)
        if interval <= 0:
            return None
        ae = cls(agent, interval)
        ae._task = asyncio.create_task(ae._run(), name=f"anti-entropy {agent.config.client_id}")
        return ae

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._own_http is not None:
            await self._own_http.aclose()
            self._own_http = None

    async def _run(self) -> None:
        # The first check waits a (jittered) interval too: right after start the retained
        # state is still arriving, and a fleet restarted together must not ask together.
        while True:
            await asyncio.sleep(_jittered(self.interval))
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must never stop the agent; try again later
                log.exception("anti-entropy check failed")

    # -- HTTP ----------------------------------------------------------------------------------
    def _client(self) -> _Http:
        if self._http is not None:
            return self._http
        shared = getattr(self.agent.fetcher, "http", None)
        if shared is not None:  # the fetcher's pool (one per process in the simulator)
            return shared
        if self._own_http is None:
            import httpx

            self._own_http = httpx.AsyncClient(
                timeout=httpx.Timeout(10.0, connect=5.0), verify=httpx_verify(self.agent.config)
            )
        return self._own_http

    async def _get_json(self, path: str) -> dict[str, Any]:
        cfg = self.agent.config
        url = cfg.server_url.rstrip("/") + path
        resp: _Response = await self._client().get(url, headers=_headers(cfg.server_token))
        if resp.status_code != 200:
            hint = " (check server_token)" if resp.status_code in (401, 403) else ""
            raise ValueError(f"HTTP {resp.status_code} from {url}{hint}")
        data = json.loads(resp.content)
        if not isinstance(data, dict):
            raise ValueError(f"{url} answered {type(data).__name__}, not an object")
        return data

    # -- one round -------------------------------------------------------------------------------
    async def check(self) -> CheckResult:
        """Compare digests once; resync on a real mismatch; record the outcome."""
        agent = self.agent
        cfg = agent.config
        self.checks += 1
        try:
            server = await self._get_json(f"/v1/agents/{cfg.user_id}/digest")
            server_digest = str(server["digest"])
            server_rev = int(server["revision"])
            count = int(server.get("count", 0))
        except _failures() as e:
            # Never act on missing data: an unreachable server changes nothing here.
            text = _failure_text(e)
            return await self._record(
                CheckResult(time.time(), "error", agent.revision, detail=text[:300])
            )
        local = local_digest(agent.state, cfg.user_id)

        def made(result: Result, detail: str = "") -> CheckResult:
            return CheckResult(
                time.time(),
                result,
                local.revision,
                local.digest,
                server_digest,
                server_rev,
                count,
                detail=detail,
            )

        if local.digest == server_digest:
            self._suspect = self._unresolved = None
            return await self._record(made("ok"))
        if local.revision < server_rev and self._suspect is None:
            self._suspect = server_rev
            return await self._record(
                made(
                    "in_flight",
                    f"digests differ; the server is at revision {server_rev}, this agent "
                    f"holds {local.revision}: waiting one round for messages in flight",
                )
            )
        key = (local.digest, server_digest, server_rev)
        if self._unresolved == key:
            return await self._record(
                made(
                    "unresolved",
                    "digests still differ as after the last resync; nothing newer to fetch",
                )
            )
        return await self._resync(server_digest, server_rev, count, local)

    async def _resync(
        self, server_digest: str, server_rev: int, count: int, before: EntitlementDigest
    ) -> CheckResult:
        agent = self.agent
        cfg = agent.config
        self._suspect = None
        try:
            state = await self._get_json(f"/v1/agents/{cfg.user_id}/state")
            messages = state["messages"]
            if not isinstance(messages, list):
                raise TypeError("messages is not a list")
        except _failures() as e:
            text = _failure_text(e)
            return await self._record(
                CheckResult(
                    time.time(),
                    "error",
                    before.revision,
                    before.digest,
                    server_digest,
                    server_rev,
                    count,
                    detail=f"digests differ but the state could not be fetched: {text}"[:300],
                )
            )
        refused_before = agent.stats.get("signature_refused", 0)
        accepted, stale, foreign = await self._feed(messages)
        refused = agent.stats.get("signature_refused", 0) - refused_before
        after = local_digest(agent.state, cfg.user_id)
        self.resyncs += 1
        fixed = after.digest == server_digest
        if not fixed:
            self._unresolved = (after.digest, server_digest, server_rev)
        detail = (
            f"before {before.digest[:12]} after {after.digest[:12]} server {server_digest[:12]} "
            f"(revision {server_rev}, agent held {before.revision}): {len(messages)} message(s), "
            f"{accepted} newer than held, {stale} not taken (not newer or invalid)"
            + (f", {foreign} not this agent's" if foreign else "")
            + (f", {refused} REFUSED for their signature" if refused else "")
            + ("" if fixed else "; digests still differ")
        )
        log.warning("anti-entropy resync: %s", detail)
        result = CheckResult(
            time.time(),
            "resynced" if fixed else "unresolved",
            after.revision,
            after.digest,
            server_digest,
            server_rev,
            count,
            accepted,
            detail,
        )
        return await self._record(result, event=("resync", detail))

    def _mine(self, topic: Topic, groups: set[str]) -> bool:
        """Is `topic` one this agent subscribes to?"""
        cfg = self.agent.config
        return belongs_to_user(str(topic), cfg.tenant, cfg.user_id, groups)

    async def _feed(self, messages: list[Any]) -> tuple[int, int, int]:
        """Feed /state messages through the agent's message path, membership first so the
        ancestry (which decides which group topics are this agent's) is current.
        Returns (accepted, not newer, not this agent's)."""
        agent = self.agent
        user = agent.config.user_id
        parsed: list[tuple[Topic, str, bytes]] = []
        foreign = 0
        for m in messages:
            try:
                topic = Topic.parse(str(m["topic"]))
                payload = m["payload"]
                raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            except (InvalidTopic, KeyError, TypeError, AttributeError):
                foreign += 1
                continue
            parsed.append((topic, str(topic), raw))
        before = agent.stats["accepted"]
        seen_before = sum(agent.stats.values())
        fed: set[str] = set()

        async def feed(kinds: set[TopicKind], groups: set[str]) -> int:
            n = 0
            for topic, text, raw in parsed:
                if text not in fed and topic.kind in kinds and self._mine(topic, groups):
                    fed.add(text)
                    await agent.handle_message(text, raw)
                    n += 1
            return n

        await feed({TopicKind.POLICY, TopicKind.MEMBER}, set())
        # Nesting: each round may reveal the parents of groups the previous one reached.
        for _ in range(MAX_PARENT_ROUNDS):
            if not await feed({TopicKind.GROUP_PARENTS}, ancestry(agent.state, user)):
                break
        await feed(set(TopicKind), ancestry(agent.state, user))
        foreign += len(parsed) - len(fed)
        accepted = agent.stats["accepted"] - before
        handled = sum(agent.stats.values()) - seen_before
        return accepted, handled - accepted, foreign

    async def _record(self, r: CheckResult, event: tuple[str, str] | None = None) -> CheckResult:
        cache = self.agent.cache
        previous, self._last, self.last = self._last, r.result, r
        if cache is None:
            return r
        tx = Tx()
        tx.sync(SYNC_KEY, r.to_json())
        if r.result in ("ok", "resynced"):
            # `why` states how fresh its answer is: the last time the server agreed, even
            # when a later check failed.
            tx.sync("anti_entropy_ok_at", r.at)
        if event is not None:
            tx.event(event[0], event[1][:500], revision=r.server_revision)
        elif r.result == "ok" and previous != "ok":
            tx.event(
                "anti_entropy_ok",
                f"{r.count} entitlement(s) match the server's at revision {r.server_revision}",
                revision=r.server_revision,
            )
        await cache.commit(tx)
        return r


def _failures() -> tuple[type[Exception], ...]:
    """What a digest or state request may raise that only means "try next round"."""
    return (*transport_errors(), OSError, ValueError, KeyError, TypeError)


# -- for `status`, `doctor` and `wait` ---------------------------------------------------
def compare_now(cfg: AgentConfig, state: ReceivedState) -> tuple[Literal["ok", "warn"], str]:
    """(status, detail) of a live digest comparison from the cache, for `doctor`."""
    local = local_digest(state, cfg.user_id)
    import httpx  # `doctor`'s one request, outside the daemon

    url = f"{cfg.server_url.rstrip('/')}/v1/agents/{cfg.user_id}/digest"
    try:
        r = httpx.get(url, headers=_headers(cfg.server_token), timeout=5, verify=httpx_verify(cfg))
    except TlsSetupError as e:
        return "warn", str(e)
    except httpx.HTTPError as e:
        return "warn", f"{url} unreachable: {explain(e, 'server') or e}"
    if r.status_code != 200:
        hint = " (check server_token)" if r.status_code in (401, 403) else ""
        return "warn", f"{url} answered HTTP {r.status_code}{hint}"
    try:
        server = r.json()
        sdig, srev, count = str(server["digest"]), int(server["revision"]), int(server["count"])
    except (ValueError, KeyError, TypeError):
        return "warn", f"{url} answered something that is not a digest"
    if sdig == local.digest:
        return "ok", (
            f"{count} entitlement(s) match the server's (server revision {srev}, "
            f"cache holds {local.revision})"
        )
    lag = " (the server is ahead: messages may be in flight)" if srev > local.revision else ""
    return "warn", (
        f"entitlements differ from the server's: digest {local.digest[:12]} here, "
        f"{sdig[:12]} on the server at revision {srev}, cache holds {local.revision}{lag}; "
        "the daemon's anti-entropy resyncs a lasting mismatch"
    )
