"""The 三事分流责任清单: configuration applied after the model.

For each 三事 class the list gives its colour, handling mode and time limit; it maps handling units to the class they
normally serve. A suggestion carries the class's fields, and a suggestion whose 三事 class and unit contradict the list
is sent to a person.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sanshi_ml import resource

DEFAULT_POLICY_FILE = resource("sanshi_policy.yaml")


class PolicyError(ValueError):
    """A responsibility list that cannot be used; the message names the file and the key."""


class _ClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    aliases: list[str] = Field(default_factory=list)
    colour: str
    colour_hex: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")
    handled_by: str
    handling_mode: str
    handling_steps: str = ""
    time_limit_days: int = Field(gt=0)
    matters: list[str] = Field(default_factory=list)


class _PolicySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    classes: dict[str, _ClassSpec]
    units: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _units_name_known_classes(self) -> _PolicySpec:
        known = set(self.classes)
        for spec in self.classes.values():
            known.update(spec.aliases)
        bad = {unit: cls for unit, cls in self.units.items() if cls not in known}
        if bad:
            raise ValueError("units map to unknown 三事 classes: " + ", ".join(f"{u} -> {c}" for u, c in bad.items()))
        return self


@dataclass(frozen=True)
class SanshiClass:
    """One 三事 class and how it is handled."""

    name: str
    colour: str
    colour_hex: str
    handled_by: str
    handling_mode: str
    handling_steps: str
    time_limit_days: int
    aliases: tuple[str, ...] = ()
    matters: tuple[str, ...] = ()


@dataclass(frozen=True)
class TriagePolicy:
    """A loaded 责任清单, plus which model targets hold the 三事 class and the handling unit."""

    name: str
    version: str
    classes: dict[str, SanshiClass]
    units: dict[str, str]
    sanshi_target: str = "sanshi"
    unit_target: str = "unit"
    sha256: str = ""
    _alias: dict[str, str] = field(default_factory=dict, repr=False)

    def class_info(self, label: str | None) -> SanshiClass | None:
        """The class for a 三事 label or one of its aliases (大事, 小事, 私事, …)."""
        if label is None:
            return None
        return self.classes.get(self._alias.get(label, label))

    def expected_class(self, unit: str | None) -> str | None:
        """The 三事 class a unit normally serves, or None if the list does not constrain it."""
        if unit is None or unit not in self.units:
            return None
        return self._alias.get(self.units[unit], self.units[unit])

    def contradicts(self, sanshi_label: str | None, unit_label: str | None) -> bool:
        """True where the list maps the unit to a different 三事 class than the one predicted."""
        expected = self.expected_class(unit_label)
        if expected is None or sanshi_label is None:
            return False
        return self._alias.get(sanshi_label, sanshi_label) != expected

    def contradictions(self, sanshi_labels: Sequence[str], unit_labels: Sequence[str]) -> np.ndarray:
        """Vectorised :meth:`contradicts` for a batch."""
        return np.fromiter(
            (self.contradicts(s, u) for s, u in zip(sanshi_labels, unit_labels)), dtype=bool, count=len(sanshi_labels)
        )

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "sanshi_target": self.sanshi_target,
            "unit_target": self.unit_target,
            "classes": {name: asdict(cls) for name, cls in self.classes.items()},
            "units": dict(self.units),
        }


def load_policy(
    path: str | Path | None = None, sanshi_target: str = "sanshi", unit_target: str = "unit"
) -> TriagePolicy:
    """Read a 责任清单 YAML (the built-in default when ``path`` is None) and validate it."""
    path = Path(path) if path else DEFAULT_POLICY_FILE
    if not path.exists():
        raise PolicyError(f"{path}: 责任清单 not found")
    raw_bytes = path.read_bytes()
    try:
        raw = yaml.safe_load(raw_bytes.decode("utf-8"))
        spec = _PolicySpec.model_validate(raw)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: not valid UTF-8 YAML: {error}") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in error.errors())
        raise PolicyError(f"{path}: {problems}") from None
    classes = {
        name: SanshiClass(
            name=name,
            colour=c.colour,
            colour_hex=c.colour_hex,
            handled_by=c.handled_by,
            handling_mode=c.handling_mode,
            handling_steps=c.handling_steps,
            time_limit_days=c.time_limit_days,
            aliases=tuple(c.aliases),
            matters=tuple(c.matters),
        )
        for name, c in spec.classes.items()
    }
    alias = {a: name for name, c in spec.classes.items() for a in c.aliases}
    return TriagePolicy(
        name=spec.name,
        version=spec.version,
        classes=classes,
        units=dict(spec.units),
        sanshi_target=sanshi_target,
        unit_target=unit_target,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        _alias=alias,
    )
