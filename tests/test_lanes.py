"""Parallel lanes (what the demo trains its two image paths in): processes, threads, progress, failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anymodal.commands.lanes import Stage, read_json, run_lanes
from anymodal.systems.callbacks import write_progress


def record(out: str, tag: str, status: str) -> dict | None:
    """A stage: writes which process and how many threads ran it, and that its status file is the lane's; returns
    a value for tags that start with "a"."""
    import torch

    write_progress(status, f"record {tag}", 1, 2)
    Path(out, f"{tag}.json").write_text(json.dumps(
        {"pid": os.getpid(), "threads": torch.get_num_threads(), "status": read_json(Path(status))}))
    return {"tag": tag, "tensor": torch.arange(3)} if tag.startswith("a") else None


def fail(message: str, status: str) -> None:
    raise ValueError(message)


def sleep_then_record(out: str, seconds: float, status: str) -> None:
    time.sleep(seconds)
    Path(out, "woke.json").write_text("{}")


def pid_then_sleep(out: str, status: str) -> None:
    Path(out, "lane.pid").write_text(str(os.getpid()))
    time.sleep(120)


def refused_recipe(recipe: str, status: str) -> None:
    from anymodal.commands.demo import _fit

    _fit(["--config", recipe], status=status)


def test_lanes_run_their_stages_in_order_in_separate_processes_with_the_threads_given(tmp_path):
    lanes = {"a": [Stage("a1", record, {"out": str(tmp_path), "tag": "a1"}),
                   Stage("a2", record, {"out": str(tmp_path), "tag": "a2"})],
             "b": [Stage("b1", record, {"out": str(tmp_path), "tag": "b1"})]}
    done = run_lanes(lanes, tmp_path / "logs", threads=1, poll_s=0.05)
    assert set(done.seconds) == {"a1", "a2", "b1"} and all(v >= 0 for v in done.seconds.values())
    assert set(done.values) == {"a1", "a2"} and done.values["a2"]["tag"] == "a2"  # b1 returned None
    assert done.values["a1"]["tensor"].tolist() == [0, 1, 2]
    assert not list((tmp_path / "logs").glob("*.pickle"))  # read once, then removed
    ran = {tag: json.loads((tmp_path / f"{tag}.json").read_text()) for tag in ("a1", "a2", "b1")}
    assert ran["a1"]["pid"] == ran["a2"]["pid"] != ran["b1"]["pid"]  # one process per lane
    assert os.getpid() not in {r["pid"] for r in ran.values()}
    assert {r["threads"] for r in ran.values()} == {1}
    assert ran["a2"]["status"] == {"label": "record a2", "step": 1, "total": 2}
    assert "=== stage a2, torch threads: 1" in (tmp_path / "logs" / "a.log").read_text()  # output goes to the lane's log


def test_a_failing_lane_names_its_stage_and_error_and_stops_the_others(tmp_path):
    lanes = {"good": [Stage("nap", sleep_then_record, {"out": str(tmp_path), "seconds": 60})],
             "bad": [Stage("broken", fail, {"message": "the recipe names no such tokenizer"})]}
    with pytest.raises(RuntimeError, match=r"lane bad failed in stage broken: the recipe names no such tokenizer "
                                           r"\(whole log: .*bad\.log\)"):
        run_lanes(lanes, tmp_path / "logs", threads=1, poll_s=0.05)
    assert not (tmp_path / "woke.json").exists()  # the sleeping lane was stopped, not waited for
    assert "ValueError: the recipe names no such tokenizer" in (tmp_path / "logs" / "bad.log").read_text()


def test_a_recipe_typo_in_a_lane_is_reported_in_the_parsers_sentence(tmp_path):
    root = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((root / "recipes/tokenizers/vae-shapes.yaml").read_text().replace("max_steps:", "max_stepz:"))
    lanes = {"only": [Stage("vae", refused_recipe, {"recipe": str(recipe)})]}
    with pytest.raises(RuntimeError, match=r"lane only failed in stage vae: anymodal fit: error: "
                                           r".*'trainer.max_stepz' \(whole log"):
        run_lanes(lanes, tmp_path / "logs", threads=1, poll_s=0.05)


def test_progress_file_holds_the_steps_of_a_fit(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from anymodal.systems.callbacks import ProgressFile

    path = tmp_path / "status.json"
    seen = []

    class Spy(ProgressFile):
        def write(self, trainer):
            super().write(trainer)
            seen.append(read_json(self.path))

    trainer = Trainer(max_steps=3, callbacks=[Spy(path, "train toy", every_s=0)], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    trainer.fit(BoringModel())
    assert seen[0] == {"label": "train toy", "step": 0, "total": 3}
    assert [s["step"] for s in seen[1:]] == [1, 2, 3, 3]  # every batch (every_s=0), then the end of training
    assert read_json(path) == {"label": "train toy", "step": 3, "total": 3}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has stopped
    except (FileNotFoundError, IndexError):
        return False


def _wait_for(predicate, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["terminated", "killed"])
def test_lanes_stop_when_the_demo_process_is_stopped_or_killed(tmp_path, sig):
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from test_lanes import pid_then_sleep; "
              "from anymodal.commands.lanes import Stage, run_lanes; "
              "run_lanes({'only': [Stage('nap', pid_then_sleep, {'out': sys.argv[2]})]}, sys.argv[2], threads=1)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pid_file = tmp_path / "lane.pid"
    assert _wait_for(lambda: pid_file.exists() and pid_file.read_text())
    lane = int(pid_file.read_text())
    assert _alive(lane)
    parent.send_signal(sig)
    code = parent.wait(30)
    assert _wait_for(lambda: not _alive(lane)), "the lane outlived the process that started it"
    if sig == signal.SIGTERM:  # stopped its lanes itself, and says it was terminated
        assert code == 128 + signal.SIGTERM, parent.stderr.read().decode()[-2000:]


def test_a_lane_bar_shows_its_running_time():
    from types import SimpleNamespace

    from anymodal.commands.lanes import LaneElapsed

    assert LaneElapsed().render(SimpleNamespace(elapsed=3725.9)).plain == "1:02:05"
    assert LaneElapsed().render(SimpleNamespace(elapsed=None)).plain == "0:00:00"  # not started yet
