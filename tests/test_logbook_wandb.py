"""``log.wandb``: a Weights & Biases run beside TensorBoard, exercised offline (no network, no key).

The offline ``.wandb`` files are read back here (recent wandb ships no Python reader for them): a
LevelDB-style log of ``wandb.proto`` records. Each open of a run directory writes one
``offline-run-*`` folder; a continued run's folders share one id, the one in ``wandb_id.txt``.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from barlow.cli import main
from barlow.config import load_config
from barlow.logbook import STEP_KEY, Logbook
from barlow.rundir import STAGING_NAME, WANDB_ID_NAME
from runs import FAST, records, sets

WANDB = ["log.wandb=true", "train.log_every=2"]
SHORT = ["train.batch_size=16"]  # runs stopped by train.max_steps: small steps are quicker
BLOCK, HEADER = 32768, 7  # the log's block size; its record header: crc32c, length, type


@dataclass
class Segment:
    """One ``offline-run-*`` folder: what one open of the run directory sent to wandb."""

    run_id: str
    name: str
    project: str
    config: dict[str, Any]
    history: list[dict[str, Any]]


def wandb_records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    position, pending = HEADER, b""  # the file header is as long as a record header
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header: padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0:
            break
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def segments(run: Path) -> list[Segment]:
    """The run's offline wandb folders, in the order they were written."""
    found = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        segment = Segment("", "", "", {}, [])
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                segment.run_id, segment.name = record.run.run_id, record.run.display_name
                segment.project = record.run.project
                segment.config = {
                    item.key: json.loads(item.value_json) for item in record.run.config.update
                }
            elif kind == "history":
                segment.history.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
        found.append(segment)
    return found


def logged(segment: Segment, prefix: str) -> dict[int, dict[str, Any]]:
    """``prefix/``'s fields by global step, as the records of ``metrics.jsonl`` hold them."""
    return {
        row[STEP_KEY]: {
            k.removeprefix(f"{prefix}/"): v for k, v in row.items() if k.startswith(f"{prefix}/")
        }
        for row in segment.history
        if any(k.startswith(f"{prefix}/") for k in row)
    }


def numeric(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.items()
        if k not in ("kind", "step") and isinstance(v, int | float) and not isinstance(v, bool)
    }


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No network, no key, nothing written outside the test's directory."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable))
    yield
    wandb.teardown()  # wandb reads the environment once per process setup: the next test's anew


def pretrain(run: Path, *overrides: str, flag: str | None = None) -> int:
    argv = ["pretrain", "--quiet", "--out", str(run), *([flag] if flag else [])]
    return main([*argv, *sets(*FAST, *overrides)])


def test_a_run_logs_its_records_to_an_offline_wandb_run_then_resume_continues_it(
    tmp_path: Path,
) -> None:
    run = tmp_path / "my-run"
    offline = 'log.wandb_mode="offline"'
    assert pretrain(run, *WANDB, offline, "train.max_steps=6") == 0
    run_id = (run / WANDB_ID_NAME).read_text().strip()
    (first,) = segments(run)
    assert (first.run_id, first.name, first.project) == (run_id, "my-run", "barlow")
    assert first.config["train"]["max_steps"] == 6 and first.config["log"]["wandb"] is True
    train = {r["step"]: numeric(r) for r in records(run, "train")}
    assert sorted(train) == [2, 4, 6] and logged(first, "train") == train

    assert pretrain(run, *WANDB, offline, flag="--resume") == 0
    first_again, resumed = segments(run)
    assert first_again == first
    assert (resumed.run_id, resumed.name) == (run_id, "my-run")  # the same wandb run
    after = {r["step"]: numeric(r) for r in records(run, "train") if r["step"] > 6}
    assert min(after) == 8 and logged(resumed, "train") == after
    (epoch,) = records(run, "epoch")
    assert logged(resumed, "epoch") == {epoch["step"]: numeric(epoch)}
    assert "loss" in numeric(epoch)


def test_overwrite_replaces_the_wandb_run_and_continues_it_after_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # log.wandb_mode unset: the environment decides
    run = tmp_path / "run"
    assert pretrain(run, *WANDB, *SHORT, "train.max_steps=2") == 0
    old_id = (run / WANDB_ID_NAME).read_text()
    assert pretrain(run, *WANDB, *SHORT, "train.max_steps=4", flag="--overwrite") == 0
    new_id = (run / WANDB_ID_NAME).read_text().strip()
    assert new_id != old_id.strip() and not (run / STAGING_NAME).exists()
    staged, swapped = segments(run)  # nothing of the old run's is left
    assert [s.run_id for s in (staged, swapped)] == [new_id, new_id]
    assert [s.name for s in (staged, swapped)] == ["run", "run"]  # not the staging directory's
    assert sorted(logged(staged, "train")) == [2, 4]  # the swap came with the checkpoint at 4


def test_a_reopened_logbook_continues_its_wandb_run_where_the_directory_moved(
    tmp_path: Path,
) -> None:
    cfg = load_config("digits", ["log.wandb=true", 'log.wandb_mode="offline"'])
    staged, run = tmp_path / "staged", tmp_path / "run"
    logbook = Logbook.for_run(staged, cfg, enabled=True)
    logbook.write({"loss": 2.0, "lr": 0.1, "note": "not a number"}, step=1)
    logbook.close()
    staged.rename(run)
    logbook.open(run)
    logbook.write({"loss": 1.5, "ok": True}, step=2)
    logbook.write({"loss": 1.75}, step=2, prefix="epoch")
    logbook.close()
    first, second = segments(run)
    assert first.run_id == second.run_id == (run / WANDB_ID_NAME).read_text().strip()
    assert logged(first, "train") == {1: {"loss": 2.0, "lr": 0.1}}  # numbers only, as TensorBoard
    assert logged(second, "train") == {2: {"loss": 1.5}}
    assert logged(second, "epoch") == {2: {"loss": 1.75}}


def test_without_wandb_installed_the_run_stops_before_training_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    run = tmp_path / "run"
    assert pretrain(run, *WANDB, *SHORT) == 2
    assert "pip install barlow[wandb]" in capsys.readouterr().err
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()


def test_wandb_failing_to_start_is_an_error_naming_offline_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(**kwargs: Any) -> None:
        raise wandb.errors.CommError("Timed out while retrying")

    monkeypatch.setattr(wandb, "init", no_network)
    cfg = load_config("digits", ["log.wandb=true"])
    with pytest.raises(ValueError, match=r"log\.wandb_mode=offline") as failure:
        Logbook.for_run(tmp_path, cfg, enabled=True)
    assert "Timed out" in str(failure.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_can_be_turned_off(tmp_path: Path) -> None:
    logbook = Logbook.for_run(
        tmp_path, load_config("digits", ["log.tensorboard=false"]), enabled=True
    )
    logbook.write({"loss": 1.0}, step=1)
    logbook.close()
    assert records(tmp_path) == [{"kind": "train", "step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()
