"""Stages run in parallel lanes: one process per lane, this machine's threads split between them, one progress
bar each.

    lanes = {"continuous": [Stage("vae", train_vae, {...}), Stage("transfusion", train_model, {...})],
             "discrete": [Stage("vqvae", ...), Stage("chameleon", ...)]}
    done = run_lanes(lanes, log_dir=out / "logs")  # raises if a lane fails
    done.seconds   # {"vae": s, "transfusion": s, ...}
    done.values    # {"transfusion": what its function returned, ...} (None left out)

A lane runs its stages in order in a fresh (spawned) process whose output goes to `log_dir/<lane>.log`. Each
stage function is a module-level function called as `fn(**kwargs, status=path)`; a training stage passes
`ProgressFile(status, label)` to its Trainer, other stages `write_progress` (both anymodal.systems.callbacks,
one writer of the format `read_json` reads), and the lane's bar shows them. Return values come back pickled through a file the lane writes and this process
reads once and deletes (they are this program's own objects, e.g. the demo's scores and samples).

Why: a training step of the demo's small models is mostly per-op overhead, which a second thread does not halve.
On a 2-core CPU the demo's tokenizers and models trained in two lanes of one thread made 3,000 steps per model in
1,081-1,128 s, against 2,600 in 1,036 s one after the other at two threads: 1.06-1.11x the steps per second
(benchmarks/README.md, "Two lanes"). The tokenizers' convolutions do scale with threads (1.8-1.9x slower at one).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from anymodal.atomic import write_text as atomic_write_text


@dataclass
class Stage:
    """One step of a lane: `fn(**kwargs, status=path)` in the lane's process; `fn` must be module-level."""

    name: str
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    weight: float = 0.0
    """Share of its lane's training time under a budget, against the lane's other stages (0: not a training stage;
    anymodal.commands.demo.plan_deadlines)."""
    reserve_s: float = 0.0
    """Seconds kept back from the lane's training time for this stage (an evaluation, say)."""


@dataclass
class LanesDone:
    seconds: dict[str, float]
    """Seconds of every stage, by stage name."""
    values: dict[str, Any]
    """What each stage's function returned, by stage name (stages that returned None are left out)."""


class LaneElapsed(ProgressColumn):
    """The lane's running time. (rich's TimeElapsedColumn stops at the first stage whose bar fills.)"""

    def render(self, task) -> Text:
        seconds = int(task.elapsed or 0)
        return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed")


def read_json(path: Path) -> dict | None:
    """A JSON file a lane writes (its status or its timings), or None while it is missing or being replaced."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lane_main(stages: list[Stage], threads: int, log: str, status: str, timings: str, values: str) -> None:
    """The body of a lane's process: output to `log`, `threads` threads, the stages in order; their return
    values pickled to `values`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # C-level output (torch, compilers) too
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for any process this lane starts
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    import torch

    # here, not at import: the CLI starts without Lightning
    from anymodal.systems.callbacks import write_progress

    torch.set_num_threads(threads)
    done: dict[str, float] = {}
    returned: dict[str, Any] = {}
    for stage in stages:
        write_progress(status, stage.name)
        print(f"=== stage {stage.name}, torch threads: {threads}", flush=True)
        t0 = time.perf_counter()
        try:
            value = stage.fn(**stage.kwargs, status=status)
        except BaseException as e:  # SystemExit too: a recipe the parser refused, its sentence already printed
            if not isinstance(e, SystemExit):
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            error = str(e).strip() if isinstance(e, Exception) else ""
            atomic_write_text(timings, json.dumps({"done": done, "failed": stage.name,
                                                   "error": error.splitlines()[0] if error else _last_line(log)}))
            os._exit(1)
        done[stage.name] = time.perf_counter() - t0
        if value is not None:
            returned[stage.name] = value
            with open(values, "wb") as f:
                pickle.dump(returned, f)
        atomic_write_text(timings, json.dumps({"done": done}))


def _stop_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    """Send this lane SIGTERM once its parent is gone (killed without the chance to stop its lanes): a training
    stage then saves `interrupted.ckpt` and exits (anymodal.systems.faults.StopOnSignal), any other stops."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)


def _last_line(log: str | Path) -> str:
    """The log's last line that says `error:` (the CLI's sentence), else its last line."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["(no output)"])[-1]


def lane_threads(n_lanes: int, threads: int | None = None) -> int:
    """Threads per lane: this process's torch threads (or `threads`) shared out, at least one each."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return max(1, threads // max(1, n_lanes))


def run_lanes(lanes: dict[str, list[Stage]], log_dir: str | Path, threads: int | None = None,
              poll_s: float = 0.5) -> LanesDone:
    """Run each lane's stages in its own process, all lanes at once; return the seconds and values of every stage.

    threads: threads of each lane (None: `lane_threads`). A lane that fails stops the others, and the error
    names the lane, the stage, its last line and the log that holds the rest. Ctrl-C or SIGTERM here stops every
    lane (a training stage saves `interrupted.ckpt` first); a lane whose parent was killed stops itself.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or lane_threads(len(lanes))
    ctx = mp.get_context("spawn")  # a fresh interpreter: no copied torch thread pools or locks
    procs, files = {}, {}
    for name, stages in lanes.items():
        log, status, timings, values = (log_dir / f"{name}.{kind}"
                                        for kind in ("log", "status.json", "timings.json", "values.pickle"))
        for f in (status, timings, values):
            f.unlink(missing_ok=True)
        log.write_text("")
        files[name] = (log, status, timings, values)
        procs[name] = ctx.Process(target=_lane_main, name=f"lane-{name}",
                                  args=(stages, threads, *(str(f) for f in files[name])))

    def stop(signum, frame):  # SIGTERM to this process: stop the lanes (below) and exit as killed by it
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    with Progress(TextColumn("[bold]{task.fields[lane]}"), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), LaneElapsed()) as progress:
        bars = {name: progress.add_task("starting", total=None, lane=name) for name in lanes}
        finished: set[str] = set()

        def finish(name: str) -> None:  # a full bar whose time stops at the lane's end
            if name not in finished:
                finished.add(name)
                progress.update(bars[name], description="done", completed=1, total=1)
                progress.stop_task(bars[name])

        try:
            for p in procs.values():
                p.start()
            while any(p.is_alive() for p in procs.values()):
                for name, p in procs.items():
                    state = read_json(files[name][1])
                    if state and p.is_alive():
                        progress.update(bars[name], description=state["label"], completed=state["step"],
                                        total=state["total"])
                    elif p.exitcode == 0:
                        finish(name)
                    elif p.exitcode is not None:
                        raise _lane_error(name, p.exitcode, *files[name])
                time.sleep(poll_s)
            for name, p in procs.items():
                if p.exitcode != 0:
                    raise _lane_error(name, p.exitcode, *files[name])
                finish(name)
        finally:  # SIGTERM lets a training lane save interrupted.ckpt; a lane still there after 60 s is killed
            for p in procs.values():
                if p.is_alive():
                    p.terminate()
            for p in procs.values():
                p.join(60)
                if p.is_alive():
                    p.kill()
                    p.join()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    done = LanesDone({}, {})
    for name in lanes:
        _, _, timings, values = files[name]
        done.seconds.update((read_json(timings) or {}).get("done", {}))
        if values.exists():
            with open(values, "rb") as f:
                done.values.update(pickle.load(f))  # written by this run's own lane, just now
            values.unlink()
    return done


def _lane_error(name: str, exitcode: int, log: Path, status: Path, timings: Path, values: Path) -> RuntimeError:
    result = read_json(timings) or {}
    if "failed" in result:
        return RuntimeError(f"lane {name} failed in stage {result['failed']}: {result['error']} (whole log: {log})")
    return RuntimeError(f"lane {name} stopped with exit code {exitcode} before it finished (whole log: {log})")
