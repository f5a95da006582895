"""A study's grid: axes of levels, their Cartesian product × seeds, and each point's name.

An axis is a config key with values (``--grid method.lambd=0.002,0.005``) or a list of labelled
levels, each a set of overrides and optionally another recipe (the loss study's "invariance
only", a "method" axis of recipes). A point is one level of every axis and a seed; it trains as
an ordinary run directory named after its config differences, e.g.
``method.lambd=0.005,seed=1``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RECIPE_KEY = "recipe"  # a grid key naming the recipe of each point instead of a config key
SEED_KEY = "train.seed"
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")
_MAX_NAME = 150  # characters of a point's directory name before it is shortened with a hash


@dataclass(frozen=True)
class Level:
    """One value of an axis: ``overrides`` (``key=TOML value`` strings), an optional recipe,
    the label shown in tables and plots, and ``x`` where the level sits on a numeric axis."""

    label: str
    overrides: tuple[str, ...] = ()
    recipe: str | None = None
    x: float | None = None
    name: str | None = None  # the directory-name part; None: derived from the overrides

    def part(self) -> str:
        """This level's piece of a point's directory name."""
        if self.name:
            return self.name
        pieces = [f"{RECIPE_KEY}={self.recipe}"] if self.recipe else []
        pieces += [_display(item) for item in self.overrides]
        return ",".join(pieces) or self.label

    def config_keys(self) -> list[str]:
        return [item.partition("=")[0].strip() for item in self.overrides]


@dataclass(frozen=True)
class Axis:
    name: str
    levels: tuple[Level, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError(f"grid axis {self.name!r} has no values; give at least one")


@dataclass(frozen=True)
class Point:
    """One run of a study: its index, one level per axis, the seed, its recipe, the overrides
    applied after the study's own, and its directory name."""

    index: int
    levels: tuple[Level, ...]
    seed: int
    recipe: str
    overrides: tuple[str, ...]
    name: str
    labels: dict[str, str] = field(default_factory=dict)  # axis name -> level label

    def group(self) -> tuple[str, ...]:
        """The levels without the seed: points of one group are averaged over seeds."""
        return tuple(level.label for level in self.levels)


def toml_value(value: Any) -> str:
    """A Python value as TOML override text (``0.005``, ``true``, ``"64-64"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"grid value {value!r} is not finite; TOML has no such number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, e.g. data.view_changes
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"grid value {value!r} is not a TOML number, string, boolean, list or table")


def _display(item: str) -> str:
    key, _, text = item.partition("=")
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return f"{key.strip()}={text}"


def _number(text: str) -> float | None:
    try:
        value = float(text.strip().strip("\"'"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def split_values(text: str) -> list[str]:
    """``v1,v2,...`` split on commas outside quotes and brackets (``[1, 2]`` stays whole)."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    if any(not v for v in values):
        raise ValueError(f"--grid values {text!r} include an empty value; write v1,v2,...")
    return values


def key_axis(key: str, values: Sequence[Any], *, texts: bool = False) -> Axis:
    """An axis over one config key (or ``recipe``); ``texts``: the values are override text as
    typed on the command line, else Python values from a study file."""
    key = key.strip()
    if "." not in key and key != RECIPE_KEY:
        raise ValueError(
            f"grid key {key!r} must look like section.key (e.g. method.lambd) or be {RECIPE_KEY!r}"
        )
    levels = []
    for value in values:
        text = str(value) if texts else (value if key == RECIPE_KEY else toml_value(value))
        label = _display(f"{key}={text}").partition("=")[2]
        if key == RECIPE_KEY:
            levels.append(Level(label=label, recipe=label, name=f"{RECIPE_KEY}={label}"))
        else:
            levels.append(Level(label=label, overrides=(f"{key}={text}",), x=_number(text)))
    return Axis(key, tuple(levels))


def parse_grid(option: str) -> Axis:
    """``--grid key=v1,v2,...`` as an axis."""
    key, sep, values = option.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ValueError(f"--grid {option!r} must look like section.key=v1,v2,...")
    return key_axis(key, split_values(values), texts=True)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` as integers."""
    try:
        seeds = tuple(int(s) for s in split_values(text))
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be integers joined by commas, e.g. 0,1") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed; give each once")
    return seeds


def safe_name(text: str) -> str:
    """A directory name: characters outside ``A-Za-z0-9._,=+-`` become ``_``; a long name is
    cut and keeps a hash of the whole."""
    name = _UNSAFE.sub("_", text).strip(".") or "point"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_NAME - 9]}-{digest}"
    return name


def expand(
    axes: Sequence[Axis],
    seeds: Sequence[int],
    recipe: str,
    overrides: Iterable[str] = (),
    baseline_seeds: Sequence[int] = (),
) -> list[Point]:
    """The Cartesian product of the axes' levels × seeds, in order (the last axis and then the
    seed vary fastest). ``overrides`` (the study's and the user's ``--set``) come first in each
    point's overrides, the levels' after them, the seed last. ``baseline_seeds``: further seeds
    for the baseline point only (every axis at its first level), so a study shows its seed noise
    at the price of one point per seed instead of a whole grid."""
    check_axes(axes, overrides)
    points: list[Point] = []
    for n, levels in enumerate(itertools.product(*(axis.levels for axis in axes))):
        extra = [s for s in baseline_seeds if s not in seeds] if n == 0 else []
        for seed in [*seeds, *extra]:
            point_recipe = next((lv.recipe for lv in reversed(levels) if lv.recipe), recipe)
            items = (*overrides, *(o for lv in levels for o in lv.overrides), f"{SEED_KEY}={seed}")
            parts = [lv.part() for lv in levels] + [f"seed={seed}"]
            points.append(
                Point(
                    index=len(points),
                    levels=tuple(levels),
                    seed=seed,
                    recipe=point_recipe,
                    overrides=items,
                    name=safe_name(",".join(parts)),
                    labels={axis.name: lv.label for axis, lv in zip(axes, levels, strict=True)},
                )
            )
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two grid points share the directory name {twice[0]!r}; name the levels")
    return points


def check_axes(axes: Sequence[Axis], overrides: Iterable[str]) -> None:
    """Refuse a grid whose axes repeat a key, or a ``--set`` of a key the grid varies."""
    names = [axis.name for axis in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"the grid names axis {names!r} twice; give each key one --grid")
    varied: dict[str, str] = {}
    for axis in axes:
        for key in {k for level in axis.levels for k in level.config_keys()}:
            if key in varied and varied[key] != axis.name:
                raise ValueError(f"grid axes {varied[key]!r} and {axis.name!r} both set {key}")
            varied[key] = axis.name
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in varied or key == SEED_KEY:
            what = f"grid axis {varied[key]!r}" if key in varied else "--seeds"
            raise ValueError(f"--set {item} conflicts with the {what}; drop one of them")


def describe(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """The axes as JSON (``study.json``)."""
    return [
        {
            "name": axis.name,
            "levels": [
                {"label": lv.label, "overrides": list(lv.overrides), "recipe": lv.recipe}
                for lv in axis.levels
            ],
        }
        for axis in axes
    ]
