"""Studies: a recipe, a grid and seeds; the shipped ones (``studies/*.toml``) and sweeps.

A shipped study file holds what every scale shares (title, the paper's numbers and finding, the
plot) and one table per scale (``[cpu]``, ``[gpu]``) with its recipe, epochs, seeds, overrides
and axes::

    title = "λ, the weight of the redundancy-reduction term"
    source = "Zbontar et al., 2021, Fig. 5 (ImageNet, 300 epochs, linear top-1 %)"
    expect = "flat over 0.002–0.02"
    plot = { x = "method.lambd", log_x = true }

    [[paper]]                       # the paper's number beside matching rows
    "method.lambd" = "0.005"        # axis name = level label
    top1 = 71.4

    [cpu]
    recipe = "fashion-mnist"
    epochs = 10
    seeds = [0]
    set = ["data.train_subset=10000"]

    [[cpu.axis]]                    # a key and its values …
    key = "method.lambd"
    values = [0.0005, 0.002, 0.005, 0.02, 0.05]

    [[cpu.axis]]                    # … or labelled levels of overrides (and recipes)
    name = "method"
    levels = [{ label = "Barlow Twins" }, { label = "SimCLR", recipe = "simclr-fashion-mnist" }]
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from barlow.study.grid import (
    Axis,
    Level,
    Point,
    describe,
    expand,
    key_axis,
    toml_value,
)

SCALES = ("cpu", "gpu")
_STUDY_KEYS = {"title", "source", "expect", "notes", "plot", "paper", *SCALES}
_SCALE_KEYS = {"recipe", "epochs", "seeds", "baseline_seeds", "set", "axis", "notes"}
_LEVEL_KEYS = {"label", "set", "recipe", "x", "name"}


@dataclass(frozen=True)
class Study:
    """What a study runs: every point of ``axes`` × ``seeds`` trains ``recipe`` (or its level's)
    with ``overrides`` and then its levels' overrides."""

    name: str
    recipe: str
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    scale: str | None = None
    baseline_seeds: tuple[int, ...] = ()  # more seeds for the baseline point only
    title: str = ""
    source: str = ""  # where the paper's numbers come from
    expect: str = ""  # the paper's finding, in words
    notes: str = ""
    paper: tuple[Mapping[str, Any], ...] = ()  # {axis name: level label, ..., "top1": number}
    plot: Mapping[str, Any] = field(default_factory=dict)  # x (axis name), log_x (bool)

    def points(self) -> list[Point]:
        return expand(self.axes, self.seeds, self.recipe, self.overrides, self.baseline_seeds)

    def manifest(self) -> dict[str, Any]:
        """What ``study.json`` records, and what a re-run into the directory must match."""
        return {
            "name": self.name,
            "scale": self.scale,
            "recipe": self.recipe,
            "grid": describe(self.axes),
            "seeds": list(self.seeds),
            "overrides": list(self.overrides),
            **({"baseline_seeds": list(self.baseline_seeds)} if self.baseline_seeds else {}),
        }

    def paper_number(self, labels: Mapping[str, str]) -> float | None:
        """The paper's top-1 for a row whose levels are ``labels`` (axis name -> label)."""
        for entry in self.paper:
            match = {k: str(v) for k, v in entry.items() if k != "top1"}
            if match.items() <= labels.items():
                return float(entry["top1"])
        return None


def shipped_studies() -> dict[str, Path]:
    """Studies packaged with barlow, by name (file stem)."""
    folder = resources.files("barlow") / "studies"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def load_study(
    name_or_path: str,
    scale: str,
    *,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
) -> Study:
    """A shipped study by name (or a study TOML file) at ``scale``; ``epochs`` and ``overrides``
    (``--epochs``, ``--set``) apply to every point, after the study's own."""
    studies = shipped_studies()
    path = studies.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no study {name_or_path!r}: not a shipped study ({', '.join(sorted(studies))}) "
            "nor a TOML file"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"study {path} is not valid TOML: {exc}") from exc
    return study_from_dict(path.stem, raw, scale, epochs=epochs, overrides=overrides, where=path)


def study_from_dict(
    name: str,
    raw: Mapping[str, Any],
    scale: str,
    *,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    where: Path | str = "study",
) -> Study:
    """Build a :class:`Study` from a parsed study file (see the module docstring)."""
    _only_keys(raw, _STUDY_KEYS, f"{where}")
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if not isinstance(raw.get(scale), Mapping):
        raise ValueError(f"{where} has no [{scale}] table; it defines {_scales(raw)}")
    table = raw[scale]
    _only_keys(table, _SCALE_KEYS, f"{where} [{scale}]")
    if "recipe" not in table or "axis" not in table:
        raise ValueError(f"{where} [{scale}] needs a recipe and at least one [[{scale}.axis]]")
    items = list(table.get("set", []))
    if table.get("epochs") is not None:
        items.append(f"train.epochs={int(table['epochs'])}")
    if epochs is not None:
        items.append(f"train.epochs={epochs}")
    return Study(
        name=name,
        recipe=str(table["recipe"]),
        axes=tuple(_axis(a, f"{where} [[{scale}.axis]]") for a in table["axis"]),
        seeds=tuple(int(s) for s in table.get("seeds", [0])),
        overrides=(*items, *overrides),
        scale=scale,
        baseline_seeds=tuple(int(s) for s in table.get("baseline_seeds", [])),
        title=str(raw.get("title", "")),
        source=str(raw.get("source", "")),
        expect=str(raw.get("expect", "")),
        notes=" ".join(str(n) for n in (raw.get("notes"), table.get("notes")) if n),
        paper=tuple(raw.get("paper", [])),
        plot=dict(raw.get("plot", {})),
    )


def _scales(raw: Mapping[str, Any]) -> str:
    found = [s for s in SCALES if s in raw]
    return ", ".join(f"[{s}]" for s in found) or "no scale"


def _only_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(allowed))})"
        )


def _axis(raw: Mapping[str, Any], where: str) -> Axis:
    """``{key, values}`` or ``{name, levels}``."""
    if "key" in raw:
        _only_keys(raw, {"key", "values"}, where)
        return key_axis(str(raw["key"]), list(raw.get("values", [])))
    _only_keys(raw, {"name", "levels"}, where)
    if "name" not in raw:
        raise ValueError(f"{where} needs key + values, or name + levels")
    levels = []
    for level in raw.get("levels", []):
        _only_keys(level, _LEVEL_KEYS, f"{where} level")
        sets = _dotted(level.get("set", {}))
        levels.append(
            Level(
                label=str(level["label"]),
                overrides=tuple(f"{k}={toml_value(v)}" for k, v in sets.items()),
                recipe=level.get("recipe"),
                x=float(level["x"]) if "x" in level else None,
                name=level.get("name"),
            )
        )
    return Axis(str(raw["name"]), tuple(levels))


def _dotted(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{method = {lambd = 0.01}}`` (TOML's reading of ``method.lambd = 0.01``) as
    ``{"method.lambd": 0.01}``; a table below ``section.key`` is that key's value (e.g.
    ``data.view_changes = {solarize_p = 0.0}``)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "." not in name:
            flat.update(_dotted(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def sweep_study(
    recipe: str,
    axes: Sequence[Axis],
    *,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    overrides: Sequence[str] = (),
) -> Study:
    """``barlow sweep RECIPE --grid ...``: the study of one recipe over ``axes``."""
    if not axes:
        raise ValueError("barlow sweep needs at least one --grid key=v1,v2,...")
    items = [f"train.epochs={epochs}"] if epochs is not None else []
    name = Path(recipe).stem
    return Study(name, recipe, tuple(axes), tuple(seeds), (*items, *overrides))
