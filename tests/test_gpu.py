"""On a CUDA device (every test here skips itself without one): a training step under FlexAttention equals the
step under SDPA, bf16 training with FlexAttention learns, and the README's DeepSpeed lines run through
Lightning's own DeepSpeedStrategy: `anymodal fit` with recipes/strategy/zero2.yaml or zero3.yaml (bf16-mixed,
MFU logged), `anymodal export` of the sharded checkpoint folder, `anymodal generate t2i` from the bundle."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TEXT_TOKENIZER
from test_unified import RECIPES, SEQ_LEN, encoded_batch

from anymodal.commands.cli import main

pytestmark = pytest.mark.gpu
TASKS = {"continuous": ["t2i", "caption", "edit", "vqa"], "discrete": ["t2i", "caption"]}


def losses_and_grads(system, batch) -> tuple[float, dict[str, torch.Tensor]]:
    system.model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same diffusion noise and timesteps for both backends
    loss = system.compute_losses(batch).total
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in system.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["continuous", "discrete"])
def test_a_training_step_under_flex_equals_the_step_under_sdpa(make_system, path):
    """The same weights and batch on CUDA in fp32: FlexAttention's BlockMask and SDPA's dense mask (one mask_mod)
    give the same loss and the same gradient of every weight."""
    results = {}
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        system = make_system(path, arch={"attention": backend}).cuda()
        batch = encoded_batch(system, TASKS[path], SEQ_LEN[path]).to("cuda")
        results[backend] = losses_and_grads(system, batch)
    (loss_sdpa, grads_sdpa), (loss_flex, grads_flex) = results["sdpa"], results["flex"]
    assert loss_flex == pytest.approx(loss_sdpa, rel=1e-4)
    assert grads_flex.keys() == grads_sdpa.keys() and len(grads_sdpa) > 10
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_flex[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_training_with_flex_attention_overfits_a_batch(make_system):
    torch.manual_seed(0)
    system = make_system("continuous").cuda()  # attention "auto": FlexAttention on CUDA
    batch = encoded_batch(system, TASKS["continuous"], SEQ_LEN["continuous"]).to("cuda")
    opt = torch.optim.AdamW(system.model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = system.compute_losses(batch).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_the_readme_deepspeed_lines_run_on_cuda(tokenizer_dirs, tmp_path, stage):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra")
    callbacks = [{"class_path": "anymodal.systems.callbacks.MFUMonitor", "init_args": {"window_size": 5}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 10, "save_last": True}}]
    fit = ["fit", "--config", str(RECIPES["continuous"]), "--config", str(ROOT / "recipes/strategy" / f"{stage}.yaml"),
           "--model.init_args.text_tokenizer", TEXT_TOKENIZER,
           "--model.init_args.image_tokenizer", tokenizer_dirs["continuous"], "--model.init_args.size", "debug",
           "--model.init_args.warmup_steps", "2", "--data.init_args.batch_size", "4",
           "--data.init_args.val_batches", "1", "--trainer.max_steps=30", "--trainer.log_every_n_steps=5",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
           f"--trainer.callbacks={json.dumps(callbacks)}", "--trainer.enable_progress_bar=false",
           "--trainer.val_check_interval=30", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]
    # its own process: DeepSpeed's process group and zero.Init stay out of this one
    run = subprocess.run([sys.executable, "-c", "from anymodal.commands.cli import main; main()", *fit],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    rows = list(csv.DictReader((tmp_path / "lightning_logs/version_0/metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    assert len(losses) >= 5 and losses[-1] < losses[0], losses
    assert mfu and all(0 < m < 1 for m in mfu), mfu
    ckpt = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert ckpt.is_dir(), "a ZeRO checkpoint is a folder"
    main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bundle")])
    main(["generate", "t2i", "--checkpoint", str(tmp_path / "bundle"), "--prompt", "a red circle at the center",
          "--steps", "4", "--out", str(tmp_path / "t2i")])
    (row,) = [json.loads(line) for line in (tmp_path / "t2i" / "index.jsonl").read_text().splitlines()]
    assert (tmp_path / "t2i" / row["file"]).is_file()
    print(f"{stage}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, MFU {mfu[-1]:.2e}")
