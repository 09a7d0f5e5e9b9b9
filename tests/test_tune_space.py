"""Tests of roiqa.train.tune_space (search spaces, overrides, objective) and roiqa.eval.tune_report (table, plots)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from roiqa import schema as S
from roiqa.config import RoiqaConfig, from_dict, to_dict
from roiqa.eval.report import _PALETTE
from roiqa.eval.tune_report import best_trial, curves_png, markdown_trials, schedule_png, trials_table
from roiqa.train.tune_space import (
    apply_overrides,
    load_search_space,
    objective,
    overrides_of,
    parse_search_space,
)

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "tune-space.yaml")
OBJ = {"val_map": 1.0}


def _space(**params):
    return parse_search_space({**params, "objective": OBJ}, "t.yaml")


@pytest.mark.parametrize(
    "key, spec, needle",
    [
        ("trainer.lr", {"uniform": [0.1, 0.2]}, "unknown config section 'trainer'"),
        ("train.lrr", {"uniform": [0.1, 0.2]}, "train has no field 'lrr'"),
        ("train.freeze", {"choice": [1, 2]}, "only float or int"),  # a str field
        ("refine.enabled", {"choice": [0, 1]}, "only float or int"),  # a bool field
        ("train.object_scale", {"uniform": [1, 2]}, "only float or int"),  # a tuple field
        ("train.lr", {"uniform": [0.2, 0.2]}, "low < high"),
        ("train.lr", {"uniform": [0.3, 0.2]}, "low < high"),
        ("train.lr", {"loguniform": [0.0, 0.2]}, "low > 0"),
        ("train.lr", {"uniform": [0.1]}, "takes 2 numbers"),
        ("train.lr", {"uniform": ["1e-4", 0.2]}, "write 1.0e-4"),
        ("train.lr", {"normal": [0.0, 1.0]}, "unknown distribution 'normal'"),
        ("train.lr", {"uniform": [0.1, 0.2], "choice": [1]}, "expected one of"),
        ("train.lr", {"choice": []}, "at least one value"),
        ("train.epochs", {"quniform": [1, 10, 2]}, "multiples of q"),
        ("train.epochs", {"quniform": [2, 10, 0]}, "0 < q"),
    ],
)
def test_strict_loading_names_the_key(key, spec, needle):
    with pytest.raises(ValueError) as exc:
        parse_search_space({key: spec, "objective": OBJ}, "space.yaml")
    assert needle in str(exc.value) and key in str(exc.value) and "space.yaml" in str(exc.value)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"train.lr": {"uniform": [0.1, 0.2]}}, "missing 'objective'"),
        ({"objective": OBJ}, "no parameters"),
        ({"train.lr": {"uniform": [0.1, 0.2]}, "metric": "x", "objective": OBJ}, "top-level key 'metric'"),
        ({"train.lr": {"uniform": [0.1, 0.2]}, "objective": {}}, "non-empty"),
        ({"train.lr": {"uniform": [0.1, 0.2]}, "objective": {"val_map": 0.0}}, "val_map: weights must be > 0"),
        ({"train.lr": {"uniform": [0.1, 0.2]}, "objective": {"val map": 1.0}}, "plain identifier"),
    ],
)
def test_strict_space_level_errors(data, needle):
    with pytest.raises(ValueError, match=needle):
        parse_search_space(data, "space.yaml")


def test_load_names_the_uri(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("objective: {val_map: 1.0}\ntrain.nope: {uniform: [0.1, 0.2]}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*train\.nope"):
        load_search_space(str(p))


def test_shipped_space_is_valid_and_holds_the_defaults():
    space = load_search_space(SHIPPED)
    lambdas = [f"train.lambda_{n}" for n in ("nce", "dense", "trip", "scale")]
    refine = [f"refine.{n}" for n in ("rate", "max_change", "w_similarity", "w_dissimilarity")]
    assert set(space.keys()) == {*lambdas, "train.tau", "model.gamma", "train.margin", "train.lr", *refine}
    assert space.objective == {"val_map": 0.5, "val_loc50_refined": 0.5}
    defaults = RoiqaConfig()
    bounds = space.continuous_only().bounds()  # every parameter continuous, so PB2 works with the file
    for p in space.params:
        section, name = p.key.split(".")
        default = getattr(getattr(defaults, section), name)
        assert p.low < default < p.high, (p.key, default, p.low, p.high)
        assert bounds[p.key] == [p.low, p.high]
    assert bounds["train.lr"] == [1e-4, 1e-3]


def test_bounds_and_continuous_only():
    space = _space(**{"train.lr": {"loguniform": [1e-4, 1e-3]}, "train.epochs": {"quniform": [2, 10, 2]}})
    assert space.bounds() == {"train.lr": [1e-4, 1e-3], "train.epochs": [2.0, 10.0]}
    mixed = _space(**{"train.lr": {"uniform": [0.1, 0.2]}, "train.batch_size": {"choice": [4, 8]}})
    with pytest.raises(ValueError, match="train.batch_size"):
        mixed.continuous_only()
    with pytest.raises(ValueError, match="PB2"):
        mixed.bounds()


def test_sample_within_bounds_loguniform_and_quniform():
    space = _space(
        **{
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "train.margin": {"uniform": [0.1, 0.3]},
            "train.epochs": {"quniform": [2, 10, 2]},
            "train.batch_size": {"choice": [4, 8, 16]},
        }
    )
    rng = np.random.default_rng(0)
    draws = [space.sample(rng) for _ in range(4000)]
    lr = np.array([d["train.lr"] for d in draws])
    margin = np.array([d["train.margin"] for d in draws])
    epochs = np.array([d["train.epochs"] for d in draws])
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    assert margin.min() >= 0.1 and margin.max() <= 0.3
    # log-uniform: half the draws below 1e-3 (a uniform draw would put only 9% there); each decade's log10 uniform
    assert abs(np.mean(lr < 1e-3) - 0.5) < 0.04
    hist, _ = np.histogram(np.log10(lr), bins=4, range=(-4, -2))
    assert np.all(np.abs(hist / len(lr) - 0.25) < 0.04)
    # quniform: multiples of 2 in [2, 10], every one reached, the inner ones twice as often as the ends
    assert set(epochs.tolist()) == {2.0, 4.0, 6.0, 8.0, 10.0}
    assert abs(np.mean(epochs == 2.0) - 0.125) < 0.03 and abs(np.mean(epochs == 6.0) - 0.25) < 0.04
    assert {d["train.batch_size"] for d in draws} == {4.0, 8.0, 16.0}


def test_apply_overrides_changes_exactly_the_given_fields():
    cfg = RoiqaConfig()
    new = apply_overrides(
        cfg, {"train.lr": np.float32(5e-4), "train.epochs": 7.6, "model.gamma": 12, "refine.rate": np.float64(0.25)}
    )
    assert type(new.train.lr) is float and new.train.lr == pytest.approx(5e-4, rel=1e-6)
    assert type(new.train.epochs) is int and new.train.epochs == 8  # rounded
    assert type(new.model.gamma) is float and new.model.gamma == 12.0
    assert new.refine.rate == 0.25
    assert apply_overrides(cfg, {"train.epochs": np.int64(3)}).train.epochs == 3
    assert apply_overrides(cfg, {"train.epochs": 7.4}).train.epochs == 7
    before, after = to_dict(cfg), to_dict(new)
    changed = {(s, k) for s in before for k in before[s] if before[s][k] != after[s][k]}
    assert changed == {("train", "lr"), ("train", "epochs"), ("model", "gamma"), ("refine", "rate")}
    assert from_dict(RoiqaConfig, to_dict(new)) == new
    assert apply_overrides(cfg, {}) == cfg
    assert cfg.train.lr == 3e-4  # frozen input untouched


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"training_iteration": 3}, "training_iteration"),
        ({"train.nope": 1.0}, "train.nope"),
        ({"train.lr": True}, "train.lr"),
        ({"train.lr": float("nan")}, "finite"),
        ({"train.freeze": 3}, "train.freeze"),
    ],
)
def test_apply_overrides_rejects(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        apply_overrides(RoiqaConfig(), overrides)


def test_overrides_of_picks_the_space_keys():
    space = _space(**{"train.lr": {"uniform": [0.1, 0.2]}, "model.gamma": {"uniform": [5, 20]}})
    config = {"train.lr": 0.15, "model.gamma": np.float32(6.5), "data_uri": "/x", "num_workers": 2}
    assert overrides_of(config, space) == {"train.lr": 0.15, "model.gamma": 6.5}
    with pytest.raises(ValueError, match="model.gamma"):
        overrides_of({"train.lr": 0.15}, space)


def test_objective_weighted_sum():
    metrics = {"val_map": 0.4, "val_loc50_refined": 0.2, "val_loss": 3.0}
    assert objective(metrics, {"val_map": 0.5, "val_loc50_refined": 0.5}) == pytest.approx(0.3)
    assert objective(metrics, {"val_map": 2.0, "val_loss": 0.1}) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="val_loc50'"):
        objective(metrics, {"val_loc50": 1.0})


KEYS = ["train.lr", "model.gamma"]
LR, GAMMA = S.param_column("train.lr"), S.param_column("model.gamma")


def _row(t, it, obj, lr=1e-3, gamma=10.0, **extra):
    return {S.TRIAL_ID: t, S.ITERATION: it, S.OBJECTIVE: obj, S.STATUS: "TERMINATED", LR: lr, GAMMA: gamma, **extra}


def _table():
    rows = [
        _row("a", 1, 0.5, lr=1e-3),
        _row("a", 2, 0.3, lr=1e-4),  # a's best report is not its last
        _row("b", 2, 0.45, lr=2e-4),  # out of order: b's last row
        _row("b", 1, 0.4, lr=1e-3),
        _row("c", 1, 0.1, lr=5e-4),  # one report only
        _row("d", 1, 0.6),
        _row("d", 2, None, lr=float("nan"), gamma=float("nan")),  # last report without a value never wins
    ]
    return trials_table(rows, KEYS)


def test_schema_columns():
    assert S.param_column("train.lr") == "param_train__lr"
    schema = S.trials_schema(KEYS)
    assert schema.names[: len(S.TRIALS_SCHEMA)] == S.TRIALS_SCHEMA.names
    assert schema.field(LR).type == pa.float64() and schema.field(S.ITERATION).type == pa.int32()
    with pytest.raises(ValueError, match="lr"):
        S.param_column("lr")


@pytest.mark.parametrize(
    "mode, scope, expected",
    [
        ("max", "last", ("b", 2, 0.45)),
        ("max", "all", ("d", 1, 0.6)),
        ("min", "last", ("c", 1, 0.1)),
        ("min", "all", ("c", 1, 0.1)),
    ],
)
def test_best_trial(mode, scope, expected):
    t, it, v = best_trial(_table(), mode=mode, scope=scope)
    assert (t, it) == expected[:2] and v == pytest.approx(expected[2], rel=1e-6)


def test_best_trial_ties_and_errors():
    tied = trials_table([_row("z", 1, 0.5), _row("y", 3, 0.5), _row("y", 2, 0.5), _row("x", 1, 0.2)], KEYS)
    assert best_trial(tied, mode="max", scope="last")[:2] == ("y", 3)
    assert best_trial(tied, mode="max", scope="all")[:2] == ("y", 2)  # same trial: the earlier iteration
    assert best_trial(tied, metric=LR, mode="min")[0] == "x"  # every lr is 1e-3: the smallest id
    with pytest.raises(ValueError, match="empty"):
        best_trial(trials_table([], KEYS))
    with pytest.raises(ValueError, match="scope"):
        best_trial(tied, scope="first")
    with pytest.raises(ValueError, match="no finite"):
        best_trial(trials_table([_row("a", 1, None)], KEYS))


def test_trials_table_validates_and_casts():
    table = trials_table([_row("a", 1, 0.5, **{S.TRIAL_CONFIG: {"train.lr": 1e-3}, S.VAL_MAP: 0.25})], KEYS)
    assert table.schema == S.trials_schema(KEYS)
    assert json.loads(table.column(S.TRIAL_CONFIG)[0].as_py()) == {"train.lr": 1e-3}
    assert table.column(S.VAL_LOSS).null_count == 1 and table.column(S.VAL_MAP)[0].as_py() == 0.25
    no_iteration = _row("a", 1, 0.5)
    del no_iteration[S.ITERATION]
    with pytest.raises(ValueError, match="iteration"):
        trials_table([_row("a", 1, 0.5), no_iteration], KEYS)
    with pytest.raises(ValueError, match="val_mAP"):
        trials_table([_row("a", 1, 0.5, val_mAP=0.1)], KEYS)
    with pytest.raises(ValueError, match=S.ITERATION):
        trials_table([_row("a", "first", 0.5)], KEYS)


def _rgb(path: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize(
    "draw, what", [(curves_png, S.OBJECTIVE), (schedule_png, "train.lr"), (schedule_png, "model.gamma")]
)
def test_pngs(tmp_path, draw, what):
    path = str(tmp_path / "plot.png")
    draw(_table(), what, path, size=(560, 300))
    px = _rgb(path, (560, 300))
    assert (px < 200).any()  # not blank
    for colour in _PALETTE[:4]:  # trials a, b, c, d (c a single point, d ending in nan) each drawn
        assert (np.abs(px.astype(int) - colour).sum(axis=-1) == 0).any(), colour


def test_png_errors(tmp_path):
    with pytest.raises(ValueError, match="train.tau"):
        schedule_png(_table(), "train.tau", str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="empty"):
        curves_png(trials_table([], KEYS), S.OBJECTIVE, str(tmp_path / "x.png"))


def test_markdown_trials():
    md = markdown_trials(_table(), KEYS, metric=S.OBJECTIVE)
    lines = md.splitlines()
    assert len(lines) == 2 + 4  # header, rule, one row per trial
    assert lines[0] == "| trial | status | iterations | objective | train.lr | model.gamma |"
    assert lines[2] == "| b | TERMINATED | 2 | 0.45 | 0.0002 | 10 |"  # best last objective first
    assert lines[-1].startswith("| d |") and "| - |" in lines[-1]  # nan last, shown as "-"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["b", "a", "c", "d"]
    md_lr = markdown_trials(_table(), KEYS, metric=LR, mode="min")
    assert md_lr.splitlines()[0].split("|")[5].strip() == "objective"
    assert md_lr.splitlines()[2].startswith("| a |")


def test_dataclass_params_are_frozen():
    space = load_search_space(SHIPPED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.params[0].low = 0.0  # type: ignore[misc]
    assert objective({"val_map": 0.1, "val_loc50_refined": 0.2}, space.objective) == pytest.approx(0.15)


def _reports(values: list[tuple[int, float, float]]) -> pd.DataFrame:
    rows = []
    for it, lr, obj in values:
        rows.append(
            {
                "training_iteration": it,
                S.param_column("train.lr"): lr,
                S.SECONDS: float(it),
                S.RESUMED_FROM: -1,
                S.OBJECTIVE: obj,
                S.VAL_LOSS: 1.0 - obj,
                S.VAL_MAP: obj,
                S.VAL_LOC50: obj / 2,
                S.VAL_LOC50_REFINED: obj / 2,
            }
        )
    return pd.DataFrame(rows)


def test_trial_rows_keep_the_last_report_of_an_iteration_and_default_trial_finds_the_reference():
    from roiqa.eval.tune_report import default_trial, trial_rows

    keys = ["train.lr"]
    # trial a reported iteration 2 twice (restored from its checkpoint): the later report stands
    a = trial_rows("a", _reports([(1, 1e-3, 0.1), (2, 1e-3, 0.2), (2, 1e-3, 0.25)]), "COMPLETE", keys)
    b = trial_rows("b", _reports([(2, 5e-4, 0.4), (1, 3e-4, 0.3)]), "STOPPED", keys)
    assert [(r[S.TRIAL_ID], r[S.ITERATION], r[S.OBJECTIVE]) for r in a + b] == [
        ("a", 1, 0.1),
        ("a", 2, 0.25),
        ("b", 1, 0.3),
        ("b", 2, 0.4),
    ]
    assert json.loads(b[0][S.TRIAL_CONFIG]) == {"train.lr": 3e-4} and b[0][S.STATUS] == "STOPPED"
    table = trials_table(a + b, keys)
    assert default_trial(table, keys, {"train.lr": 1e-3}) == ("a", 0.25)  # started at the default; its last
    assert default_trial(table, keys, {"train.lr": 5e-4}) is None  # b only moved there later
