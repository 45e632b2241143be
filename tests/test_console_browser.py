"""The console in a real browser: Debian's Chromium (``/usr/bin/chromium``) driven by
Playwright, against a real `addin-server serve`, a private Mosquitto and real agents.

An admin signs in, assigns an add-in from the console and watches the counts move (without
a reload) as the agents download it and their Word starts; a helpdesk user sees no buttons
and is refused a write; a write without the CSRF token is refused; no other page may frame
the console. The screenshots of docs/console.md are taken here (docs/console/*.png).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import ServerProcess, addin_id, agent_config, manifest, until
from harness import ADMIN_TOKEN, REPO

from addin_core.protocol import Host
from agent.daemon import Agent
from simulator.mosquitto import MosquittoBroker

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = (
    REPO / "docs" / "console"
    if os.environ.get("ADDIN_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "addin-console-screenshots"
)
"""Where the pictures go: docs/console/ (docs/console.md shows them) only when asked with
ADDIN_UPDATE_SCREENSHOTS=1, so a test run does not rewrite tracked files; a temporary folder
otherwise (every page is still rendered and captured)."""
HELPDESK = "helpdesk-token-1"
OPERATOR = "operator-token-1"

try:
    from playwright.async_api import Browser, Dialog, Page, async_playwright
except ImportError:  # pragma: no cover - the [test] extra installs it
    async_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(
        async_playwright is None,
        reason="Playwright's Python package is missing: pip install -e '.[test]'",
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is missing: run scripts/bootstrap.sh as root "
        "(it runs apt-get install chromium chromium-driver)",
    ),
]

NOTES = addin_id("Contoso Notes")
TIMEOUT_MS = 30_000


@pytest.fixture
async def server(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[ServerProcess]:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"helpdesk:dana:{HELPDESK}\noperator:oscar:{OPERATOR}\n")
    srv = ServerProcess(tmp_path, broker, env={"ADDIN_SERVER_TOKENS_FILE": str(tokens)})
    for user in ("ann", "bob", "cy"):
        await srv.user(user)
    for group in ("sales", "sales-emea", "contractors"):
        await srv.group(group)
    await srv.nest("sales-emea", "sales")
    await srv.join("sales", "ann")
    await srv.join("sales", "bob")
    await srv.join("contractors", "cy")
    await srv.upload(manifest("Contoso Notes", hosts=("Word", "Excel")))
    await srv.upload(manifest("Fabrikam CRM", hosts=("Outlook",)))
    await srv.assign(addin_id("Fabrikam CRM"), "everyone", mode="available")
    yield srv
    await srv.aclose()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as p:
        # Debian's build, never one Playwright downloads; no sandbox as root in a container.
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        await b.close()


@pytest.fixture
async def agents(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> AsyncIterator[list[Agent]]:
    made = []
    for user in ("ann", "bob"):
        a = Agent(agent_config(tmp_path, broker, server, user, watch_hosts=False))
        await a.start()
        made.append(a)
    yield made
    for a in made:
        await a.stop()


async def sign_in(browser: Browser, server: ServerProcess, token: str, shot: str | None = None) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{server.url}/console/addins")
    assert "/console/login" in page.url
    await page.fill("#token", token)
    if shot:
        await page.screenshot(path=str(SHOTS / shot))
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{server.url}/console/addins")
    return page


async def click_for_flash(page: Page, selector: str) -> str:
    """Click a console button and return the message its answer shows (the previous one
    cleared first, so it is never mistaken for the new one)."""
    await page.evaluate("document.getElementById('flash').innerHTML = ''")
    await page.click(selector)
    await page.wait_for_selector("#flash .flash")
    return await page.inner_text("#flash")


async def count(page: Page, addin: str, name: str) -> str:
    return await page.inner_text(f'[data-addin="{addin}"][data-count="{name}"]')


async def wait_count(page: Page, addin: str, name: str, value: int) -> None:
    await page.wait_for_function(
        "([a, n, v]) => { const el = document.querySelector(`[data-addin=\"${a}\"][data-count=\"${n}\"]`);"
        " return el !== null && el.textContent === v; }",
        arg=[addin, name, str(value)],
        timeout=TIMEOUT_MS,
    )


async def test_admin_assigns_from_the_console_and_watches_the_counts_move(
    server: ServerProcess, browser: Browser, agents: list[Agent]
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = await sign_in(browser, server, ADMIN_TOKEN, shot="login.png")
    assert await page.inner_text("#whoami") == "admin (admin)"
    await page.click(f'a[href="/console/addins/{NOTES}"]')
    await page.wait_for_url(f"**/console/addins/{NOTES}")
    assert await count(page, NOTES, "entitled") == "0"
    # Nothing reloads from here on: the counts arrive as server-sent events.
    await page.evaluate("window.__sameDocument = 42")

    await page.select_option("#assign-form select[name=target]", "group")
    await page.fill("#assign-form input[name=target_id]", "sales")
    await page.select_option("#assign-form select[name=mode]", "fixed")
    assert (await click_for_flash(page, "#assign-form button")).startswith(f"assigned {NOTES}: revision")

    await wait_count(page, NOTES, "entitled", 2)
    await wait_count(page, NOTES, "cached", 2)  # downloaded, waiting for Word to start
    assert await count(page, NOTES, "applied") == "0"
    for a in agents:
        await a.launch(Host.WORD)
    await wait_count(page, NOTES, "applied", 2)
    assert await count(page, NOTES, "failed") == "0"
    assert await page.evaluate("window.__sameDocument") == 42
    await page.reload()
    await page.screenshot(path=str(SHOTS / "addin.png"), full_page=True)
    assert await page.locator("#devices .pill.applied").count() == 2

    await page.goto(f"{server.url}/console/addins")
    await wait_count(page, NOTES, "applied", 2)
    await page.screenshot(path=str(SHOTS / "addins.png"), full_page=True)

    # Users and devices: explain for a user and add-in, the device's installed set.
    await page.goto(f"{server.url}/console/users/ann")
    await page.select_option("#explain-addin", NOTES)
    await page.click("form[hx-get='/console/explain'] button")
    await page.wait_for_selector("#explain pre")
    explained = await page.inner_text("#explain pre")
    assert "ENTITLED, mode fixed" in explained and "group sales" in explained
    await page.screenshot(path=str(SHOTS / "user.png"), full_page=True)
    await page.goto(f"{server.url}/console/devices/ann-pc")
    assert "1.0.0.0" in await page.inner_text("main")
    await page.screenshot(path=str(SHOTS / "device.png"), full_page=True)

    # Directory: the nesting, and a nesting that would close a cycle refused with its path.
    await page.goto(f"{server.url}/console/directory")
    await page.fill("#nest-form input[name=child]", "sales")
    await page.fill("#nest-form input[name=parent]", "sales-emea")
    refused = await click_for_flash(page, "#nest-form button")
    assert "sales" in refused and "cycle" in refused.lower(), refused
    await page.screenshot(path=str(SHOTS / "directory.png"), full_page=True)

    # The audit log names the admin and the way in.
    await page.goto(f"{server.url}/console/audit?operation=assign")
    rows = await page.locator("#audit tbody tr").all_inner_texts()
    assert len(rows) == 2
    assert "admin\tadmin\tconsole\tassign" in rows[0]
    assert "admin\tadmin\tapi\tassign" in rows[1]
    await page.goto(f"{server.url}/console/audit")
    await page.screenshot(path=str(SHOTS / "audit.png"), full_page=True)


async def test_helpdesk_is_refused_a_write_csrf_and_framing_are_refused(
    server: ServerProcess, browser: Browser
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    before = await server.revision()
    page = await sign_in(browser, server, HELPDESK)
    assert await page.inner_text("#whoami") == "dana (helpdesk)"
    response = await page.goto(f"{server.url}/console/addins/{NOTES}")
    assert response is not None
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    # No buttons for a read-only role, and a write sent anyway (with the CSRF token) is refused.
    assert await page.locator("#assign-form").count() == 0
    assert "read-only for you" in await page.inner_text("main")
    refused = await post_from_page(page, f"/console/addins/{NOTES}/disable", csrf=True)
    assert refused["status"] == 403
    assert "helpdesk &#x27;dana&#x27; may not POST" in refused["text"]
    assert "read-only" in refused["text"]
    advance = await post_from_page(page, "/console/rollouts/1/advance", csrf=True)
    assert advance["status"] == 403 and "may not POST /v1/rollouts/1/advance" in advance["text"]
    await page.screenshot(path=str(SHOTS / "helpdesk.png"), full_page=True)

    # An admin's session without the CSRF token (what a forged cross-site form would send).
    admin = await sign_in(browser, server, ADMIN_TOKEN)
    await admin.goto(f"{server.url}/console/addins/{NOTES}")
    forged = await post_from_page(admin, f"/console/addins/{NOTES}/disable", csrf=False)
    assert forged["status"] == 403 and "CSRF token" in forged["text"]
    assert await server.revision() == before  # nothing was written

    # Another page framing the console gets nothing: Chromium obeys frame-ancestors.
    framer = await browser.new_page()
    await framer.set_content(
        f'<iframe id="f" src="{server.url}/console/login" width="600" height="400"></iframe>'
    )
    await framer.wait_for_timeout(1000)
    frame = next(f for f in framer.frames if f != framer.main_frame)
    assert "Sign in" not in await frame.content()


async def post_from_page(page: Page, path: str, *, csrf: bool) -> dict[str, Any]:
    """A POST the page's own script sends with the session cookie (and the CSRF token)."""
    result: dict[str, Any] = await page.evaluate(
        """async ([path, withCsrf]) => {
            const headers = {"Content-Type": "application/x-www-form-urlencoded"};
            if (withCsrf) {
                headers["X-CSRF-Token"] = JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRF-Token"];
            }
            const r = await fetch(path, {method: "POST", headers, body: ""});
            return {status: r.status, text: await r.text()};
        }""",
        [path, csrf],
    )
    return result



async def launched(agent: Agent, version: str) -> None:
    """Word starts (bounded: until the change has arrived and is ready, 20 s) and then holds
    `version` of Contoso Notes."""

    async def ready() -> bool:
        return any(
            p.addin_id == NOTES and p.to_version == version and p.ready
            for p in agent.pending.values()
        ) or agent.installed().get(Host.WORD, {}).get(NOTES) == version

    await until(ready, 20, f"{agent.config.client_id} to be ready for {version}")
    assert (await agent.launch(Host.WORD))[NOTES] == version


async def ring_cell(page: Page, rollout: int, ring: str, what: str, want: int) -> None:
    """Wait (no reload: the event stream updates the ring table) until a ring's count is `want`."""
    await page.wait_for_function(
        "([k, v]) => { const el = document.querySelector(`[data-ring=\"${k}\"]`);"
        " return el !== null && el.textContent === v; }",
        arg=[f"{rollout}:{ring}:{what}", str(want)],
        timeout=TIMEOUT_MS,
    )


async def test_ring_rollout_advance_and_rollback_from_the_console(
    server: ServerProcess, browser: Browser, agents: list[Agent]
) -> None:
    """1.0 on both devices; 2.0 rolled out to ann's ring first, then advanced to everyone,
    then rolled back to 1.0: each step from the console, each applied by real agents."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    ann, bob = agents
    await server.assign(NOTES, "group", "sales", mode="fixed")
    for a in agents:
        await launched(a, "1.0.0.0")
    await server.call(
        "POST", "/v1/addins?staged=true",
        content=manifest("Contoso Notes", version="2.0.0.0", hosts=("Word", "Excel")),
        headers={"Content-Type": "application/xml"},
    )  # fmt: skip
    page = await sign_in(browser, server, ADMIN_TOKEN)

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.on("dialog", accept)
    await page.goto(f"{server.url}/console/addins/{NOTES}")
    await wait_count(page, NOTES, "applied", 2)

    await page.select_option("#rollout-form select[name=version]", "2.0.0.0")
    await page.fill("#rollout-form input[name=rings]", "pilot=user:ann all=everyone")
    assert "rollout 1: rollout of 2.0.0.0 started, running" in await click_for_flash(page, "#rollout-form button")
    await page.reload()  # the new rollout's panel; from here its counts arrive by themselves
    await page.evaluate("window.__sameDocument = 7")
    await ring_cell(page, 1, "pilot", "devices", 1)
    await launched(ann, "2.0.0.0")
    await ring_cell(page, 1, "pilot", "applied", 1)
    # Each device holds the version its ring is due: both count as applied.
    await wait_count(page, NOTES, "applied", 2)
    assert await page.evaluate("window.__sameDocument") == 7
    await page.goto(f"{server.url}/console/addins")
    assert "→ 2.0.0.0: ring pilot (1 of 2), running" in await page.inner_text("#addins")
    await page.screenshot(path=str(SHOTS / "rollouts.png"), full_page=True)
    await page.goto(f"{server.url}/console/addins/{NOTES}")
    await page.screenshot(path=str(SHOTS / "rollout.png"), full_page=True)

    assert "rollout 1: advance, now completed at ring all" in await click_for_flash(page, "#advance-1")
    await launched(bob, "2.0.0.0")
    await ring_cell(page, 1, "all", "applied", 1)

    await page.select_option("#rollback-form select[name=version]", "1.0.0.0")
    assert "rollout 2: rollback to 1.0.0.0 started, completed" in await click_for_flash(page, "#rollback-form button")
    for a in agents:
        await launched(a, "1.0.0.0")  # the one downgrade an agent accepts: an admin's rollback
    await page.reload()
    await wait_count(page, NOTES, "applied", 2)

    await page.goto(f"{server.url}/console/audit?actor=admin")
    ops = [r.split("\t")[5] for r in await page.locator("#audit tbody tr").all_inner_texts()]
    assert ops[:3] == ["rollback", "rollout_advance", "rollout_start"], ops
    assert all("\tconsole\t" in r for r in (await page.locator("#audit tbody tr").all_inner_texts())[:3])


async def test_operator_steers_rollouts_only(server: ServerProcess, browser: Browser) -> None:
    page = await sign_in(browser, server, OPERATOR)
    await page.goto(f"{server.url}/console/addins/{NOTES}")
    assert await page.locator("#assign-form").count() == 0
    assert await page.locator("#rollout-form").count() == 1
    refused = await post_from_page(page, f"/console/addins/{NOTES}/assign", csrf=True)
    assert refused["status"] == 403 and "operator tokens may change rollouts only" in refused["text"]
    # A rollout action passes the role check and reaches the service (no such rollout).
    allowed = await post_from_page(page, "/console/rollouts/99/pause", csrf=True)
    assert allowed["status"] == 404 and "no rollout 99" in allowed["text"], allowed
