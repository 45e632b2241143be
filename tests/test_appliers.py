"""The platform appliers on real files in temporary folders: the folder applier (Linux), the
macOS applier (each host's ``wef`` folder under a home given to it), and the Windows
applier's pure registry planner and its file side (the ``winreg`` executor itself runs on
Windows only; here a JSON file stands in for the registry key).

Crash safety: a child process applies a change and is SIGKILLed at a chosen point (between
writing a manifest's temporary file and renaming it, between registry writes, before old
files are removed); what Office would read afterwards must be the old state or complete new
files, never half a manifest, and the next apply must converge.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_helpers import addin_id, manifest

from addin_core.protocol import Host
from agent import applier as applier_module
from agent.applier import MAILBOX, SETTLED_NS, AppliedManifest, FolderApplier
from agent.applier_mac import MacApplier
from agent.applier_windows import DEVELOPER_KEY, WindowsApplier, plan
from agent.appliers import make_applier
from agent.config import ConfigError, load_config

A, B, C = addin_id("alpha"), addin_id("beta"), addin_id("gamma")
XML = {
    (A, 1): manifest("alpha", "1.0.0.0", ("Word", "Excel")),
    (A, 2): manifest("alpha", "2.0.0.0", ("Word", "Excel")),
    (B, 1): manifest("beta", "1.0.0.0"),
    (C, 1): manifest("gamma", "1.0.0.0"),
}


def applied(*keys: tuple[str, int]) -> dict[str, AppliedManifest]:
    return {
        a: AppliedManifest(a, f"{v}.0.0.0", hashlib.sha256(XML[a, v]).hexdigest(), XML[a, v])
        for a, v in keys
    }


def shas(addins: dict[str, AppliedManifest]) -> dict[str, str]:
    return {a: m.sha256 for a, m in addins.items()}


BEFORE = applied((A, 1), (B, 1))
AFTER = applied((A, 2), (C, 1))  # A updated, B removed, C added


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, relative path → bytes (what a reader could see)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


class FileRegistry:
    """The registry key as a JSON file, for the Windows applier's file side in tests (the
    `winreg` executor runs on Windows only). One write replaces the file whole, as one
    registry value write is whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def values(self) -> dict[str, str]:
        try:
            data: dict[str, str] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data

    def _save(self, values: dict[str, str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        os.replace(tmp, self.path)

    def put(self, name: str, data: str) -> None:
        self._save({**self.values(), name: data})

    def delete(self, name: str) -> None:
        self._save({k: v for k, v in self.values().items() if k != name})


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def killed_during(apply: Callable[[], None], point: str) -> None:
    """Run `apply` in a forked child that SIGKILLs itself at `point`: ``rename`` (a manifest's
    temporary file written and flushed, not renamed yet), ``put`` / ``delete`` (the first
    registry write of that kind), ``prune`` (the first removal of an old file)."""

    def child() -> None:
        real_replace, real_unlink = os.replace, Path.unlink
        if point == "rename":

            def replace(src: object, dst: object) -> None:
                if str(src).endswith(".part"):
                    _die()
                real_replace(src, dst)  # type: ignore[arg-type]

            os.replace = replace  # type: ignore[assignment]
        elif point in ("put", "delete"):
            setattr(FileRegistry, point, lambda *a: _die())
        elif point == "prune":

            def unlink(self: Path, missing_ok: bool = False) -> None:
                if self.suffix == ".xml":
                    _die()
                real_unlink(self, missing_ok=missing_ok)

            Path.unlink = unlink  # type: ignore[method-assign]
        apply()
        os._exit(0)

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL, f"the child was not killed at {point}: {p.exitcode}"


# -- the folder and macOS appliers -----------------------------------------------------------


def mac(tmp_path: Path) -> MacApplier:
    return MacApplier(tmp_path / "home")


def folder(tmp_path: Path) -> FolderApplier:
    return FolderApplier(tmp_path / "wef")


@pytest.mark.parametrize("make", [folder, mac], ids=["folder", "mac"])
def test_kill_between_temp_write_and_rename_leaves_the_previous_state(
    tmp_path: Path, make: Callable[[Path], FolderApplier | MacApplier]
) -> None:
    a = make(tmp_path)
    a.apply(Host.WORD, BEFORE)
    d = a.folder(Host.WORD)
    visible = {k: v for k, v in tree(d).items() if k.endswith(".xml")}
    killed_during(lambda: make(tmp_path).apply(Host.WORD, AFTER), "rename")
    # The temporary file was complete and flushed, yet what Office reads is unchanged.
    assert {k: v for k, v in tree(d).items() if k.endswith(".xml")} == visible
    assert a.current(Host.WORD) == shas(BEFORE)
    assert any(n.endswith(".part") for n in tree(d))  # the kill really landed there
    a.apply(Host.WORD, AFTER)
    assert a.current(Host.WORD) == shas(AFTER)
    assert not any(n.endswith(".part") for n in tree(d))


@pytest.mark.parametrize("make", [folder, mac], ids=["folder", "mac"])
def test_kill_before_old_files_are_removed_converges(
    tmp_path: Path, make: Callable[[Path], FolderApplier | MacApplier]
) -> None:
    a = make(tmp_path)
    a.apply(Host.WORD, BEFORE)
    killed_during(lambda: make(tmp_path).apply(Host.WORD, AFTER), "prune")
    # New files complete, the old one still there: a superset, every file whole.
    assert a.current(Host.WORD) == {**shas(BEFORE), **shas(AFTER)}
    a.apply(Host.WORD, AFTER)
    assert a.current(Host.WORD) == shas(AFTER)


def test_mac_writes_each_hosts_wef_folder_and_only_its_own_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    a = MacApplier(home)
    word = home / "Library/Containers/com.microsoft.Word/Data/Documents/wef"
    excel = home / "Library/Containers/com.microsoft.Excel/Data/Documents/wef"
    ppt = home / "Library/Containers/com.microsoft.Powerpoint/Data/Documents/wef"
    assert (a.folder(Host.WORD), a.folder(Host.EXCEL), a.folder(Host.POWERPOINT)) == (
        word,
        excel,
        ppt,
    )
    # A developer's own files, one of them a manifest of the same add-in the agent places.
    word.mkdir(parents=True)
    foreign = {
        "manifest.xml": XML[A, 1],
        f"{A}.xml": XML[A, 2],
        "addin-agent.notes.txt": b"mine",
        ".DS_Store": b"\0",
    }
    for name, data in foreign.items():
        (word / name).write_bytes(data)
    before = {n: os.stat(word / n).st_mtime_ns for n in foreign}

    a.apply(Host.WORD, applied((A, 1), (B, 1)))
    a.apply(Host.EXCEL, applied((A, 1)))
    assert (word / f"addin-agent.{A}.xml").read_bytes() == XML[A, 1]
    assert (word / f"addin-agent.{B}.xml").read_bytes() == XML[B, 1]
    assert (excel / f"addin-agent.{A}.xml").read_bytes() == XML[A, 1]
    assert not ppt.exists()  # nothing to place there, so nothing created
    assert a.current(Host.WORD) == shas(applied((A, 1), (B, 1)))

    a.apply(Host.WORD, {})  # everything removed from Word
    assert a.current(Host.WORD) == {}
    assert sorted(p.name for p in word.iterdir()) == sorted(foreign)
    for name, data in foreign.items():
        assert (word / name).read_bytes() == data
        assert os.stat(word / name).st_mtime_ns == before[name]
    assert a.current(Host.EXCEL) == shas(applied((A, 1)))  # other hosts untouched


@pytest.mark.parametrize("make", [folder, mac], ids=["folder", "mac"])
def test_outlook_is_never_placed(
    tmp_path: Path, make: Callable[[Path], FolderApplier | MacApplier]
) -> None:
    a = make(tmp_path)
    mail = {A: applied((A, 1))[A]}
    a.apply(Host.OUTLOOK, mail)
    assert tree(tmp_path) == {}
    assert a.current(Host.OUTLOOK) == {}
    assert a.survey(Host.OUTLOOK).note == MAILBOX


def test_folder_applier_empties_an_outlook_folder_an_earlier_version_wrote(
    tmp_path: Path,
) -> None:
    old = tmp_path / "wef" / "Outlook"
    old.mkdir(parents=True)
    (old / f"{A}.xml").write_bytes(XML[A, 1])
    (old / "readme.txt").write_bytes(b"not ours")
    FolderApplier(tmp_path / "wef").apply(Host.OUTLOOK, applied((A, 1)))
    assert sorted(p.name for p in old.iterdir()) == ["readme.txt"]


def test_survey_lists_foreign_files_and_what_the_host_loads(tmp_path: Path) -> None:
    a = mac(tmp_path)
    a.apply(Host.WORD, applied((A, 1)))
    (a.folder(Host.WORD) / "manifest.xml").write_bytes(XML[B, 1])
    s = a.survey(Host.WORD)
    assert s.problems == []
    assert s.foreign == ["manifest.xml"]
    assert s.loads == [
        f"addin-agent.{A}.xml (alpha 1.0.0.0, id {A})",
        f"manifest.xml (beta 1.0.0.0, id {B}, not the agent's)",
    ]
    # A developer's manifest of the same add-in as the agent's: Office would see it twice.
    (a.folder(Host.WORD) / "dev.xml").write_bytes(XML[A, 2])
    assert a.survey(Host.WORD).foreign == [
        f"dev.xml (the same add-in as the agent's addin-agent.{A}.xml)",
        "manifest.xml",
    ]
    # A file where the folder should be: the agent cannot write there.
    blocked = a.folder(Host.EXCEL)
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"")
    assert a.survey(Host.EXCEL).problems == [f"{blocked} exists but is not a folder"]
    # Missing but creatable is fine.
    assert a.survey(Host.POWERPOINT).problems == []


# -- the Windows registry planner (pure) -----------------------------------------------------

W, X = r"C:\agent\Word", r"C:\agent\Excel"


def test_plan_adds_and_removes_only_the_agents_values() -> None:
    current = {
        "MyDevAddin": r"C:\dev\alpha\manifest.xml",  # a developer's, same add-in: kept
        r"C:\dev\beta.xml": r"C:\dev\beta.xml",  # the old dev-settings naming: kept
        "RuntimeLogging": r"C:\logs",
        f"addin-agent.{B}": rf"{W}\{B}.xml",  # ours, no longer wanted
    }
    p = plan({Host.WORD: {A: rf"{W}\{A}.xml"}}, current, launching=Host.WORD)
    assert p.put == {f"addin-agent.{A}": rf"{W}\{A}.xml"}
    assert p.delete == (f"addin-agent.{B}",)


def test_plan_is_empty_when_the_registry_already_matches() -> None:
    held = {Host.WORD: {A: rf"{W}\{A}.xml"}}
    # Windows compares value names without case.
    p = plan(held, {f"ADDIN-AGENT.{A}": rf"{W}\{A}.xml"}, launching=Host.WORD)
    assert (p.put, p.delete) == ({}, ())
    assert plan({}, {"Foreign": "x"}) == plan({}, {})


def test_plan_one_value_per_addin_across_hosts() -> None:
    held = {Host.WORD: {A: rf"{W}\{A}.xml"}, Host.EXCEL: {A: rf"{X}\{A}.xml"}}
    name = f"addin-agent.{A}"
    at_excel = {name: rf"{X}\{A}.xml"}
    # The launching host's copy wins ...
    assert plan(held, at_excel, launching=Host.WORD).put == {name: rf"{W}\{A}.xml"}
    # ... otherwise a value naming one of the add-in's copies is kept.
    assert plan(held, at_excel, launching=Host.POWERPOINT).put == {}
    assert plan(held, at_excel).put == {}
    # A value naming a copy no host holds any more moves to one that does.
    gone = {name: r"C:\agent\PowerPoint\old.xml"}
    assert plan(held, gone).put == {name: rf"{W}\{A}.xml"}
    assert plan({Host.EXCEL: held[Host.EXCEL]}, {name: rf"{W}\{A}.xml"}).put == at_excel


# -- the Windows applier's file side, with the registry key in a file --------------------------


def windows(tmp_path: Path) -> WindowsApplier:
    return WindowsApplier(tmp_path / "store", FileRegistry(tmp_path / "registry.json"))


FOREIGN_VALUES = {"MyDevAddin": r"C:\dev\manifest.xml", "UseDirectDebugger": "1"}


def _seed(tmp_path: Path) -> WindowsApplier:
    FileRegistry(tmp_path / "registry.json")._save(dict(FOREIGN_VALUES))
    a = windows(tmp_path)
    a.apply(Host.WORD, BEFORE)
    return a


def _registry_is_whole(a: WindowsApplier) -> dict[str, str]:
    """Every value the agent owns names a complete manifest; foreign values are untouched.
    Returns {addin_id: sha256 of the manifest its value names}."""
    values = a.registry.values()
    assert {k: v for k, v in values.items() if not k.startswith("addin-agent.")} == FOREIGN_VALUES
    out = {}
    known = {hashlib.sha256(x).hexdigest() for x in XML.values()}
    for name, path in values.items():
        if name.startswith("addin-agent."):
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            assert digest in known, f"{name} names a file that is not a whole manifest"
            out[name.removeprefix("addin-agent.")] = digest
    return out


def test_windows_values_name_the_manifests_in_the_store(tmp_path: Path) -> None:
    a = _seed(tmp_path)
    assert _registry_is_whole(a) == shas(BEFORE)
    assert a.registry.values()[f"addin-agent.{A}"] == str(tmp_path / "store" / "Word" / f"{A}.xml")
    a.apply(Host.WORD, AFTER)
    assert _registry_is_whole(a) == shas(AFTER)
    assert sorted(p.name for p in (tmp_path / "store" / "Word").iterdir()) == sorted(
        f"{x}.xml" for x in AFTER
    )
    # Excel launches holding A too: one value, naming Excel's copy now; Word drops A: the
    # value stays, on Excel's copy.
    a.apply(Host.EXCEL, applied((A, 2)))
    assert a.registry.values()[f"addin-agent.{A}"].endswith(os.path.join("Excel", f"{A}.xml"))
    a.apply(Host.WORD, applied((C, 1)))
    assert _registry_is_whole(a) == {**shas(applied((A, 2))), **shas(applied((C, 1)))}
    a.apply(Host.OUTLOOK, applied((B, 1)))  # nothing for Outlook
    assert B not in _registry_is_whole(a)
    a.apply(Host.EXCEL, {})
    a.apply(Host.WORD, {})
    assert _registry_is_whole(a) == {}
    assert a.registry.values() == FOREIGN_VALUES


@pytest.mark.parametrize("point", ["rename", "put", "delete", "prune"])
def test_windows_kill_at_any_step_leaves_whole_manifests_and_converges(
    tmp_path: Path, point: str
) -> None:
    a = _seed(tmp_path)
    before = a.registry.values()
    killed_during(lambda: windows(tmp_path).apply(Host.WORD, AFTER), point)
    now = _registry_is_whole(a)
    if point in ("rename", "put"):
        assert a.registry.values() == before  # no value changed yet
    else:
        assert now == shas(AFTER) | ({B: shas(BEFORE)[B]} if point == "delete" else {})
    a.apply(Host.WORD, AFTER)
    assert _registry_is_whole(a) == shas(AFTER)
    assert a.current(Host.WORD) == shas(AFTER)
    assert not any(n.endswith(".part") for n in tree(tmp_path / "store"))


def test_windows_survey_names_the_key_and_foreign_values(tmp_path: Path) -> None:
    a = _seed(tmp_path)
    s = a.survey(Host.WORD)
    assert DEVELOPER_KEY in s.location
    assert s.foreign == [f"{k} = {v}" for k, v in sorted(FOREIGN_VALUES.items())]
    assert sorted(s.loads) == sorted(
        [f"{A}.xml (alpha 1.0.0.0, id {A})", f"{B}.xml (beta 1.0.0.0, id {B})"]
    )
    assert a.survey(Host.EXCEL).loads == [f"{A}.xml (alpha 1.0.0.0, id {A})"]
    (tmp_path / "store" / "Word" / f"{B}.xml").unlink()
    assert a.survey(Host.WORD).problems == [
        f"addin-agent.{B} names {tmp_path / 'store' / 'Word' / f'{B}.xml'}, "
        "which is missing or unreadable"
    ]


# -- remembered hashes (a launch does not re-read intact files) ------------------------------------


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Write `data` over `path` (same inode) until its ctime differs from before: the file
    times come from a coarse clock, and the memo is only told of changes that show there."""
    before = os.stat(path).st_ctime_ns
    for _ in range(10_000):
        with open(path, "r+b") as f:
            f.write(data)
        if os.stat(path).st_ctime_ns != before:
            return
    raise AssertionError("ctime never moved")


def test_a_remembered_hash_is_read_again_when_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = FolderApplier(tmp_path)
    a.apply(Host.WORD, applied((A, 1), (B, 1)))
    target = a.folder(Host.WORD) / f"{A}.xml"
    # Just written: not remembered (a change within the same clock tick would not show).
    assert a.current(Host.WORD) == shas(applied((A, 1), (B, 1)))
    assert a._files._hashes._known == {}
    # Read long enough after the last change: remembered, and not read again.
    real_ns = applier_module.time.time_ns
    monkeypatch.setattr(applier_module.time, "time_ns", lambda: real_ns() + 2 * SETTLED_NS)
    assert a.current(Host.WORD) == shas(applied((A, 1), (B, 1)))
    assert str(target) in a._files._hashes._known
    # Changed in place, same size: read again, and the next launch writes it back.
    forged = XML[A, 1].replace(b"alpha", b"ALPHA")
    assert len(forged) == len(XML[A, 1]) and forged != XML[A, 1]
    _rewrite_in_place(target, forged)
    assert a.current(Host.WORD)[A] == hashlib.sha256(forged).hexdigest()
    with pytest.raises(ValueError, match="no manifest XML"):
        a.apply(Host.WORD, {A: AppliedManifest(A, "1.0.0.0", shas(applied((A, 1)))[A], None)})
    a.apply(Host.WORD, applied((A, 1), (B, 1)))
    assert target.read_bytes() == XML[A, 1]
    # A removed file is forgotten, and reported missing.
    (a.folder(Host.WORD) / f"{B}.xml").unlink()
    assert a.current(Host.WORD) == shas(applied((A, 1)))
    assert not any(k.endswith(f"{B}.xml") for k in a._files._hashes._known)


# -- configuration -----------------------------------------------------------------------------


def test_tilde_is_the_home_in_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "agent.toml"
    conf.write_text(
        'tenant = "contoso"\nuser_id = "ann"\nclient_id = "pc"\ninsecure = true\n'
        'applier = "folder"\napplier_dir = "~/wef"\n'
    )
    cfg = load_config(conf, env={})
    assert cfg.applier_dir == str(home / "wef")
    from_env = load_config(conf, env={"ADDIN_AGENT_APPLIER_DIR": "~/other"})
    assert from_env.applier_dir == str(home / "other")
    on_mac = make_applier(load_config(conf, env={"ADDIN_AGENT_APPLIER": "mac"}))
    assert isinstance(on_mac, MacApplier) and on_mac.root == home
    make_applier(cfg).apply(Host.WORD, applied((A, 1)))
    assert (home / "wef" / "Word" / f"{A}.xml").is_file()
    assert not (tmp_path / "~").exists()


def test_windows_applier_is_refused_off_windows(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            env={},
            tenant="contoso",
            user_id="ann",
            client_id="pc",
            insecure=True,
            applier="windows",
        )
    assert "works on Windows only" in str(e.value)


def test_an_agent_toml_without_an_applier_places_add_ins_where_its_platforms_office_loads_them() -> (
    None
):
    from agent.config import default_applier

    assert default_applier("darwin") == "mac"
    assert default_applier("win32") == "windows"
    assert default_applier("linux") == "memory"  # no Office on Linux: `folder` is opt-in
