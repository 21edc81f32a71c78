"""Two CPU processes (gloo) under DDP, DeepSpeed ZeRO-2 and ZeRO-3 repeat the single-process run.

tests/distributed_runner.py trains the debug-size continuous model 5 steps under each strategy, every rank
on the batches of the single-process run, so the averaged gradient is the single-process gradient. Measured
(fp32): the losses of all 5 steps are bitwise equal to the single-process run's under every strategy; the
exported EMA differs by at most 2e-7 (ZeRO-3) and 7e-9 (ZeRO-2), the trained weights by at most 2e-7; the
runs resumed at step 2 repeat steps 3-5 bitwise. The tolerances below leave room for other CPUs' kernels:
losses rtol 1e-5, weights atol 1e-5. About 130 CPU seconds (15 processes, mostly their imports). DDP
also runs with `optimizer: muon` against its own single-process run.

Also: `anymodal export` of a sharded checkpoint folder; ZeRO-2/3 runs resumed at step 2 continue the loss
curve; under ZeRO-2 with bf16 (DeepSpeed casts the model) the EMA and the frozen image tokenizer stay fp32.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from anymodal.checkpoint import consolidate_zero_checkpoint, read_lightning_checkpoint, read_zero_checkpoint
from anymodal.commands.cli import main

pytestmark = pytest.mark.distributed
pytest.importorskip("deepspeed", reason="the `deepspeed` extra (make test installs it)")

RUNNER = ROOT / "tests" / "distributed_runner.py"
STEPS = 5
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, name: str, image_tokenizer: str, **run) -> dict:
    """Run tests/distributed_runner.py in fresh processes; {rank: result} of its rank{r}.json files.

    Both ranks start at once, as torchrun starts them (LOCAL_RANK set: Lightning launches nothing itself), so
    their imports share the two cores instead of running one after the other."""
    out = root / name
    out.mkdir()
    run = {"out": str(out), "image_tokenizer": image_tokenizer, "steps": STEPS, **run}
    (out / "run.json").write_text(json.dumps(run))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    ranks = 1 if run["strategy"] == "single" else 2
    if ranks > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks), NODE_RANK="0")
    logs = [out / f"log{r}.txt" for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, str(RUNNER), str(out / "run.json")], cwd=ROOT, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, env={**env, "LOCAL_RANK": str(r)} if ranks > 1 else env)
             for r, log in enumerate(logs)]
    codes = [proc.wait(timeout=600) for proc in procs]
    results = {int(f.stem[4:]): json.loads(f.read_text()) for f in out.glob("rank*.json")}
    assert codes == [0] * ranks and len(results) == ranks, (
        f"{name} failed ({codes}):\n" + "\n".join(log.read_text()[-4000:] for log in logs))
    return results


@pytest.fixture(scope="module")
def runs(tokenizer_dirs, tmp_path_factory):
    """Each strategy's 5-step run (checkpoints at steps 2 and 5), ZeRO-2/3 runs resumed at step 2, and a
    ZeRO-2 run in bf16-mixed: {name: ({rank: result}, folder)}. About a dozen processes."""
    root = tmp_path_factory.mktemp("distributed")
    vae = tokenizer_dirs["continuous"]
    launches = {name: {"strategy": name, "save_at": [2, STEPS]} for name in ("single", "ddp", "zero2", "zero3")}
    for stage in ("zero2", "zero3"):
        launches[f"{stage}-resumed"] = {"strategy": stage, "resume": str(root / stage / "step2.ckpt")}
    launches["zero2-bf16"] = {"strategy": "zero2", "precision": "bf16-mixed", "steps": 2, "save_at": [2]}
    for name in ("single", "ddp"):  # Muon orthogonalises the averaged gradient: DDP repeats one process too
        launches[f"{name}-muon"] = {"strategy": name, "optimizer": "muon"}
    return {name: (launch(root, name, vae, **run), root / name) for name, run in launches.items()}


def exported_weights(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """`anymodal export` of a checkpoint file or sharded folder; the bundle's weights."""
    main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    return load_file(str(out / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "ddp-muon"])
def test_two_processes_repeat_the_single_process_losses(runs, strategy):
    single = runs["single-muon" if strategy.endswith("muon") else "single"][0][0]["losses"]
    if strategy.endswith("muon"):  # another optimizer: another loss curve after the first step
        assert runs[strategy][0][0]["losses"][1:] != runs["ddp"][0][0]["losses"][1:]
    ranks = runs[strategy][0]
    assert len(single) == STEPS
    if strategy.endswith("muon"):  # each replica runs Newton-Schulz itself: once in 7 runs its rounding differed
        torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(ranks[1]["losses"]),
                                   rtol=LOSS_RTOL, atol=0)  # (4e-6 at step 2, 2026-12-07)
    else:
        assert ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single), rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_the_exported_ema_equals_the_single_process_one(runs, tmp_path, strategy):
    """`anymodal export` of the checkpoint (ZeRO: a folder; ZeRO-3: each rank's EMA partition in its own file)."""
    ema = {name: runs[name][0][0]["ema"] for name in ("single", strategy)}
    layout = {"ddp": "whole", "zero2": "fragments", "zero3": "partitions"}[strategy]
    assert ema[strategy] == {"layout": layout, "updates": STEPS, "dtypes": ["torch.float32"]}
    single = exported_weights(runs["single"][1] / f"step{STEPS}.ckpt", tmp_path / "single")
    sharded = exported_weights(runs[strategy][1] / f"step{STEPS}.ckpt", tmp_path / strategy)
    assert max_difference(sharded, single) < WEIGHT_ATOL
    trained = read_lightning_checkpoint(runs["single"][1] / f"step{STEPS}.ckpt")["state_dict"]
    assert max_difference({k: trained[f"model.{k}"] for k in single}, single) > 1e-3  # the EMA is not the weights


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_zero_checkpoint_consolidates_as_deepspeed_does(runs, stage):
    """The trained weights (what a run without EMA exports), read with weights_only=True, equal DeepSpeed's
    zero_to_fp32 exactly and the single-process weights within the tolerance."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = runs[stage][1] / f"step{STEPS}.ckpt"
    ours = consolidate_zero_checkpoint(folder, read_zero_checkpoint(folder)[0])
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    assert max_difference(ours, dict(theirs)) == 0.0
    single = read_lightning_checkpoint(runs["single"][1] / f"step{STEPS}.ckpt")["state_dict"]
    assert max_difference(ours, {k: v for k, v in single.items() if k.startswith("model.")}) < WEIGHT_ATOL


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_resumed_zero_run_continues_the_loss_curve(runs, stage):
    straight, resumed = runs[stage][0][0], runs[f"{stage}-resumed"][0][0]
    assert resumed["step"] == STEPS and len(resumed["losses"]) == STEPS - 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][2:]),
                               rtol=LOSS_RTOL, atol=0)
    assert resumed["ema"]["updates"] == STEPS  # the EMA was restored with the rest


def test_under_zero2_bf16_the_ema_and_the_image_tokenizer_stay_fp32(runs, tmp_path):
    ranks, folder = runs["zero2-bf16"]
    for result in ranks.values():
        assert result["model_dtypes"] == ["torch.bfloat16"]  # DeepSpeed cast the model it wraps
        assert result["ema"]["dtypes"] == ["torch.float32"]
    weights = exported_weights(folder / "step2.ckpt", tmp_path / "bf16")
    as_bf16 = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
    assert max_difference(weights, as_bf16) > 0  # averaged from the fp32 master weights, not bf16 ones


@pytest.mark.parametrize("name", ["single", "ddp", "zero2", "zero3", "zero2-bf16"])
def test_the_image_tokenizer_stays_frozen_fp32_and_out_of_the_strategys_reach(runs, name):
    for result in runs[name][0].values():
        assert result["tokenizer"] == {"dtypes": ["torch.float32"], "unchanged": True, "in_module_tree": False,
                                       "trainable": False, "sharded": False}


@pytest.mark.parametrize("name", ["single", "zero2", "zero3"])
def test_checkpoint_records_are_plain_types(runs, name):
    """Every file a run writes for Lightning loads with weights_only=True; the anymodal record holds only plain
    types and tensors."""
    path = runs[name][1] / f"step{STEPS}.ckpt"
    ckpts = read_zero_checkpoint(path) if path.is_dir() else [read_lightning_checkpoint(path)]
    assert len(ckpts) == (2 if name == "zero3" else 1)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list | tuple):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool | torch.Tensor)

    for ckpt in ckpts:
        assert plain(ckpt["anymodal"]) and ckpt["global_step"] == STEPS
        assert all(torch.isfinite(piece["values"]).all() for piece in ckpt["anymodal"]["ema"]["weights"].values())


def test_anymodal_fit_on_the_cpu_zero3_recipe_then_export(tokenizer_dirs, tmp_path):
    """What a user runs: `anymodal fit` composed with recipes/strategy/zero3-cpu.yaml (Lightning's launcher
    starts rank 1 with the same command line), a ModelCheckpoint folder, `anymodal export` of it."""
    args = ["fit", "--config", str(ROOT / "recipes/models/transfusion-shapes.yaml"),
            "--config", str(ROOT / "recipes/strategy/zero3-cpu.yaml"),
            "--model.init_args.image_tokenizer", tokenizer_dirs["continuous"], "--model.init_args.size", "debug",
            "--trainer.max_steps=2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
            f"init_args: {{every_n_train_steps: 2, dirpath: {tmp_path / 'ckpt'}}}}}]",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=1"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "anymodal.commands.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    (folder,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert len(list(folder.glob("checkpoint/zero_pp_rank_*_model_states.pt"))) == 2  # one per rank: sharded
    weights = exported_weights(folder, tmp_path / "bundle")
    assert all(torch.isfinite(w).all() for w in weights.values())
