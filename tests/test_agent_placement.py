"""Where launches put add-ins, seen through `why` and `doctor`: a real agent with a file
cache and the macOS applier under a temporary home (or the folder applier), state arriving
through `Agent.accept` as in test_agent_why.

Outlook add-ins come from the mailbox: the agent tracks them but places nothing, and `why`
and `doctor` say so instead of "installed".
"""

from __future__ import annotations

from pathlib import Path

from test_agent_why import World

from addin_core.protocol import Host
from agent.applier import MAILBOX
from agent.cache import open_readonly
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.doctor import check_applier
from agent.readmodel import ReadModel
from agent.why import why

HOSTS = (Host.WORD, Host.EXCEL, Host.OUTLOOK)


async def agent_with(tmp_path: Path, **applier: str) -> Agent:
    cfg = AgentConfig(
        tenant="contoso",
        user_id="ann",
        client_id="ann-mac",
        insecure=True,
        cache_path=str(tmp_path / "cache.sqlite"),
        hosts=HOSTS,
        **applier,  # type: ignore[arg-type]
    )
    agent = Agent(cfg)
    await agent.open()
    return agent


async def test_why_says_outlook_addins_come_from_the_mailbox(tmp_path: Path) -> None:
    agent = await agent_with(tmp_path, applier="folder", applier_dir=str(tmp_path / "wef"))
    try:
        w = World(agent)
        mail = await w.catalog("mailer", hosts=("Outlook",))
        doc = await w.catalog("docs", hosts=("Word",))
        await w.everyone(mail)
        await w.everyone(doc)
        conn = open_readonly(agent.config.cache_path)
        for host in (Host.OUTLOOK, Host.WORD):
            await agent.launch(host)
        rep = why(conn, "mailer", Host.OUTLOOK)
        assert rep.cause == "mailbox"
        assert rep.verdict == (
            f"mailer 1.0.0.0 is assigned to you for Outlook. {MAILBOX}: if it is missing in "
            "Outlook, ask your admin to deploy it to your mailbox (Microsoft 365 admin "
            "center, Integrated apps)."
        )
        assert ("placed in Outlook", None, MAILBOX) in [
            (s.label, s.ok, s.detail) for s in rep.steps
        ]
        # Word's add-in is placed; nothing is written for Outlook.
        assert why(conn, "docs").cause == "installed"
        assert (tmp_path / "wef" / "Word" / f"{doc}.xml").is_file()
        assert not (tmp_path / "wef" / "Outlook").exists()
    finally:
        await agent.stop()


async def test_why_with_the_memory_applier_is_unchanged(tmp_path: Path) -> None:
    agent = await agent_with(tmp_path, applier="memory")
    try:
        w = World(agent)
        await w.everyone(await w.catalog("mailer", hosts=("Outlook",)))
        await agent.launch(Host.OUTLOOK)
        rep = why(open_readonly(agent.config.cache_path), "mailer", Host.OUTLOOK)
        assert (rep.cause, rep.verdict) == ("installed", "Installed in Outlook: mailer 1.0.0.0.")
    finally:
        await agent.stop()


async def test_doctor_surveys_each_hosts_wef_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    agent = await agent_with(tmp_path, applier="mac", applier_root=str(home))
    try:
        w = World(agent)
        x = await w.catalog("notes", hosts=("Word", "Excel"))
        await w.everyone(x)
        await agent.launch(Host.WORD)
        wef = home / "Library/Containers/com.microsoft.Word/Data/Documents/wef"
        assert (wef / f"addin-agent.{x}.xml").is_file()
        (wef / "my-dev-addin.xml").write_text("<OfficeApp/>")
        # Excel's folder cannot be created: a file stands where it should be.
        excel = home / "Library/Containers/com.microsoft.Excel/Data/Documents/wef"
        excel.parent.mkdir(parents=True)
        excel.write_bytes(b"")
        rm = ReadModel(open_readonly(agent.config.cache_path))
        checks = {c.name: c for c in check_applier(agent.config, rm)}
        assert list(checks) == ["add-ins for Word", "add-ins for Excel", "add-ins for Outlook"]
        word = checks["add-ins for Word"]
        assert word.status == "warn"
        assert word.detail == (
            f"{wef}: at its next launch Word loads addin-agent.{x}.xml (notes 1.0.0.0, id {x}); "
            "my-dev-addin.xml (not a readable manifest, not the agent's); left alone, not the "
            "agent's: my-dev-addin.xml"
        )
        assert checks["add-ins for Excel"].status == "fail"
        assert f"{excel} exists but is not a folder" in checks["add-ins for Excel"].detail
        outlook = checks["add-ins for Outlook"]
        assert (outlook.status, outlook.detail) == (
            "ok",
            f"{MAILBOX}; nothing is written for Outlook here",
        )
        # The foreign file is removed by its owner, the agent's file by hand: doctor sees the
        # folder differ from the installed set.
        (wef / "my-dev-addin.xml").unlink()
        (wef / f"addin-agent.{x}.xml").unlink()
        word = {c.name: c for c in check_applier(agent.config, rm)}["add-ins for Word"]
        assert (word.status, word.detail) == (
            "warn",
            f"{wef}: at its next launch Word loads no add-in; differs from the installed set; "
            "the next launch repairs it",
        )
        await agent.launch(Host.WORD)
        word = {c.name: c for c in check_applier(agent.config, rm)}["add-ins for Word"]
        assert word.status == "ok"
    finally:
        await agent.stop()
