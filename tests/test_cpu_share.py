"""Sharing the CPU (``barlow.cpu_share``): the thread count from the other processes' load, the
two-sample rule, fixed counts, and the load measurement against real busy processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from barlow import cpu_share
from barlow.config import load_config
from barlow.cpu_share import CpuSample, ThreadGovernor, others_load, sample_cpu, threads_for
from runs import FAST

BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


@pytest.fixture(autouse=True)
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cores", "others", "ceiling", "threads"),
    [
        (2, 0.0, 2, 2),  # quiet: every core
        (2, 0.4, 2, 2),  # background noise: still every core
        (2, 1.0, 2, 1),  # another job holds a core
        (2, 2.0, 2, 1),  # a saturated machine: never below 1
        (64, 31.6, 64, 32),  # two jobs on a server
        (64, 0.0, 8, 8),  # never above the count the process started with
    ],
)
def test_threads_are_the_free_cores(cores: int, others: float, ceiling: int, threads: int) -> None:
    assert threads_for(cores, others, ceiling) == threads


def test_others_load_is_busy_time_less_this_process_tree() -> None:
    before, after = CpuSample(10.0, 100.0, 5.0), CpuSample(12.0, 103.0, 6.0)
    assert others_load(before, after) == pytest.approx((3.0 - 1.0) / 2.0)
    assert others_load(before, CpuSample(12.0, 100.5, 6.0)) == 0.0  # rounding: never negative
    assert others_load(before, before) == 0.0


class FakeMachine:
    """A sampler whose other processes use ``others`` cores; its clock moves by 3 s a sample."""

    def __init__(self) -> None:
        self.now, self.busy, self.others = 0.0, 0.0, 0.0

    def clock(self) -> float:
        return self.now

    def sample(self) -> CpuSample:
        return CpuSample(self.now, self.busy, 0.0)

    def advance(self, others: float) -> None:
        self.now += 3.0
        self.busy += 3.0 * others


def governed(machine: FakeMachine, ticks: list[float]) -> list[int]:
    governor = ThreadGovernor(sampler=machine.sample, cores=2, ceiling=2, clock=machine.clock)
    seen = []
    for others in ticks:
        machine.advance(others)
        governor.tick()
        seen.append(torch.get_num_threads())
    return seen


def test_governor_resizes_when_two_samples_agree_and_grows_back() -> None:
    torch.set_num_threads(2)
    seen = governed(FakeMachine(), [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # one busy sample is a burst (no change); two in a row take the team to 1; two quiet ones
    # give it back its second thread
    assert seen == [2, 2, 2, 2, 1, 1, 1, 2]


def test_governor_samples_only_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    machine = FakeMachine()
    governor = ThreadGovernor(sampler=machine.sample, cores=2, ceiling=2, clock=machine.clock)
    calls = []
    governor.sampler = lambda: calls.append(1) or machine.sample()  # type: ignore[assignment]
    for _ in range(5):
        governor.tick()  # the clock has not moved
    assert calls == []
    machine.advance(1.0)
    governor.tick()
    machine.advance(1.0)
    governor.tick()
    assert len(calls) == 2 and torch.get_num_threads() == 1
    assert "keep 1.0 of 2 cores busy: 1 intra-op thread(s), was 2" in capsys.readouterr().err


def test_fixed_threads_hold_and_the_count_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with cpu_share.shared_cpu(1):
        assert torch.get_num_threads() == 1
        assert cpu_share._governor is None
        cpu_share.tick()
    assert torch.get_num_threads() == 2
    with cpu_share.shared_cpu(cpu_share.AUTO):
        assert cpu_share._governor is not None
        with cpu_share.shared_cpu(1):  # a run's fixed count inside the command's auto
            assert cpu_share._governor is None and torch.get_num_threads() == 1
        assert cpu_share._governor is not None and torch.get_num_threads() == 2
    assert cpu_share._governor is None
    with pytest.raises(ValueError, match=r"train\.threads must be >= 0"), cpu_share.shared_cpu(-1):
        pass


def test_an_environment_thread_count_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with cpu_share.shared_cpu(cpu_share.AUTO):
        assert cpu_share._governor is None


def test_config_refuses_negative_threads() -> None:
    with pytest.raises(ValueError, match=r"train\.threads must be >= 0"):
        load_config("digits", ["train.threads=-2"])
    assert load_config("digits", []).train.threads == cpu_share.AUTO


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _window(cpus: list[int], busy_pid: int) -> tuple[float, float, float]:
    """Over 2 s: (others' CPU seconds, this tree's CPU seconds, the busy process's CPU seconds)."""
    before, busy_before = sample_cpu(cpus), _cpu_seconds(busy_pid)
    time.sleep(2.0)
    after, busy_after = sample_cpu(cpus), _cpu_seconds(busy_pid)
    others = (after.busy - before.busy) - (after.own - before.own)
    return others, after.own - before.own, busy_after - busy_before


def test_a_busy_child_counts_as_this_process_and_a_stranger_as_others(tmp_path: Path) -> None:
    """Real processes: a busy child is this job's own work (a DataLoader worker); a busy
    process outside the tree is another job's load. Compared with each busy process's own CPU
    time over the same window, so other load on the machine does not matter."""
    cpus = cpu_share.allowed_cpus()
    child = subprocess.Popen([sys.executable, "-c", BUSY.format(s=5)])
    try:
        time.sleep(0.5)  # past the interpreter's start
        _, own, spent = _window(cpus, child.pid)
    finally:
        child.wait()
    assert spent > 0.1 and own >= 0.9 * spent  # the child's CPU time is this tree's
    script = tmp_path / "busy.py"
    script.write_text(BUSY.format(s=5) + "\n")
    pid_file = tmp_path / "pid"
    # double fork: the busy process is reparented away from this tree
    subprocess.run(
        ["sh", "-c", f"{sys.executable} {script} >/dev/null 2>&1 & echo $! > {pid_file}"],
        check=True,
    )
    time.sleep(0.5)
    others, own, spent = _window(cpus, int(pid_file.read_text()))
    assert spent > 0.1
    assert others >= 0.8 * spent and own < 0.5 * spent, (others, own, spent)


def test_a_run_records_its_thread_count(tmp_path: Path) -> None:
    from barlow.training import pretrain
    from runs import records

    pretrain(load_config("digits", [*FAST, "train.threads=1"]), tmp_path / "run", progress=False)
    (epoch,) = records(tmp_path / "run", "epoch")
    assert epoch["threads"] == 1
