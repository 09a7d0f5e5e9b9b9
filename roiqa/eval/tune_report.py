"""What a tune sweep writes: the trials table, the best trial and its config, metric curves and parameter schedules,
Markdown and the summary."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw

from roiqa import schema as S
from roiqa.config import RoiqaConfig, to_dict
from roiqa.eval.report import _PALETTE, _font, _save_png
from roiqa.io import uri as uri_mod

TRIALS = "trials.parquet"
TRIALS_MD = "trials.md"
BEST_CONFIG = "best.yaml"
BEST = "best"  # the best trial's last checkpoint: model.safetensors (a matcher checkpoint) and state.json
SUMMARY = "summary.json"

_MODES, _SCOPES = ("max", "min"), ("last", "all")


def trials_table(rows: list[dict], param_keys: Sequence[str]) -> pa.Table:
    """The trials table (schema.trials_schema(param_keys)) from one dict per (trial, reported iteration).

    Keys of a row are column names (schema.param_column(key) for parameters); trial_id and iteration are required
    in every row, absent columns are null. A dict TRIAL_CONFIG is written as JSON. Unknown keys raise ValueError.
    """
    schema = S.trials_schema(list(param_keys))
    names = set(schema.names)
    required = [f.name for f in schema if not f.nullable]
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - names)
        if unknown:
            raise ValueError(f"trials row {i}: unknown column(s) {unknown}; columns: {schema.names}")
        missing = [c for c in required if row.get(c) is None]
        if missing:
            raise ValueError(f"trials row {i}: missing required column(s) {missing}; has {sorted(row)}")
    cols = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if f.name == S.TRIAL_CONFIG:
            values = [json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in values]
        try:
            cols.append(pa.array(values, type=f.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"trials: column {f.name!r} cannot be read as {f.type}: {exc}") from exc
    return pa.Table.from_arrays(cols, schema=schema)


def _f(v: object) -> float:
    return float("nan") if v is None else float(v)


def _by_trial(table: pa.Table, column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{trial_id: (iterations, values)} sorted by trial id, then by iteration; nulls become nan."""
    if column not in table.column_names:
        raise ValueError(f"trials table has no column {column!r}; columns: {table.column_names}")
    groups: dict[str, list[tuple[int, float]]] = {}
    for t, it, v in zip(
        table.column(S.TRIAL_ID).to_pylist(), table.column(S.ITERATION).to_pylist(), table.column(column).to_pylist()
    ):
        groups.setdefault(str(t), []).append((int(it), _f(v)))
    out = {}
    for t in sorted(groups):
        pts = sorted(groups[t], key=lambda p: p[0])
        out[t] = (np.array([p[0] for p in pts], dtype=np.float64), np.array([p[1] for p in pts], dtype=np.float64))
    return out


def _last_rows(table: pa.Table) -> dict[str, dict]:
    """{trial_id: its row with the largest iteration}, sorted by trial id."""
    last: dict[str, dict] = {}
    for row in table.to_pylist():
        t = str(row[S.TRIAL_ID])
        if t not in last or row[S.ITERATION] >= last[t][S.ITERATION]:
            last[t] = row
    return {t: last[t] for t in sorted(last)}


def best_trial(
    table: pa.Table, metric: str = S.OBJECTIVE, mode: str = "max", scope: str = "last"
) -> tuple[str, int, float]:
    """(trial_id, iteration, value) of the best `metric` (`mode` "max" or "min").

    scope "last": each trial's last reported row competes; "all": every row. Null and nan values never win. Ties go
    to the smallest trial id, then the earliest iteration. ValueError on an empty table or no finite value.
    """
    if mode not in _MODES or scope not in _SCOPES:
        raise ValueError(f"best_trial: mode must be in {_MODES} and scope in {_SCOPES}; got {mode!r}, {scope!r}")
    if table.num_rows == 0:
        raise ValueError("best_trial: the trials table is empty")
    if metric not in table.column_names:
        raise ValueError(f"best_trial: no column {metric!r}; columns: {table.column_names}")
    rows = list(_last_rows(table).values()) if scope == "last" else table.to_pylist()
    cands = [(str(r[S.TRIAL_ID]), int(r[S.ITERATION]), _f(r[metric])) for r in rows]
    cands = [c for c in cands if math.isfinite(c[2])]
    if not cands:
        raise ValueError(f"best_trial: no finite {metric!r} in the trials table (scope {scope!r})")
    sign = -1.0 if mode == "max" else 1.0
    return min(cands, key=lambda c: (sign * c[2], c[0], c[1]))


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About `n` round tick values in [lo, hi] (steps of 1, 2 or 5 x 10^k; at least 1 when `integer`)."""
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1.0) if integer else step
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k within [lo, hi] (values, not logs); only the powers of ten when those are 3 or more."""
    ks = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    decades = [10.0**k for k in ks if lo <= 10.0**k <= hi]
    if len(decades) >= 3:
        return decades
    return [m * 10.0**k for k in ks for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]


def _plot(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str,
    title: str,
    ylabel: str,
    size: tuple[int, int],
    step: bool = False,
    log: bool = False,
) -> None:
    """Lines of y against iteration, one per series, with a legend in the right margin; nan breaks a line."""
    W, H = size
    if W < 400 or H < 160:
        raise ValueError(f"size {size} is too small for a plot; use at least (400, 160)")
    left, right, top, bottom = 64, 170, 30, 50  # the legend sits in the right margin, clear of the lines
    pw, ph = W - left - right, H - top - bottom  # plot area
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(12)

    xs = np.concatenate([x for x, _ in series.values()])
    ys = np.concatenate([y for _, y in series.values()])
    ys = ys[np.isfinite(ys) & ((ys > 0) if log else True)]
    x0, x1 = float(xs.min()), float(xs.max())
    if x0 == x1:  # one iteration: centre it
        x0, x1 = x0 - 1.0, x1 + 1.0
    tf = math.log10 if log else float  # value -> plotted coordinate
    if ys.size:
        y0, y1 = tf(float(ys.min())), tf(float(ys.max()))
    else:
        y0, y1 = 0.0, 1.0
    pad = (y1 - y0) * 0.05 if y1 > y0 else max(abs(y0) * 0.1, 0.1 if log else 1e-3)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1.0 - (tf(y) - y0) / (y1 - y0)) * ph

    def xy(x: float, y: float) -> tuple[float, float]:
        return px(x), py(y)

    d.text((left, 8), title, fill="black", font=font)
    for t in _ticks(x0, x1, 6, integer=True):
        d.line([(px(t), top), (px(t), top + ph)], fill=(225, 225, 225))
        d.text((px(t) - 6, top + ph + 4), f"{t:g}", fill="black", font=font)
    yticks = _log_ticks(10.0**y0, 10.0**y1) if log else _ticks(y0, y1, 5)
    for t in yticks:
        d.line([(left, py(t)), (left + pw, py(t))], fill=(225, 225, 225))
        d.text((4, py(t) - 7), f"{t:.3g}"[:9], fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 24, H - 20), "iteration", fill="black", font=font)
    d.text((4, H - 20), (ylabel + (" (log)" if log else ""))[:24], fill="black", font=font)
    if not ys.size:
        d.text((left + 8, top + ph // 2), "no finite values", fill="black", font=font)

    slots = max(1, (ph - 8) // 16)  # legend lines that fit beside the plot
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        ok = np.isfinite(y) & ((y > 0) if log else True)
        for j in range(len(x) - 1):  # segments between consecutive finite points
            if ok[j] and ok[j + 1]:
                a, b = xy(x[j], y[j]), xy(x[j + 1], y[j + 1])
                d.line([a, (b[0], a[1]), b] if step else [a, b], fill=colour, width=2)
        for j in np.flatnonzero(ok):  # a dot on every point, so a one-point trial still shows
            cx, cy = xy(x[j], y[j])
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        if i < slots - 1 or len(series) <= slots:
            ly, lx = top + 4 + 16 * i, left + pw + 12
            d.line([(lx, ly + 7), (lx + 22, ly + 7)], fill=colour, width=3)
            d.text((lx + 28, ly), name[:18], fill="black", font=font)
        elif i == slots - 1:
            d.text((left + pw + 12, top + 4 + 16 * i), f"+{len(series) - i} more", fill="black", font=font)
    _save_png(img, path)


def curves_png(table: pa.Table, metric: str, path: str, size: tuple[int, int] = (640, 480)) -> None:
    """One line per trial of `metric` against iteration, legend with (truncated) trial ids; PNG of (W, H) `size`."""
    if table.num_rows == 0:
        raise ValueError("curves_png: the trials table is empty")
    _plot(_by_trial(table, metric), path, f"{metric} per trial", metric, size)


def schedule_png(table: pa.Table, param_key: str, path: str, size: tuple[int, int] = (640, 480)) -> None:
    """The value of parameter `param_key` each trial used, per iteration, as a step plot (PBT/PB2 perturbations are
    jumps). The y axis is logarithmic when all values are > 0 and max / min > 10."""
    if table.num_rows == 0:
        raise ValueError("schedule_png: the trials table is empty")
    column = S.param_column(param_key)
    if column not in table.column_names:
        raise ValueError(f"schedule_png: parameter {param_key!r} has no column {column!r} in the trials table")
    series = _by_trial(table, column)
    ys = np.concatenate([y for _, y in series.values()])
    ys = ys[np.isfinite(ys)]
    log = bool(ys.size) and bool(np.all(ys > 0)) and float(ys.max()) / float(ys.min()) > 10.0
    _plot(series, path, f"{param_key} per trial and iteration", param_key, size, step=True, log=log)


def _fmt(v: object, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown_trials(table: pa.Table, param_keys: Sequence[str], metric: str = S.OBJECTIVE, mode: str = "max") -> str:
    """One Markdown row per trial, from its last reported iteration, best `metric` first (nan last, ties by id).

    Columns: trial, status, iterations (the last iteration number), `metric`, objective (unless that is `metric`),
    then each parameter's last value.
    """
    if mode not in _MODES:
        raise ValueError(f"markdown_trials: mode must be one of {_MODES}, got {mode!r}")
    for c in (metric, *(S.param_column(k) for k in param_keys)):
        if c not in table.column_names:
            raise ValueError(f"markdown_trials: no column {c!r}; columns: {table.column_names}")
    extra = [] if metric == S.OBJECTIVE else [S.OBJECTIVE]
    headers = ["trial", "status", "iterations", metric, *extra, *param_keys]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    sign = -1.0 if mode == "max" else 1.0

    def order(item: tuple[str, dict]) -> tuple:
        v = _f(item[1][metric])
        return (not math.isfinite(v), sign * v if math.isfinite(v) else 0.0, item[0])

    for t, row in sorted(_last_rows(table).items(), key=order):
        cells = [t, _fmt(row.get(S.STATUS)), str(row[S.ITERATION]), _fmt(row[metric])]
        cells += [_fmt(row.get(c)) for c in extra] + [_fmt(row[S.param_column(k)]) for k in param_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trial_rows(trial_id: str, metrics: pd.DataFrame, status: str, param_keys: Sequence[str]) -> list[dict]:
    """The trials-table rows of one trial from its reports (one row per training iteration, the last report of an
    iteration that was reported again after a restore)."""
    df = metrics.sort_values("training_iteration").drop_duplicates("training_iteration", keep="last")
    rows = []
    for _, r in df.iterrows():
        row = {
            S.TRIAL_ID: trial_id,
            S.ITERATION: int(r["training_iteration"]),
            S.STATUS: status,
            S.TRIAL_CONFIG: json.dumps({k: float(r[S.param_column(k)]) for k in param_keys}),
            S.SECONDS: float(r[S.SECONDS]),
            S.RESUMED_FROM: int(r[S.RESUMED_FROM]),
        }
        for col in (S.OBJECTIVE, S.VAL_LOSS, S.VAL_MAP, S.VAL_LOC50, S.VAL_LOC50_REFINED):
            row[col] = float(r[col])
        row.update({S.param_column(k): float(r[S.param_column(k)]) for k in param_keys})
        rows.append(row)
    return rows


def default_trial(table: pa.Table, keys: list[str], default: dict[str, float]) -> tuple[str, float] | None:
    """(trial id, objective at its last report) of the trial that started from the config's own values."""
    df = table.to_pandas().sort_values([S.TRIAL_ID, S.ITERATION])
    for trial_id, g in df.groupby(S.TRIAL_ID):
        first = g.iloc[0]
        if all(np.isclose(first[S.param_column(k)], float(default[k]), rtol=1e-9, atol=0) for k in keys):
            return str(trial_id), float(g[S.OBJECTIVE].iloc[-1])
    return None


def write_sweep(
    rows: list[dict],
    out: str,
    cfg: RoiqaConfig,
    keys: list[str],
    default: dict[str, float],
    summary: dict,
) -> dict:
    """trials.parquet / .md, best.yaml and the plots under `out` from the trials' rows; returns `summary` with the
    sweep's trials, best trial and default trial added (the caller writes it with `write_summary`)."""
    import yaml

    from roiqa.index import store
    from roiqa.train.tune_space import apply_overrides

    table = trials_table(rows, keys)
    store.write_table(table, uri_mod.join(out, TRIALS))
    best_id, best_iter, best_value = best_trial(table, S.OBJECTIVE, "max", "last")
    last = table.to_pandas().query(f"{S.TRIAL_ID} == @best_id").sort_values(S.ITERATION).iloc[-1]
    best_params = {k: float(last[S.param_column(k)]) for k in keys}
    header = (
        f"# Best config of the sweep in {out} (trial {best_id}, objective {best_value:.4f} at iteration {best_iter}).\n"
        f"# {summary.get('scheduler')} / {summary.get('search')}; searched: {', '.join(keys)}\n"
    )
    text = header + yaml.safe_dump(to_dict(apply_overrides(cfg, best_params)), sort_keys=False)
    uri_mod.write_bytes(uri_mod.join(out, BEST_CONFIG), text.encode())
    curves_png(table, S.OBJECTIVE, uri_mod.join(out, f"curves_{S.OBJECTIVE}.png"))
    curves_png(table, S.VAL_MAP, uri_mod.join(out, f"curves_{S.VAL_MAP}.png"))
    for k in keys:
        if k in ("refine.rate", "train.lr"):
            schedule_png(table, k, uri_mod.join(out, f"schedule_{k.replace('.', '_')}.png"))
    uri_mod.write_bytes(uri_mod.join(out, TRIALS_MD), markdown_trials(table, keys, S.OBJECTIVE).encode())
    ref = default_trial(table, keys, default)
    return {
        "default_trial": None if ref is None else {"trial_id": ref[0], S.OBJECTIVE: ref[1], "params": default},
        **summary,
        "trials": int(len(set(table.column(S.TRIAL_ID).to_pylist()))),
        "best": {"trial_id": best_id, "iteration": best_iter, S.OBJECTIVE: best_value, "params": best_params},
    }


def write_summary(out: str, summary: dict) -> None:
    """summary.json, written last: a sweep's outputs are complete once it exists."""
    uri_mod.write_bytes(uri_mod.join(out, SUMMARY), json.dumps(summary, indent=2).encode())
