"""Reading users, groups, memberships and nesting from LDAP (OpenLDAP, Active Directory) with
`ldap3`, for `addin-server directory sync` and the periodic sync of `serve`.

Why ldap3 (docs/server.md "Directory sync"): pure Python, so the server extra installs on
any platform without libldap/libsasl headers or a C compiler (python-ldap needs both); it
speaks LDAPv3 with StartTLS and LDAPS, paged searches (Active Directory returns at most 1,000
entries per page), and is what most Python tools that read AD use.

Memberships come from both directions and are united: a group's ``member`` values (OpenLDAP
``groupOfNames``, AD groups) and a user's or a group's ``memberOf`` (AD, or OpenLDAP's
memberof overlay). AD returns a large group's ``member`` in ranges that a plain search does
not follow; its members' ``memberOf`` still lists the group, so the union is complete. A ``member`` that is a
group's DN is nesting (that group is a child of this one); a DN outside the users and groups
read (a contact, a computer, an entry outside the base) is ignored.

Ids: the user id attribute (``uid``, else AD's ``sAMAccountName``) and the group's ``cn``,
made safe for the protocol (letters, digits, ``._@-``; other runs become ``-``). The
display name is ``displayName``, else ``cn``.

`read_directory` does blocking network I/O: `serve` runs it in a thread.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_USER_FILTER = "(|(objectClass=inetOrgPerson)(&(objectClass=user)(objectCategory=person)))"
DEFAULT_GROUP_FILTER = "(|(objectClass=groupOfNames)(objectClass=group))"
USER_ID_ATTRIBUTES = ("uid", "sAMAccountName")
PAGE_SIZE = 500
TIMEOUT = 30
"""Seconds for connecting and for each answer."""


class LdapError(RuntimeError):
    """The directory could not be read: says which server and why, in one line."""


@dataclass(frozen=True)
class LdapSettings:
    url: str
    base: str
    bind_dn: str | None = None
    password: str | None = None
    user_filter: str = DEFAULT_USER_FILTER
    group_filter: str = DEFAULT_GROUP_FILTER
    user_id_attribute: str | None = None
    """None: ``uid``, else ``sAMAccountName``."""
    ca_file: Path | None = None
    """The CA that signed the ``ldaps://`` server's certificate; None: the system's CAs."""
    start_tls: bool = False
    """On ``ldap://``: StartTLS before the bind (the certificate verified as for ldaps://);
    a server that cannot is an error, never a fall back to plain text."""


@dataclass
class DirectoryData:
    """What the directory holds, in the server's terms."""

    users: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    members: set[tuple[str, str]] = field(default_factory=set)
    """(group, user)"""
    nesting: set[tuple[str, str]] = field(default_factory=set)
    """(child, parent)"""
    skipped: list[str] = field(default_factory=list)
    """Entries left out, and why (no id, an id two entries share)."""


def safe_id(value: str) -> str:
    """`value` as a protocol id: runs of other characters become ``-``, at most 128."""
    slug = re.sub(r"[^A-Za-z0-9._@-]+", "-", value).strip("-._@")
    return slug[:128]


def norm_dn(dn: str) -> str:
    """A DN compared as LDAP does for our purposes: case and spaces around separators."""
    return ",".join("=".join(x.strip() for x in rdn.split("=", 1)) for rdn in dn.lower().split(","))


def _first(entry: Mapping[str, Any], *names: str) -> str | None:
    for n in names:
        v = entry.get(n)
        if isinstance(v, list | tuple):
            v = v[0] if v else None
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        if v:
            return str(v)
    return None


def _values(entry: Mapping[str, Any], name: str) -> list[str]:
    v = entry.get(name) or []
    if isinstance(v, str | bytes):
        v = [v]
    return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in v]


def build(
    users: Iterable[tuple[str, Mapping[str, Any]]],
    groups: Iterable[tuple[str, Mapping[str, Any]]],
    user_id_attribute: str | None = None,
) -> DirectoryData:
    """The directory from (dn, attributes) entries: pure, so it is tested on its own."""
    out = DirectoryData()
    user_by_dn: dict[str, str] = {}
    id_names = (user_id_attribute,) if user_id_attribute else USER_ID_ATTRIBUTES
    member_of: list[tuple[str, list[str]]] = []
    for dn, attrs in users:
        raw = _first(attrs, *id_names)
        uid = safe_id(raw) if raw else ""
        if not uid:
            out.skipped.append(f"user {dn}: no {' or '.join(id_names)}")
            continue
        if uid in out.users:
            out.skipped.append(f"user {dn}: id {uid!r} is already another user's")
            continue
        out.users[uid] = _first(attrs, "displayName", "cn") or uid
        user_by_dn[norm_dn(dn)] = uid
        member_of.append((uid, _values(attrs, "memberOf")))
    group_by_dn: dict[str, str] = {}
    group_members: list[tuple[str, list[str]]] = []
    group_parents: list[tuple[str, list[str]]] = []
    for dn, attrs in groups:
        cn = _first(attrs, "cn")
        gid = safe_id(cn) if cn else ""
        if not gid:
            out.skipped.append(f"group {dn}: no cn")
            continue
        if gid in out.groups:
            out.skipped.append(f"group {dn}: id {gid!r} is already another group's")
            continue
        out.groups[gid] = cn or gid
        group_by_dn[norm_dn(dn)] = gid
        group_members.append((gid, _values(attrs, "member")))
        group_parents.append((gid, _values(attrs, "memberOf")))
    for gid, members in group_members:
        for m in members:
            key = norm_dn(m)
            if key in user_by_dn:
                out.members.add((gid, user_by_dn[key]))
            elif key in group_by_dn and group_by_dn[key] != gid:
                out.nesting.add((group_by_dn[key], gid))
    for gid, parents in group_parents:
        for dn in parents:
            parent = group_by_dn.get(norm_dn(dn))
            if parent is not None and parent != gid:
                out.nesting.add((gid, parent))
    for uid, groups_of in member_of:
        for g in groups_of:
            parent = group_by_dn.get(norm_dn(g))
            if parent is not None:
                out.members.add((parent, uid))
    return out


def read_password(path: Path) -> str:
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as e:
        raise LdapError(f"cannot read the bind password from {path}: {e.strerror or e}") from None


def read_directory(s: LdapSettings) -> DirectoryData:
    """Read the directory under `s.base` (blocking)."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    id_attrs = [s.user_id_attribute] if s.user_id_attribute else list(USER_ID_ATTRIBUTES)
    # ldap3 does not verify an ldaps:// certificate unless told to: a directory that anyone
    # on the path can impersonate would decide who gets which add-in.
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(s.ca_file) if s.ca_file else None)
    if s.start_tls and not s.url.lower().startswith("ldap://"):
        raise LdapError(f"StartTLS is for ldap:// URLs; {s.url} is not one")
    try:
        server = ldap3.Server(s.url, connect_timeout=TIMEOUT, get_info=ldap3.NONE, tls=tls)
        conn = ldap3.Connection(
            server,
            user=s.bind_dn,
            password=s.password,
            read_only=True,
            receive_timeout=TIMEOUT,
            raise_exceptions=True,
        )
        if s.start_tls:
            # Encrypted (and the server verified) before the bind sends the password.
            conn.open()
            conn.start_tls()
        conn.bind()
    except LDAPException as e:
        raise LdapError(f"cannot bind to {s.url} as {s.bind_dn or 'anonymous'}: {e}") from None
    try:
        users = _search(conn, s.base, s.user_filter, [*id_attrs, "displayName", "cn", "memberOf"])
        groups = _search(conn, s.base, s.group_filter, ["cn", "member", "memberOf"])
    except LDAPException as e:
        raise LdapError(f"cannot search {s.base!r} on {s.url}: {e}") from None
    finally:
        conn.unbind()
    return build(users, groups, s.user_id_attribute)


def _search(conn: Any, base: str, flt: str, attrs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    import ldap3

    entries = conn.extend.standard.paged_search(
        base, flt, search_scope=ldap3.SUBTREE, attributes=attrs, paged_size=PAGE_SIZE,
        generator=True,
    )  # fmt: skip
    return [
        (str(e["dn"]), dict(e.get("attributes") or {}))
        for e in entries
        if e.get("type") == "searchResEntry"
    ]
