"""``barlow report`` and ``barlow views`` without a browser: the page is one self-contained file,
several runs and study directories, runs without insight files, errors before slow work."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from barlow.cli import main
from barlow.report.insight import read_insight
from barlow.report.page import build_report
from barlow.report.runs import expand_inputs, read_records
from barlow.report.tables import format_value
from barlow.report.tiles import GAP, HEADER
from report_runs import make_run, write_insight

IMG_SRC = re.compile(r'<img [^>]*src="([^"]*)"')


def report(runs: list[Path], out: Path, *extra: str) -> str:
    args = ["report", *map(str, runs), "--out", str(out), "--quiet", *extra]
    assert main(args) == 0
    return out.read_text(encoding="utf-8")


def assert_self_contained(text: str) -> None:
    """No reference leaves the file: no http(s) URLs in src/href, images are data: URIs."""
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "@import" not in text
    assert not re.search(r"<script[^>]+src=", text, re.I)
    sources = IMG_SRC.findall(text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_one_run_with_map_is_self_contained(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    for epoch in (0, 1, 2, 3):
        write_insight(run, epoch)
    text = report([run], tmp_path / "r.html")
    assert_self_contained(text)
    assert "t-SNE of the backbone features" in text or "UMAP of the backbone features" in text
    for words in ("Nearest neighbours", 'alt="on_diag"', 'alt="off_diag"', "barlow-gray"):
        assert words in text
    assert "C at epochs 0, 2, 3" in text
    assert "barlow pretrain digits --out" in text  # the command line
    assert '"projector": "32-32"' in html.unescape(text)  # the resolved config
    assert not list(tmp_path.glob(".r.html.*"))  # no temp file left


def test_missing_insight_says_how_to_get_it(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", metrics=False)
    text = report([run], tmp_path / "r.html", "--no-embedding-map")
    assert "has no insight files" in text and "eval.insight=true" in text
    assert "no metrics.json" in text
    assert "Skipped (<code>--no-embedding-map</code>)" in text
    assert_self_contained(text)


def test_several_runs_overlay_and_tables_side_by_side(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a")
    b = make_run(
        tmp_path / "b",
        epochs=2,
        step_keys=("positive_similarity", "accuracy"),
        overrides=("optim.lr=0.1",),
    )
    write_insight(b, 0, dim=100)  # D > 64: the pooled C is drawn beside the block
    text = report([a, b], tmp_path / "r.html", "--no-embedding-map")
    assert text.count('class="table-wrap run-results"') == 2
    assert "what differs" in text and "<td>optim.lr</td>" in text
    assert "<td>train.epochs</td>" not in text  # same config, fewer epochs done
    # one figure for the overlaid step curves: runs share panels, not one figure per run
    # one panel per quantity, the runs overlaid in it: a's and b's loss share one panel
    assert text.count('alt="loss (total)"') == 1
    assert 'alt="positive_similarity"' in text and 'alt="on_diag"' in text
    assert "has no insight files" in text  # a's
    assert "C at epochs 0 " in text  # b's single file


def test_study_directory_expands_to_its_runs(tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text("{}")
    make_run(study / "lr-0.1", epochs=1)
    make_run(study / "lr-0.2", epochs=1)
    assert [p.name for p in expand_inputs([study])] == ["lr-0.1", "lr-0.2"]
    text = report([study], tmp_path / "r.html", "--no-embedding-map")
    assert "lr-0.1" in text and "lr-0.2" in text


def test_same_names_get_parent_folders(tmp_path: Path) -> None:
    a, b = make_run(tmp_path / "x" / "run", epochs=1), make_run(tmp_path / "y" / "run", epochs=1)
    text = report([a, b], tmp_path / "r.html", "--no-embedding-map")
    assert "x/run" in text and "y/run" in text
    assert "configs are identical" in text


def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a run directory (no config.json)" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent"), "--out", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["directory", "missing folder", "read-only folder"])
def test_bad_out_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    if problem == "directory":
        out, message = tmp_path, "is a directory"
    elif problem == "missing folder":
        out, message = tmp_path / "nowhere" / "r.html", "does not exist"
    else:
        out, message = _read_only_folder(tmp_path) / "r.html", "is not writable"
    # the run is never read: a bad --out is found first, even with a RUN that is not a run
    assert main(["report", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod for a user; for root (whom permissions do
    not stop) a read-only mount such as /proc's, where there is one."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return folder
    for candidate in (Path("/proc/self"),):
        try:
            (candidate / ".barlow-probe").touch()
        except OSError:
            return candidate
    pytest.skip("running as root with no read-only folder to write into")


def test_out_must_end_in_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", epochs=1)
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 2
    assert "should end in .html" in capsys.readouterr().err


def test_views_png_has_the_grid_size(tmp_path: Path) -> None:
    out = tmp_path / "views.png"
    assert main(["views", "digits", "--out", str(out), "--images", "3", "--seed", "1"]) == 0
    width, height = Image.open(out).size
    cell = 96  # digits' 16-px views, scaled ×6
    assert (width, height) == (3 * (cell + GAP) + GAP, HEADER + 3 * (cell + GAP) + GAP)
    again = tmp_path / "again.png"
    assert main(["views", "digits", "--out", str(again), "--images", "3", "--seed", "1"]) == 0
    assert again.read_bytes() == out.read_bytes()  # the seed decides the images and views


def test_views_of_a_toml_recipe_with_three_views(tmp_path: Path) -> None:
    recipe = tmp_path / "cmc3.toml"
    recipe.write_text('[data]\ndataset = "digits"\nviews = "cmc3-gray"\n[method]\nname = "cmc"\n')
    out = tmp_path / "v.png"
    assert main(["views", str(recipe), "--out", str(out), "--images", "2"]) == 0
    assert Image.open(out).size[0] == 4 * (96 + GAP) + GAP  # original + 3 views


def test_views_batched_path(tmp_path: Path) -> None:
    out = tmp_path / "v.png"
    args = ["views", "digits", "--out", str(out), "--set", 'data.augment_on="device"']
    assert main(args) == 0
    assert Image.open(out).size[1] == HEADER + 8 * (96 + GAP) + GAP  # 8 images by default


def test_views_bad_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["views", "digits", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_records_keep_the_last_of_a_repeated_step(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "train", "step": 5, "loss": 2.0},
        {"kind": "train", "step": 5, "loss": 1.0},  # a resume repeats the step
        {"kind": "epoch", "step": 5, "epoch": 1, "knn_top1": 0.5},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')
    steps, epochs = read_records(log)
    assert [s["loss"] for s in steps] == [1.0] and epochs[0]["knn_top1"] == 0.5


def test_unreadable_insight_file_is_named(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", epochs=1)
    write_insight(run, 0)
    (run / "insight" / "epoch-0001.safetensors").write_bytes(b"cut short")
    insight = read_insight(run)
    assert [e.epoch for e in insight.epochs] == [0]
    assert insight.unreadable and "epoch-0001" in insight.unreadable[0]
    result = build_report([run], tmp_path / "r.html", embedding_map=False, progress=False)
    assert "unreadable insight file" in result.path.read_text()


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("knn_top1", 0.94444, "94.44 %"), ("loss", 33.369045, "33.37"), ("k", 20, "20")],
)
def test_format_value(key: str, value: float, shown: str) -> None:
    assert format_value(key, value) == shown
