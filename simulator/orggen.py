"""Deterministic organisation generator and synthetic LOB manifests.

An organisation is users plus groups whose sizes are heavy-tailed (a few very large groups,
many small ones — what real directories look like), optionally nested to a given depth. The
same seed always gives the same organisation, byte for byte, so a simulation can be re-run.

Pure: builds values and text; the CLI writes them.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from addin_core.protocol import Host

PILOT_GROUP = "pilot"
"""Every generated organisation has a small `pilot` group (about 2 % of users): phased rollouts
start there, as Microsoft's guidance recommends."""


@dataclass
class Group:
    id: str
    name: str
    members: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)


@dataclass
class Org:
    """Ground truth of a generated organisation (users and groups only; add-ins come from the
    scenario)."""

    tenant: str
    users: list[str]
    groups: list[Group]
    nested_groups: bool = False

    def group(self, group_id: str) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(f"no group {group_id!r} in the organisation")

    def groups_by_size(self) -> list[Group]:
        """Largest first; ties broken by id so the order is deterministic."""
        return sorted(self.groups, key=lambda g: (-len(g.members), g.id))

    def to_document(self) -> dict[str, Any]:
        """The ORG document (`addin-server load` / `POST /v1/org`)."""
        return {
            "tenant": self.tenant,
            "policy": {"nested_groups": self.nested_groups},
            "users": [{"id": u, "name": f"User {u[1:].lstrip('0') or '0'}"} for u in self.users],
            "groups": [
                {"id": g.id, "name": g.name, "members": list(g.members), "parents": list(g.parents)}
                for g in self.groups
            ],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_document(), sort_keys=False, width=120)


def user_id(index: int) -> str:
    return f"u{index:05d}"


def generate_org(
    users: int,
    groups: int,
    *,
    nesting_depth: int = 0,
    seed: int = 1,
    tenant: str = "contoso",
    nested_groups: bool = False,
    pareto_alpha: float = 1.2,
) -> Org:
    """Build an organisation of `users` users and `groups` groups (the first is `pilot`).

    Group sizes follow a Pareto distribution (shape `pareto_alpha`), capped at the number of
    users. With `nesting_depth` D > 0 the non-pilot groups are spread over D+1 levels and every
    group below the top level gets a parent one level up (and, one time in five, a second
    parent), so the longest chain of parents has D links.
    """
    if users < 1:
        raise ValueError("an organisation needs at least one user")
    if groups < 1:
        raise ValueError("an organisation needs at least one group (the pilot group)")
    if nesting_depth < 0:
        raise ValueError("nesting depth cannot be negative")
    rng = random.Random(seed)
    user_ids = [user_id(i) for i in range(1, users + 1)]
    pilot_size = max(1, round(users * 0.02))
    made = [Group(PILOT_GROUP, "Pilot", sorted(rng.sample(user_ids, pilot_size)))]
    width = max(3, len(str(groups)))
    for i in range(1, groups):
        size = min(users, max(1, int(rng.paretovariate(pareto_alpha) * max(2, users // 200))))
        gid = f"grp-{i:0{width}d}"
        made.append(Group(gid, f"Group {i}", sorted(rng.sample(user_ids, size))))
    if nesting_depth > 0 and len(made) > 2:
        others = made[1:]
        levels: list[list[Group]] = [[] for _ in range(nesting_depth + 1)]
        for i, g in enumerate(others):
            levels[i % (nesting_depth + 1)].append(g)
        for depth in range(1, nesting_depth + 1):
            above = levels[depth - 1]
            if not above:
                break
            for g in levels[depth]:
                g.parents.append(rng.choice(above).id)
                if rng.random() < 0.2:
                    second = rng.choice(above).id
                    if second not in g.parents:
                        g.parents.append(second)
    return Org(tenant, user_ids, made, nested_groups)


# -- synthetic LOB manifests -----------------------------------------------------------------

_HOST_ELEMENT = {
    Host.WORD: "Document",
    Host.EXCEL: "Workbook",
    Host.POWERPOINT: "Presentation",
    Host.OUTLOOK: "Mailbox",
}

_TASKPANE = """<?xml version="1.0" encoding="UTF-8"?>
<OfficeApp xmlns="http://schemas.microsoft.com/office/appforoffice/1.1"
           xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="TaskPaneApp">
  <Id>{id}</Id>
  <Version>{version}</Version>
  <ProviderName>Contoso IT</ProviderName>
  <DefaultLocale>en-US</DefaultLocale>
  <DisplayName DefaultValue="{name}"/>
  <Description DefaultValue="{name}: a line-of-business add-in generated by addin-sim"/>
  <Hosts>
{hosts}
  </Hosts>
  <DefaultSettings>
    <SourceLocation DefaultValue="https://addins.contoso.example/{slug}/{version}/taskpane.html"/>
  </DefaultSettings>
  <Permissions>{permissions}</Permissions>
</OfficeApp>
"""

_MAIL = """<?xml version="1.0" encoding="UTF-8"?>
<OfficeApp xmlns="http://schemas.microsoft.com/office/appforoffice/1.1"
           xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="MailApp">
  <Id>{id}</Id>
  <Version>{version}</Version>
  <ProviderName>Contoso IT</ProviderName>
  <DefaultLocale>en-US</DefaultLocale>
  <DisplayName DefaultValue="{name}"/>
  <Description DefaultValue="{name}: a line-of-business mail add-in generated by addin-sim"/>
  <Hosts>
    <Host Name="Mailbox"/>
  </Hosts>
  <Requirements>
    <Sets>
      <Set Name="Mailbox" MinVersion="1.1"/>
    </Sets>
  </Requirements>
  <FormSettings>
    <Form xsi:type="ItemRead">
      <DesktopSettings>
        <SourceLocation DefaultValue="https://addins.contoso.example/{slug}/{version}/read.html"/>
        <RequestedHeight>250</RequestedHeight>
      </DesktopSettings>
    </Form>
  </FormSettings>
  <Permissions>{permissions}</Permissions>
  <Rule xsi:type="RuleCollection" Mode="Or">
    <Rule xsi:type="ItemIs" ItemType="Message" FormType="Read"/>
  </Rule>
</OfficeApp>
"""


def addin_guid(alias: str, seed: int) -> str:
    """A stable GUID for a scenario's add-in alias (lowercase, like the manifest reader's)."""
    rng = random.Random(f"{seed}:{alias}")
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_manifest(
    addin_id: str,
    *,
    name: str,
    version: str,
    hosts: list[Host] | tuple[Host, ...],
    permissions: str,
) -> bytes:
    """A valid Office manifest: a MailApp when `hosts` is Outlook only, else a TaskPaneApp."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "addin"
    safe_name = name.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    fields = {
        "id": addin_id,
        "version": version,
        "name": safe_name,
        "slug": slug,
        "permissions": permissions,
    }
    if list(hosts) == [Host.OUTLOOK]:
        return _MAIL.format(**fields).encode()
    if Host.OUTLOOK in hosts:
        raise ValueError("a generated add-in is either Outlook only (MailApp) or document hosts")
    lines = "\n".join(f'    <Host Name="{_HOST_ELEMENT[h]}"/>' for h in hosts)
    return _TASKPANE.format(hosts=lines, **fields).encode()
