"""The (simulated) Office Store: a folder of add-ins by asset id, each with its versions.

Layout, one folder per asset id (``WA`` + digits)::

    store_catalog/WA104379501/store.json     {"name": ..., "published": "1.0.0"}
    store_catalog/WA104379501/1.0.0.xml      one manifest file per version
    store_catalog/WA104379501/1.1.0.xml

``published`` is the version the Store offers when an admin adds the add-in; the
`store publish` operation stands for the Store releasing a newer version later.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from addin_core.version import compare_versions

DEFAULT_CATALOG = Path(__file__).with_name("store_catalog")
ASSET_ID_RE = re.compile(r"^WA[0-9]{6,12}$")


class StoreError(LookupError):
    """Unknown asset id or version in the store catalog."""


@dataclass(frozen=True)
class StoreAddin:
    asset_id: str
    name: str
    published: str
    folder: Path

    def versions(self) -> list[str]:
        found = [p.stem for p in self.folder.glob("*.xml")]
        # Sorted by version order, not text order (1.10 > 1.9).
        return sorted(found, key=_VersionKey)

    def manifest(self, version: str) -> bytes:
        path = self.folder / f"{version}.xml"
        if version not in self.versions():
            raise StoreError(
                f"store add-in {self.asset_id} has no version {version!r}; "
                f"available: {', '.join(self.versions())}"
            )
        return path.read_bytes()


class _VersionKey:
    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return compare_versions(self.v, other.v) < 0


class StoreCatalog:
    def __init__(self, root: Path = DEFAULT_CATALOG) -> None:
        self.root = Path(root)

    def get(self, asset_id: str) -> StoreAddin:
        if not isinstance(asset_id, str) or not ASSET_ID_RE.match(asset_id):
            raise StoreError(f"invalid store asset id {asset_id!r}: expected WA followed by digits")
        folder = self.root / asset_id
        meta_path = folder / "store.json"
        if not meta_path.is_file():
            raise StoreError(f"store asset {asset_id} is not in the store catalog ({self.root})")
        meta = json.loads(meta_path.read_text())
        return StoreAddin(asset_id, str(meta["name"]), str(meta["published"]), folder)
