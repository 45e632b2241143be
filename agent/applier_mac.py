"""The macOS applier: each host app's developer add-in folder.

Office for Mac loads, at each launch, every manifest in its sandbox container's ``wef``
folder (the folder Microsoft documents for sideloading, and the one its own
``office-addin-dev-settings`` reads)::

    ~/Library/Containers/com.microsoft.Word/Data/Documents/wef
    ~/Library/Containers/com.microsoft.Excel/Data/Documents/wef
    ~/Library/Containers/com.microsoft.Powerpoint/Data/Documents/wef

The folder is shared with the user and their developer tools, so the agent owns only files
named ``addin-agent.<addin-id>.xml``: it writes and removes those and nothing else, even a
file holding a manifest of the same add-in (``doctor`` lists such files). Outlook for Mac has
no such folder (`agent.applier.MAILBOX`).
"""

from __future__ import annotations

import re
from pathlib import Path

from addin_core.protocol import Host
from agent.applier import ID_PATTERN, MAILBOX, UNPLACED, AppliedManifest, ManagedFolder, Survey

CONTAINERS = {
    Host.WORD: "com.microsoft.Word",
    Host.EXCEL: "com.microsoft.Excel",
    Host.POWERPOINT: "com.microsoft.Powerpoint",  # sic: Microsoft's container id
}

PREFIX = "addin-agent."
"""Start of every file the agent owns in a ``wef`` folder."""

_OWNED = re.compile(rf"^{re.escape(PREFIX)}({ID_PATTERN})\.xml$")


def _owned(name: str) -> str | None:
    m = _OWNED.match(name)
    return m.group(1) if m else None


class MacApplier:
    """Writes ``<root>/Library/Containers/<container>/Data/Documents/wef/addin-agent.<id>.xml``
    per host; `root` is the user's home (a temporary folder in tests)."""

    needs_xml = True
    unplaced = UNPLACED

    def __init__(self, root: str | Path = "~") -> None:
        self.root = Path(root).expanduser()
        # The temporary file is not *.xml, so Office never loads half a manifest.
        self._files = ManagedFolder(
            lambda addin_id: f"{PREFIX}{addin_id}.xml", _owned, tmp_prefix=".addin-agent-tmp-"
        )

    def folder(self, host: Host) -> Path:
        container = CONTAINERS[host]
        return self.root / "Library" / "Containers" / container / "Data" / "Documents" / "wef"

    def apply(self, host: Host, addins: dict[str, AppliedManifest]) -> None:
        if host in self.unplaced:
            return
        self._files.sync(self.folder(host), addins)

    def current(self, host: Host) -> dict[str, str]:
        return {} if host in self.unplaced else self._files.current(self.folder(host))

    def survey(self, host: Host) -> Survey:
        if host in self.unplaced:
            return Survey(host, "the mailbox", note=MAILBOX)
        return self._files.survey(host, self.folder(host))
