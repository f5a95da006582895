"""Studies (``barlow sweep``, ``barlow study``): the grid and its point names, the shipped study
files, point selection for cluster arrays, and one small digits sweep with a failing cell run
through the command line (skipping, failure reporting, results files, a refused other grid)."""

from __future__ import annotations

import contextlib
import io
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from barlow.cli import main
from barlow.health import embedding_health
from barlow.study import load_study, parse_grid, parse_seeds, shipped_studies, sweep_study
from barlow.study.grid import expand, key_axis, safe_name, split_values
from barlow.study.results import COLLAPSE_KEYS
from barlow.study.runner import check_points, claim_directory, selected_point
from runs import TINY_POINT, sets

TINY = sets(*TINY_POINT)


def test_grid_is_the_cartesian_product_times_seeds_named_by_differences() -> None:
    study = sweep_study(
        "digits",
        [parse_grid("method.lambd=0.005,0.01"), parse_grid('method.projector="16-16",32-32')],
        seeds=parse_seeds("0,1"),
        overrides=["optim.lr=0.3"],
    )
    points = study.points()
    assert len(points) == 2 * 2 * 2
    assert [p.index for p in points] == list(range(8))
    assert points[0].name == "method.lambd=0.005,method.projector=16-16,seed=0"
    assert points[1].name == "method.lambd=0.005,method.projector=16-16,seed=1"
    assert points[-1].name == "method.lambd=0.01,method.projector=32-32,seed=1"
    # the study's overrides first, the levels' after, the seed last
    assert points[3].overrides == (
        "optim.lr=0.3",
        "method.lambd=0.005",
        "method.projector=32-32",
        "train.seed=1",
    )
    assert points[3].labels == {"method.lambd": "0.005", "method.projector": "32-32"}


def test_baseline_seeds_repeat_only_the_first_point() -> None:
    axes = [parse_grid("method.lambd=0.005,0.01"), parse_grid("train.batch_size=64,128")]
    points = expand(axes, [0], "digits", baseline_seeds=[1, 2])
    assert [p.name for p in points] == [
        "method.lambd=0.005,train.batch_size=64,seed=0",
        "method.lambd=0.005,train.batch_size=64,seed=1",
        "method.lambd=0.005,train.batch_size=64,seed=2",
        "method.lambd=0.005,train.batch_size=128,seed=0",
        "method.lambd=0.01,train.batch_size=64,seed=0",
        "method.lambd=0.01,train.batch_size=128,seed=0",
    ]
    assert [p.index for p in points] == list(range(6))


@pytest.mark.parametrize("name", sorted(shipped_studies()))
def test_every_shipped_cpu_study_runs_its_baseline_with_two_seeds_at_least(name: str) -> None:
    points = load_study(name, "cpu").points()
    first = points[0].labels
    assert len({p.seed for p in points if p.labels == first}) >= 2


def test_grid_values_split_outside_brackets_and_quotes() -> None:
    assert split_values('1,[2, 3],"a,b"') == ["1", "[2, 3]", '"a,b"']
    with pytest.raises(ValueError, match="empty value"):
        split_values("1,,2")


def test_point_names_are_filesystem_safe_and_bounded() -> None:
    assert safe_name("data.root=/tmp/x y,seed=0") == "data.root=_tmp_x_y,seed=0"
    long = safe_name("method.projector=" + "-".join(["8192"] * 60))
    assert len(long) <= 150 and long != safe_name("method.projector=" + "-".join(["8192"] * 61))


def test_recipe_axis_and_python_values() -> None:
    recipes = expand([key_axis("recipe", ["digits", "fashion-mnist"])], [0], "digits")
    assert [p.recipe for p in recipes] == ["digits", "fashion-mnist"]
    assert recipes[1].name == "recipe=fashion-mnist,seed=0"
    flags = key_axis("method.projector_bn", [True, False])
    assert [lv.overrides for lv in flags.levels] == [
        ("method.projector_bn=true",),
        ("method.projector_bn=false",),
    ]


def test_a_table_value_stays_one_override() -> None:
    """A study level may set a table-valued key (``data.view_changes``): one override with an
    inline table, read back as the same table."""
    from barlow.config import load_config
    from barlow.study.catalogue import study_from_dict

    raw = {
        "cpu": {
            "recipe": "digits",
            "axis": [
                {
                    "name": "views",
                    "levels": [
                        {"label": "crop only", "set": {"data.view_changes": {"flip_p": 0.0}}},
                        {"label": "nested", "set": {"data": {"view_changes": {"jitter_p": 0.0}}}},
                    ],
                }
            ],
        }
    }
    study = study_from_dict("t", raw, "cpu")
    crop, nested = study.axes[0].levels
    assert crop.overrides == ("data.view_changes={flip_p = 0.0}",)
    assert nested.overrides == ("data.view_changes={jitter_p = 0.0}",)
    assert load_config("digits", list(crop.overrides)).data.view_changes == {"flip_p": 0.0}


@pytest.mark.parametrize(
    ("grid", "overrides", "message"),
    [
        (["method.lambd=1,2", "method.lambd=3"], [], "twice"),
        (["method.lambd=1,2"], ["method.lambd=0.1"], "conflicts with the grid axis"),
        (["method.lambd=1,2"], ["train.seed=3"], "conflicts with the --seeds"),
    ],
)
def test_grid_conflicts_are_refused(grid: list[str], overrides: list[str], message: str) -> None:
    study = sweep_study("digits", [parse_grid(g) for g in grid], overrides=overrides)
    with pytest.raises(ValueError, match=message):
        study.points()


def test_bad_grid_options_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"section\.key=v1,v2"):
        parse_grid("method.lambd")
    with pytest.raises(ValueError, match=r"section\.key"):
        parse_grid("lambd=1,2")
    with pytest.raises(ValueError, match="integers"):
        parse_seeds("0,a")


def test_a_wrong_key_fails_the_whole_grid_at_once() -> None:
    study = sweep_study("digits", [parse_grid("method.lambdd=0.1,0.2")])
    with pytest.raises(ValueError, match=r"every point of the study is invalid.*lambd"):
        check_points(study.points())


@pytest.mark.parametrize("name", sorted(shipped_studies()))
@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_shipped_study_builds_a_valid_config_for_every_point(name: str, scale: str) -> None:
    """Each point's Config goes through the normal validation: an unknown key or a bad value in
    a study file fails here (the method options of the ablations included)."""
    study = load_study(name, scale)
    points = study.points()
    assert points and study.title
    errors = {n: c for n, c in check_points(points).items() if isinstance(c, str)}
    assert not errors
    labels = {axis.name: {lv.label for lv in axis.levels} for axis in study.axes}
    for entry in study.paper:  # the paper's numbers match rows that exist
        match = {k: str(v) for k, v in entry.items() if k != "top1"}
        if scale == "cpu" and any(str(v) not in labels.get(k, ()) for k, v in match.items()):
            continue  # e.g. batch 4096: a row of the paper this scale does not run
        assert all(k in labels for k in match), entry


def test_the_speedrun_lever_study_is_valid_and_chooses_on_held_out_images() -> None:
    """bench/levers.toml (issue 14's lever table): every lever a valid config, each point scored
    on held-out training images, never on the test split."""
    study = load_study(str(Path(__file__).parents[1] / "bench" / "levers.toml"), "cpu")
    configs = check_points(study.points())
    assert not {n: c for n, c in configs.items() if isinstance(c, str)}
    assert len(configs) >= 10
    assert all(c["data"]["holdout"] == 10000 for c in configs.values() if not isinstance(c, str))


def test_studies_ship_in_the_wheel() -> None:
    pyproject = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    assert "studies/*.toml" in pyproject["tool"]["setuptools"]["package-data"]["barlow"]


def test_collapse_keys_are_the_health_monitors() -> None:
    assert set(COLLAPSE_KEYS) == set(embedding_health(torch.randn(8, 4)))


def test_point_selection_by_option_or_slurm_array(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert selected_point(None, 3) is None
    assert selected_point(2, 3) == 2
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert selected_point(None, 3) == 1
    assert selected_point(0, 3) == 0  # --point wins
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with pytest.raises(ValueError, match=r"outside the study's points 0\.\.2.*--array=0-2"):
        selected_point(None, 3)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], int, str]:
    """A 2-point digits sweep whose second cell is invalid (λ < 0 fails when the method is
    built, inside the point's own process): its directory, command, exit code and console."""
    out = tmp_path_factory.mktemp("study") / "lambd"
    args = ["sweep", "digits", "--grid", "method.lambd=0.005,-1", "--out", str(out), *TINY]
    err = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stderr(err):
        code = main(args)
    return out, args, code, err.getvalue()


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_failed_point_is_reported_and_the_others_complete(
    sweep: tuple[Path, list[str], int, str],
) -> None:
    out, _, code, console = sweep
    assert code == 1
    ok, failed = _records(out)
    assert ok["status"] == "ok" and ok["error"] is None
    assert ok["differences"] == {"method.lambd": 0.005}
    assert 0 <= ok["knn_top1"] <= 1 and 0 <= ok["linear_top1"] <= 1 and ok["wall_s"] > 0
    assert {"on_diag", "off_diag"} <= set(ok["loss"]) and set(COLLAPSE_KEYS) <= set(ok["collapse"])
    assert failed["status"] == "failed" and "lambd must be >= 0" in failed["error"]
    assert "point 2/2: method.lambd=-1,seed=0: FAILED" in console
    assert "lambd must be >= 0" in console  # the point's own lines, relayed


def test_results_table_and_plot_are_written(sweep: tuple[Path, list[str], int, str]) -> None:
    out, _, _, _ = sweep
    table = (out / "results.md").read_text()
    assert "| method.lambd | kNN top-1 | linear top-1 |" in table
    assert "| 0.005 |" in table and "1 failed" in table and "lambd must be >= 0" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "study.json").read_text())
    assert manifest["recipe"] == "digits" and manifest["grid"][0]["name"] == "method.lambd"


def test_finished_point_is_skipped_without_retraining(
    sweep: tuple[Path, list[str], int, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, args, _, _ = sweep
    checkpoint = out / "method.lambd=0.005,seed=0" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # an array task of the finished point
    assert main(args) == 0
    assert checkpoint.stat().st_mtime_ns == before
    err = capsys.readouterr().err
    assert "finished before, skipped" in err and "point 2/2" not in err
    assert [r["status"] for r in _records(out)] == ["ok", "failed"]  # both records kept


def test_a_run_made_before_a_setting_existed_still_counts_as_finished(
    sweep: tuple[Path, list[str], int, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A setting added since a point ran (its config.json lacks the key) takes its default:
    the point is skipped, not refused as "another config"."""
    out, args, _, _ = sweep
    run = out / "method.lambd=0.005,seed=0"
    record = json.loads((run / "config.json").read_text())
    del record["config"]["data"]["view_changes"], record["config"]["train"]["threads"]
    (run / "config.json").write_text(json.dumps(record))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "finished before, skipped" in err and "another config" not in err


def test_point_option_runs_that_point_alone(
    sweep: tuple[Path, list[str], int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, args, _, _ = sweep
    assert main([*args, "--point", "1"]) == 1  # the invalid cell, tried again
    err = capsys.readouterr().err
    assert "point 2/2" in err and "point 1/2" not in err


def test_another_grid_into_the_same_directory_is_refused(
    sweep: tuple[Path, list[str], int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, args, _, _ = sweep
    other = [a if a != "method.lambd=0.005,-1" else "method.lambd=0.01" for a in args]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds another study" in err and "grid" in err and "another --out" in err


def _claim(out: Path, *grid: str) -> None:
    claim_directory(sweep_study("digits", [parse_grid(g) for g in grid]), out)


def test_a_grid_that_only_appends_levels_continues_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    _claim(out, "method.lambd=0.005,0.01", "train.batch_size=64")
    _claim(out, "method.lambd=0.005,0.01,0.02", "train.batch_size=64,128")
    assert "gains 2 level(s)" in capsys.readouterr().err
    saved = json.loads((out / "study.json").read_text())
    assert [len(axis["levels"]) for axis in saved["grid"]] == [3, 2]
    _claim(out, "method.lambd=0.005,0.01,0.02", "train.batch_size=64,128")  # now the same study
    assert "gains" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "grid",
    [
        ("method.lambd=0.01,0.005", "train.batch_size=64"),  # levels reordered
        ("method.lambd=0.005", "train.batch_size=64"),  # a level removed
        ("method.lambd=0.005,0.01", "train.batch_size=64", "train.epochs=1,2"),  # an axis added
        ("train.batch_size=64", "method.lambd=0.005,0.01"),  # axes swapped
    ],
)
def test_any_other_grid_change_is_refused_and_study_json_kept(
    tmp_path: Path, grid: tuple[str, ...]
) -> None:
    out = tmp_path / "study"
    _claim(out, "method.lambd=0.005,0.01", "train.batch_size=64")
    before = (out / "study.json").read_text()
    with pytest.raises(ValueError, match="holds another study"):
        _claim(out, *grid)
    assert (out / "study.json").read_text() == before


def test_list_prints_the_points_for_an_array(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "lambd", "--scale", "cpu", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and lines[0].split() == ["0", "method.lambd=0.0005,seed=0"]
    assert lines[1].split() == ["1", "method.lambd=0.0005,seed=1"]  # the baseline's second seed


def test_a_log_axis_labels_only_the_grid_levels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed n-vs-d records, drawn again: widths 128/1024/4096 and no minor-tick labels
    (matplotlib labels minor ticks of a log axis that spans under a decade or two)."""
    import matplotlib.pyplot as plt

    from barlow.study.results import draw

    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)
    committed = Path(__file__).parents[1] / "bench" / "results" / "studies" / "n-vs-d"
    records = [json.loads(line) for line in (committed / "results.jsonl").read_text().splitlines()]
    study = load_study("n-vs-d", "cpu")
    draw(study, study.points(), records, tmp_path / "results.png")
    axis = figures[0].axes[0].xaxis
    assert axis.get_scale() == "log"
    assert [t.get_text() for t in axis.get_majorticklabels()] == ["128", "1024", "4096"]
    assert not [t.get_text() for t in axis.get_minorticklabels() if t.get_text()]
