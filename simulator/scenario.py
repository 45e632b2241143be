"""Scenario files: YAML with an organisation shape, add-ins, and timed steps.

```yaml
name: phased-rollout
description: pilot group -> a department -> everyone
org: {groups: 40, nesting_depth: 0, nested_groups: false}   # one user per client
cache: memory            # or "file": one SQLite file per client (survives going offline),
                         # or "none": no SQL at all (the agent's volatile cache; least memory)
start: before            # clients connect before step 1; "storm": a step starts them all cold
addins:
  notes: {hosts: [Word, Excel], permissions: ReadDocument, version: 1.0.0.0}
setup:                   # admin actions before clients connect; not measured
  - upload: {addin: notes}
steps:
  - name: pilot
    do:
      - assign: {addin: notes, target: "group:pilot", mode: fixed}
      - launches: {rate: 0.2, duration: 2}
      - checkpoint: {}
```

A step's `do` items run in order; then the coordinator waits until every online client's
entitlements equal the oracle's (the convergence curve) and records the step's latencies.
Group and user names may be placeholders: `@rank:K` is the K-th largest group (0 = largest),
`@child` the first group with a parent, `@user:K` the K-th user.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from addin_core.protocol import Host
from addin_core.validation import validation_problems

ADMIN_OPS = {
    "upload",
    "assign",
    "unassign",
    "consent",
    "enable",
    "disable",
    "remove",
    "add_member",
    "remove_member",
    "add_parent",
    "remove_parent",
    "policy",
    "churn",
    "rollout",
    "rollout_advance",
    "rollout_wait",
    "rollback",
}
FAULTS = {"broker_restart", "broker_kill", "server_restart", "offline", "online", "duplicates"}
OTHER = {"launches", "wait", "checkpoint", "start_clients"}
ALL_ITEMS = ADMIN_OPS | FAULTS | OTHER


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrgShape(_Model):
    groups: int = Field(default=40, ge=1, le=100_000)
    nesting_depth: int = Field(default=0, ge=0, le=20)
    nested_groups: bool = False


class AddinSpec(_Model):
    hosts: list[Host]
    permissions: str
    version: str = "1.0.0.0"
    name: str | None = None


class Step(_Model):
    name: str
    do: list[dict[str, Any]] = []
    settle_timeout: float = Field(default=30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _items(self) -> Step:
        for i, item in enumerate(self.do):
            if len(item) != 1:
                raise ValueError(f"step {self.name!r} item {i + 1}: one action per item: {item}")
            (key,) = item
            if key not in ALL_ITEMS:
                raise ValueError(
                    f"step {self.name!r} item {i + 1}: unknown action {key!r}; "
                    f"known: {', '.join(sorted(ALL_ITEMS))}"
                )
            if item[key] is None:
                item[key] = {}
            if not isinstance(item[key], dict):
                raise ValueError(f"step {self.name!r} item {i + 1}: {key} takes a mapping")
        return self


class Scenario(_Model):
    name: str
    description: str = ""
    org: OrgShape = OrgShape()
    cache: Literal["memory", "file", "none"] = "memory"
    start: Literal["before", "storm"] = "before"
    addins: dict[str, AddinSpec] = {}
    setup: list[dict[str, Any]] = []
    steps: list[Step]

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        for item in self.setup:
            if len(item) != 1 or next(iter(item)) not in ADMIN_OPS:
                raise ValueError(f"setup items must be admin actions, got {item}")
        for step in [*self.steps, Step(name="setup", do=self.setup)]:
            for item in step.do:
                (key,) = item
                alias = item[key].get("addin")
                if alias is not None and alias not in self.addins:
                    raise ValueError(f"step {step.name!r}: {key} names unknown add-in {alias!r}")
        if self.start == "storm" and not any(
            "start_clients" in item for s in self.steps for item in s.do
        ):
            raise ValueError("start: storm needs a step with `start_clients: {}`")
        return self


def builtin_names() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("simulator.scenarios").iterdir()
        if p.name.endswith(".yaml")
    )


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            text, origin = path.read_text(), str(path)
        except OSError as e:
            raise ScenarioError(f"cannot read scenario {path}: {e}") from e
    else:
        res = resources.files("simulator.scenarios") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ScenarioError(
                f"no scenario named {name_or_path!r}; shipped: {', '.join(builtin_names())}"
            )
        text, origin = res.read_text(), f"{name_or_path} (shipped)"
    return parse_scenario(text, origin)


def parse_scenario(text: str, origin: str = "scenario") -> Scenario:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ScenarioError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ScenarioError(f"{origin}: expected a mapping at the top level")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(f"{origin}: {validation_problems(e.errors(), 'scenario')}") from None
