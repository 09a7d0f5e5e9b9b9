"""Search spaces of `roiqa tune` (YAML -> frozen Params), config overrides by dotted key, and the weighted objective."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from roiqa.config import RoiqaConfig, _coerce

LOGUNIFORM, UNIFORM, QUNIFORM, CHOICE = "loguniform", "uniform", "quniform", "choice"
CONTINUOUS = (LOGUNIFORM, UNIFORM, QUNIFORM)  # kinds with [low, high] bounds (what PB2 can search)
_ARITY = {LOGUNIFORM: 2, UNIFORM: 2, QUNIFORM: 3}  # numbers in the YAML list of each continuous kind
OBJECTIVE_KEY = "objective"  # the one top-level YAML key that is not a dotted parameter key


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key "section.field", e.g. "train.lr"
    kind: str  # loguniform | uniform | quniform | choice
    low: float | None = None  # lower bound (continuous kinds), inclusive
    high: float | None = None  # upper bound (continuous kinds), inclusive
    q: float | None = None  # quantisation step (quniform): samples are multiples of q
    values: tuple[float, ...] | None = None  # the candidates (choice)

    def sample(self, rng: np.random.Generator) -> float:
        """One value drawn like Ray Tune's distribution of the same name (quniform: round(x / q) * q)."""
        if self.kind == CHOICE:
            return float(self.values[int(rng.integers(len(self.values)))])
        if self.kind == LOGUNIFORM:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        x = float(rng.uniform(self.low, self.high))
        if self.kind == QUNIFORM:
            x = float(np.clip(round(x / self.q) * self.q, self.low, self.high))
        return x


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]  # the searched config fields, in YAML order
    objective: dict[str, float]  # {reported metric: weight}; the objective is their weighted sum (maximised)

    def keys(self) -> list[str]:
        """The dotted config keys searched, in order."""
        return [p.key for p in self.params]

    def continuous_only(self) -> SearchSpace:
        """This space, or ValueError when a parameter has no [low, high] bounds (choice), as PB2 needs bounds."""
        bad = [p.key for p in self.params if p.kind not in CONTINUOUS]
        if bad:
            raise ValueError(f"PB2 needs bounds for every parameter; these are 'choice': {bad}; use uniform/loguniform")
        return self

    def bounds(self) -> dict[str, list[float]]:
        """{key: [low, high]} of every parameter, PB2's `hyperparam_bounds` (ValueError on a choice parameter)."""
        self.continuous_only()
        return {p.key: [float(p.low), float(p.high)] for p in self.params}

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        """{key: value}, one draw of every parameter (a reference for Ray's sampling, and tests)."""
        return {p.key: p.sample(rng) for p in self.params}


def _field_type(key: str, where: str) -> Any:
    """The annotated type of config field `key` = "section.field"; ValueError naming `where` and the key."""
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{where}: key {key!r} must be 'section.field', e.g. 'train.lr'")
    section, name = parts
    sections = {f.name: f for f in dataclasses.fields(RoiqaConfig)}
    if section not in sections:
        raise ValueError(f"{where}: key {key!r}: unknown config section {section!r}; sections: {sorted(sections)}")
    cls = typing.get_type_hints(RoiqaConfig)[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"{where}: key {key!r}: {section} has no field {name!r}; fields: {sorted(hints)}")
    return hints[name]


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        hint = " (YAML reads 1e-4 as a string: write 1.0e-4)" if isinstance(v, str) else ""
        raise ValueError(f"{where}: expected a number, got {v!r}{hint}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _multiple(x: float, q: float) -> bool:
    return math.isclose(x / q, round(x / q), rel_tol=0.0, abs_tol=1e-9)


def _parse_param(key: str, spec: Any, name: str) -> Param:
    where = f"{name}: {key}"
    tp = _field_type(key, name)
    if tp not in (float, int):
        raise ValueError(f"{where}: only float or int fields can be searched; {key} is {tp}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}: expected one of {{loguniform|uniform: [low, high]}}, {{quniform: [low, high, q]}}, "
                         f"{{choice: [v, ...]}}; got {spec!r}")  # fmt: skip
    ((kind, args),) = spec.items()
    if kind not in (*CONTINUOUS, CHOICE):
        raise ValueError(f"{where}: unknown distribution {kind!r}; known: {[*CONTINUOUS, CHOICE]}")
    if not isinstance(args, list):
        raise ValueError(f"{where}: {kind} takes a list, got {args!r}")
    nums = tuple(_number(v, f"{where}.{kind}[{i}]") for i, v in enumerate(args))
    if kind == CHOICE:
        if not nums:
            raise ValueError(f"{where}: choice needs at least one value")
        if len(set(nums)) != len(nums):
            raise ValueError(f"{where}: choice has repeated values {list(nums)}")
        return Param(key, kind, values=nums)
    if len(nums) != _ARITY[kind]:
        raise ValueError(f"{where}: {kind} takes {_ARITY[kind]} numbers, got {list(args)}")
    low, high = nums[:2]
    if not low < high:
        raise ValueError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == LOGUNIFORM and low <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0, got {low}")
    q = None
    if kind == QUNIFORM:
        q = nums[2]
        if q <= 0 or q > high - low:
            raise ValueError(f"{where}: quniform needs 0 < q <= high - low, got q={q}")
        if not (_multiple(low, q) and _multiple(high, q)):  # Ray Tune rejects such bounds too
            raise ValueError(f"{where}: quniform bounds [{low}, {high}] must be multiples of q={q}")
    return Param(key, kind, low, high, q)


def _parse_objective(data: Any, name: str) -> dict[str, float]:
    where = f"{name}: {OBJECTIVE_KEY}"
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected a non-empty mapping {{metric: weight}}, got {data!r}")
    out = {}
    for metric, w in data.items():
        if not isinstance(metric, str) or not metric.isidentifier():
            raise ValueError(f"{where}: metric name {metric!r} must be a plain identifier, e.g. val_map")
        w = _number(w, f"{where}.{metric}")
        if w <= 0:
            raise ValueError(f"{where}.{metric}: weights must be > 0, got {w}")
        out[metric] = w
    return out


def parse_search_space(data: dict, name: str = "search space") -> SearchSpace:
    """A SearchSpace from a dict {"section.field": {kind: [...]}, ..., "objective": {metric: weight}}.

    Strict: every key is a float or int field of RoiqaConfig, every distribution known and well-bounded, the
    objective present; errors name `name` (the file) and the key.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{name}: a search space must be a mapping, got {type(data).__name__}")
    if OBJECTIVE_KEY not in data:
        raise ValueError(f"{name}: missing '{OBJECTIVE_KEY}' (e.g. {{val_map: 0.5, val_loc50_refined: 0.5}})")
    params = []
    for key, spec in data.items():
        if key == OBJECTIVE_KEY:
            continue
        if not isinstance(key, str) or "." not in key:
            raise ValueError(f"{name}: unknown top-level key {key!r}; expected 'section.field' or '{OBJECTIVE_KEY}'")
        params.append(_parse_param(key, spec, name))
    if not params:
        raise ValueError(f"{name}: no parameters to search")
    return SearchSpace(tuple(params), _parse_objective(data[OBJECTIVE_KEY], name))


def load_search_space(uri: str) -> SearchSpace:
    """Read a search-space YAML (local path or any URI roiqa.io.uri reads) and parse it strictly."""
    import yaml

    from roiqa.io import uri as uri_mod

    return parse_search_space(yaml.safe_load(uri_mod.read_bytes(uri).decode("utf-8")), uri)


def _coerce_override(tp: Any, value: Any, where: str) -> Any:
    if tp in (int, float):
        v = _number(value, where)  # numpy scalars included; bools and non-finite values rejected
        return int(round(v)) if tp is int else v  # int fields: nearest integer (ties to even)
    return _coerce(tp, value, where)


def apply_overrides(cfg: RoiqaConfig, overrides: dict[str, Any]) -> RoiqaConfig:
    """`cfg` with each dotted key "section.field" set to its value, coerced to the field's type.

    Int fields take the rounded value, float fields a Python float (numpy scalars too). A key that is not a
    config field (Ray's own keys included) raises ValueError, so pass only a space's keys (see `overrides_of`).
    """
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        tp = _field_type(str(key), "overrides")
        section, name = key.split(".")
        by_section.setdefault(section, {})[name] = _coerce_override(tp, value, f"overrides: {key}")
    for section, values in by_section.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def overrides_of(config: dict, space: SearchSpace) -> dict[str, float]:
    """The space's keys picked from a flat trial config dict (Ray's `config`), as floats."""
    missing = [k for k in space.keys() if k not in config]
    if missing:
        raise ValueError(f"trial config lacks searched key(s) {missing}; has {sorted(map(str, config))}")
    return {k: _number(config[k], f"trial config: {k}") for k in space.keys()}


def objective(metrics: dict, weights: dict) -> float:
    """sum(weight * metrics[name]) over `weights`; a metric missing from `metrics` raises ValueError naming it."""
    missing = [m for m in weights if m not in metrics or metrics[m] is None]
    if missing:
        raise ValueError(f"objective: metric(s) {missing} not reported; reported: {sorted(map(str, metrics))}")
    return float(sum(float(w) * float(metrics[m]) for m, w in weights.items()))


SCHEDULERS = ("pbt", "pb2", "asha")
SEARCHERS = ("random", "optuna")


def check_sweep(scheduler: str, search: str, samples: int, cfg: RoiqaConfig) -> None:
    """A clear error for a sweep that cannot run, before Ray starts."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if search not in SEARCHERS:
        raise ValueError(f"--search must be one of {SEARCHERS}, got {search!r}")
    if search == "optuna" and scheduler != "asha":
        raise ValueError("--search optuna goes with --scheduler asha (PBT and PB2 choose new values themselves)")
    if samples < 2 and scheduler in ("pbt", "pb2"):
        raise ValueError(f"--samples must be >= 2 for {scheduler} (a population), got {samples}")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if cfg.train.epochs < 2:
        raise ValueError(f"train.epochs must be >= 2 for a sweep (one report per epoch), got {cfg.train.epochs}")


def default_point(cfg: RoiqaConfig, space: SearchSpace) -> dict[str, float]:
    """The config's own values of the searched keys (the sweep's reference trial)."""
    out = {}
    for p in space.params:
        section, field = p.key.split(".", 1)
        out[p.key] = getattr(getattr(cfg, section), field)
    return out
