"""Which applier a configuration asks for (config field ``applier``), built from its fields."""

from __future__ import annotations

from pathlib import Path

from agent.applier import Applier, FolderApplier, MemoryApplier
from agent.config import AgentConfig

STORE_NAME = "addin-manifests"
"""The Windows applier's manifest folder, next to the cache unless ``applier_dir`` names one."""


def windows_store(cfg: AgentConfig) -> Path:
    if cfg.applier_dir:
        return Path(cfg.applier_dir)
    return Path(cfg.cache_path).expanduser().absolute().parent / STORE_NAME


def make_applier(cfg: AgentConfig) -> Applier:
    """The applier `cfg` names. Raises `ApplierUnavailable` for one this computer cannot run
    (the registry off Windows)."""
    if cfg.applier == "folder":
        assert cfg.applier_dir is not None  # the config requires it
        return FolderApplier(cfg.applier_dir)
    if cfg.applier == "mac":
        from agent.applier_mac import MacApplier

        return MacApplier(cfg.applier_root or "~")
    if cfg.applier == "windows":
        from agent.applier_windows import WindowsApplier

        return WindowsApplier(windows_store(cfg))
    return MemoryApplier()
