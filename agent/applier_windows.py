"""The Windows applier: the per-user developer add-in registry values Office reads at startup.

Office on Windows loads, at each start of Word, Excel or PowerPoint, the manifest named by
every string value under ``HKEY_CURRENT_USER\\Software\\Microsoft\\Office\\16.0\\WEF\\Developer``
(value name: any id; value data: the manifest file's path) for which the manifest lists that
app. This is how Microsoft's ``office-addin-dev-settings register`` sideloads an add-in.

The agent keeps the manifests in its state folder, ``<store>/<Host>/<addin-id>.xml`` (written
atomically like the folder applier), and owns only the values named ``addin-agent.<addin-id>``;
every other value (a developer's, another tool's) is left alone, even one for the same add-in.
The key is one per user, not one per app, so it holds ONE value per add-in: Office shows the
add-in in every app its manifest lists, and the value points at the copy of the app that
launched last (the others hold the same or an older version until their own launch).

Split in two so the logic is tested anywhere: `plan` (pure: which values to put and delete)
and `WinregRegistry`, the thin executor over ``winreg`` that only runs on Windows. It has not
been run on Windows in this project's CI (docs/agent.md). Outlook is not placed (`MAILBOX`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from addin_core.manifest import ManifestError, parse_manifest
from addin_core.protocol import Host
from agent.applier import (
    ID_PATTERN,
    MAILBOX,
    UNPLACED,
    AppliedManifest,
    ApplierUnavailable,
    ManagedFolder,
    Survey,
    describe_manifest,
    folder_owned,
    writable_problems,
)

DEVELOPER_KEY = r"Software\Microsoft\Office\16.0\WEF\Developer"
"""Under HKEY_CURRENT_USER: per user, no administrator rights needed."""

KEY_SHOWN = "HKEY_CURRENT_USER\\" + DEVELOPER_KEY

VALUE_PREFIX = "addin-agent."
"""Start of every value name the agent owns under `DEVELOPER_KEY`."""


def value_name(addin_id: str) -> str:
    return VALUE_PREFIX + addin_id


def owned_id(name: str) -> str | None:
    """The add-in id of a value the agent owns, else None. Registry names are compared
    without regard to case, as Windows does."""
    if not name.lower().startswith(VALUE_PREFIX):
        return None
    rest = name[len(VALUE_PREFIX) :]
    return rest if re.fullmatch(ID_PATTERN, rest) else None


@dataclass(frozen=True, slots=True)
class RegistryPlan:
    """What to change under `DEVELOPER_KEY`: values to create or overwrite, then to delete."""

    put: dict[str, str] = field(default_factory=dict)
    delete: tuple[str, ...] = ()


def plan(
    held: Mapping[Host, Mapping[str, str]],
    current: Mapping[str, str],
    launching: Host | None = None,
) -> RegistryPlan:
    """The changes that make the agent's values name exactly the add-ins in `held`.

    `held`: per host, ``{addin_id: path of the manifest the agent keeps for it}``;
    `current`: every string value under the key, ``{name: data}``, foreign ones included;
    `launching`: the host being applied now: its copy wins for the add-ins it holds.
    Otherwise a value that already points at one of the add-in's copies is kept, else it
    points at the first host's copy (Word, Excel, PowerPoint order). Values not owned
    (`owned_id`) are never in the plan."""
    ours = {n.lower(): n for n in current if owned_id(n) is not None}
    order = [*([launching] if launching is not None else []), *(h for h in Host if h != launching)]
    desired: dict[str, str] = {}
    for host in order:
        for addin_id, path in held.get(host, {}).items():
            name = value_name(addin_id)
            if name in desired:
                continue
            copies = [held[h][addin_id] for h in order if addin_id in held.get(h, {})]
            was = current.get(ours.get(name.lower(), ""))
            keep = was in copies and host != launching
            desired[name] = was if keep and was is not None else path
    put = {n: p for n, p in desired.items() if current.get(ours.get(n.lower(), "")) != p}
    wanted = {n.lower() for n in desired}
    delete = tuple(sorted(real for low, real in ours.items() if low not in wanted))
    return RegistryPlan(put, delete)


class Registry(Protocol):
    """The string values under `DEVELOPER_KEY`."""

    def values(self) -> dict[str, str]: ...

    def put(self, name: str, data: str) -> None: ...

    def delete(self, name: str) -> None: ...


class WinregRegistry:
    """The executor: `DEVELOPER_KEY` under HKEY_CURRENT_USER through ``winreg``. Windows
    only; NOT run in this project's CI (there is no Windows runner)."""

    def __init__(self) -> None:
        if sys.platform != "win32":
            raise ApplierUnavailable(
                "applier = 'windows' writes the Windows registry and works on Windows only"
            )

    def values(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if sys.platform == "win32":
            import winreg

            try:
                key = winreg.OpenKey(winreg.HKEY_CURRENT_USER, DEVELOPER_KEY, 0, winreg.KEY_READ)
            except FileNotFoundError:
                return out
            with key:
                for i in range(winreg.QueryInfoKey(key)[1]):  # bounded: the value count
                    try:
                        name, data, kind = winreg.EnumValue(key, i)
                    except OSError:
                        break  # values removed meanwhile
                    if kind in (winreg.REG_SZ, winreg.REG_EXPAND_SZ):
                        out[name] = str(data)
        return out

    def put(self, name: str, data: str) -> None:
        if sys.platform == "win32":
            import winreg

            # Creates the key when missing; a REG_SZ value is written whole or not at all.
            with winreg.CreateKeyEx(
                winreg.HKEY_CURRENT_USER, DEVELOPER_KEY, 0, winreg.KEY_WRITE
            ) as key:
                winreg.SetValueEx(key, name, 0, winreg.REG_SZ, data)

    def delete(self, name: str) -> None:
        if sys.platform == "win32":
            import winreg

            try:
                with winreg.OpenKey(
                    winreg.HKEY_CURRENT_USER, DEVELOPER_KEY, 0, winreg.KEY_SET_VALUE
                ) as key:
                    winreg.DeleteValue(key, name)
            except FileNotFoundError:
                pass  # already gone: the goal


class WindowsApplier:
    """Manifests in ``<store>/<Host>/<addin-id>.xml``, registry values pointing at them.

    Order gives the crash safety: new files are written (atomically) before any value
    points at them, values are put, then deleted, and only then are files no value needs
    removed; a crash anywhere leaves every value naming a complete file, and the next launch
    converges (`apply` is idempotent)."""

    needs_xml = True
    unplaced = UNPLACED

    def __init__(self, store: str | Path, registry: Registry | None = None) -> None:
        self.store = Path(store).expanduser().absolute()
        self.registry: Registry = registry if registry is not None else WinregRegistry()
        self._files = ManagedFolder(
            lambda addin_id: f"{addin_id}.xml", folder_owned, tmp_prefix=".tmp-"
        )

    def folder(self, host: Host) -> Path:
        return self.store / host.value

    def _held(self) -> dict[Host, dict[str, str]]:
        return {
            h: {a: str(self.folder(h) / f"{a}.xml") for a in self._files.current(self.folder(h))}
            for h in Host
            if h not in self.unplaced
        }

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None:
        if host in self.unplaced:
            return
        d = self.folder(host)
        self._files.write(d, addins)
        held = self._held()
        held[host] = {a: str(d / f"{a}.xml") for a in addins}
        p = plan(held, self.registry.values(), launching=host)
        for name, data in p.put.items():
            self.registry.put(name, data)
        for name in p.delete:
            self.registry.delete(name)
        self._files.prune(d, set(addins))

    def current(self, host: Host) -> dict[str, str]:
        return {} if host in self.unplaced else self._files.current(self.folder(host))

    def survey(self, host: Host) -> Survey:
        if host in self.unplaced:
            return Survey(host, "the mailbox", note=MAILBOX)
        d = self.folder(host)
        s = Survey(host, f"{KEY_SHOWN} → {d}")
        s.problems = writable_problems(d)
        try:
            values = self.registry.values()
        except OSError as e:
            s.problems.append(f"{KEY_SHOWN} cannot be read: {e}")
            return s
        for name, data in sorted(values.items()):
            path = Path(data)
            mine = owned_id(name) is not None
            if not mine:
                s.foreign.append(f"{name} = {data}")
            try:
                hosts = parse_manifest(path.read_bytes()).hosts
            except (OSError, ManifestError):
                if mine:
                    s.problems.append(f"{name} names {data}, which is missing or unreadable")
                continue
            if host in hosts:
                s.loads.append(describe_manifest(path, mine))
        return s
