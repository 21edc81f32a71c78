"""The unified model in training: a two-step `fit` of each recipe family through the CLI, overfitting one
batch on each path, exact resume, the clean/noised attention policy, sampling's prefill = the training
forward, export to a bundle, and recipe typos."""

import csv
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TEXT_TOKENIZER
from lightning.pytorch import Callback, Trainer

from anymodal.batch import CONTINUOUS_IMAGE, Batch
from anymodal.checkpoint import BundleError, export_checkpoint, load_bundle
from anymodal.commands.cli import main
from anymodal.data.datamodule import UnifiedDataModule
from anymodal.data.document import Document, Image
from anymodal.data.packing import collate_rows, pack_rows
from anymodal.data.shapes import ShapesWorld
from anymodal.generate.engine import Engine
from anymodal.layout import build_layout, code_slots, reference_latents
from anymodal.masks import build_attention_mask
from anymodal.model.unified import ContinuousInput
from anymodal.systems.callbacks import TaskMixSwitch, TimeBudget
from anymodal.train import run_lightning

RECIPES = {"continuous": ROOT / "recipes/models/transfusion-shapes.yaml",
           "discrete": ROOT / "recipes/models/chameleon-shapes.yaml"}
CPU = ROOT / "recipes/strategy/cpu.yaml"
SEQ_LEN = {"continuous": 256, "discrete": 384}  # a 32 px image is 16 patches or 64 codes; a story reaches 317 tokens


def cli_args(path: str, tokenizer_dirs: dict, root: Path) -> list[str]:
    """`anymodal fit` of the path's recipe, debug size, everything written under `root`."""
    return ["fit", "--config", str(RECIPES[path]), "--config", str(CPU),
            "--model.init_args.text_tokenizer", TEXT_TOKENIZER,
            "--model.init_args.image_tokenizer", tokenizer_dirs[path]]


def test_task_mix_switch_turns_the_stream_to_its_tasks_mid_run(fit_args, tmp_path, monkeypatch):
    """Text-only documents from step 2 on: no image once the documents drawn before the switch are spent (a few
    batches: Lightning fetches ahead, a row in progress carries documents over, and the packing pool holds a
    document back for at most `pack_pool` rows), so the diffusion loss is 0."""
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    switch = '{"class_path": "anymodal.systems.callbacks.TaskMixSwitch", "init_args": {"at_step": 2, "tasks": {"text": 1.0}}}'
    main(fit_args("--trainer.max_steps=8", "--trainer.log_every_n_steps=1", f"--trainer.callbacks=[{switch}]",
                  "--data.init_args.pack_pool=2"))
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    diffusion = [float(r["train/diffusion_loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/diffusion_loss")]
    assert len(diffusion) == 8 and min(diffusion[:2]) > 0 and diffusion[-2:] == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown task"):  # at start, not at the switch
        TaskMixSwitch(2, {"captions": 1.0})


def test_a_time_budget_ends_training_and_its_learning_rate_schedule_together(fit_args):
    """TimeBudget lowers max_steps to the steps that fit, and the warm-up + cosine schedule, which reads
    max_steps at each step, comes down to its floor by then (it would stay near its peak with the bound)."""
    # a deadline already past at the first measurement (step 4): training stops there, not at max_steps
    budget = TimeBudget(deadline=time.time(), measure_from=2, every=2, round_to=1)
    cli = run_lightning(fit_args("--trainer.max_steps=50"), callbacks=[budget])
    assert cli.trainer.global_step == 4 == cli.trainer.max_steps and budget.cap == 50
    # 3 seconds (the process is warm now: a first fit spends seconds on its first steps)
    cli = run_lightning(fit_args("--trainer.max_steps=100000", "--model.init_args.warmup_steps=2"),
                        callbacks=[TimeBudget(3.0, measure_from=2, every=2, round_to=2)])
    steps, hp = cli.trainer.global_step, cli.model.hparams
    assert 6 < steps == cli.trainer.max_steps < 100000 and steps % 2 == 0
    ratios = [g["lr"] / g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups]
    assert max(ratios) < hp.min_lr_ratio + 0.05, ratios
    for bad in ({}, {"seconds": 1.0, "deadline": 1.0}, {"seconds": -1.0}):
        with pytest.raises(ValueError, match="TimeBudget"):
            TimeBudget(**bad)


def test_last_ckpt_is_where_training_stopped_between_two_periodic_saves(fit_args, tmp_path, monkeypatch):
    """5 steps, a save every 2: last.ckpt holds step 5 (Lightning alone leaves it at step 4)."""
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    ckpt = ('{"class_path": "anymodal.systems.callbacks.FinalCheckpoint", "init_args": {"dirpath": "%s", '
            '"every_n_train_steps": 2, "save_last": true, "save_top_k": -1}}' % (tmp_path / "ckpts"))
    main(fit_args("--trainer.max_steps=5", f"--trainer.callbacks=[{ckpt}]", "--trainer.enable_checkpointing=true"))
    steps = lambda f: torch.load(f, map_location="cpu", weights_only=False)["global_step"]  # noqa: E731
    assert steps(tmp_path / "ckpts" / "last.ckpt") == 5
    assert sorted(steps(f) for f in (tmp_path / "ckpts").glob("*step=*.ckpt")) == [2, 4]  # the periodic saves
    recipes = [p for p in (ROOT / "recipes").rglob("*.yaml") if "ModelCheckpoint" in p.read_text()]
    assert not recipes, f"{recipes} keep last.ckpt at their last periodic save; use FinalCheckpoint"


@pytest.mark.parametrize("path", ["continuous", "discrete"])
def test_two_step_fit_of_each_recipe_through_the_cli(tokenizer_dirs, tmp_path, monkeypatch, path):
    monkeypatch.setattr(sys, "argv", ["anymodal"])  # LightningCLI warns when it sees pytest's arguments too
    main(cli_args(path, tokenizer_dirs, tmp_path) + [
        "--model.init_args.size", "debug", "--data.init_args.batch_size", "2", "--data.init_args.val_batches", "1",
        "--trainer.max_steps=2", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.log_every_n_steps=1",
        "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
    ])
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) == 2 and len(val) == 1 and np.isfinite(train + val).all()
    code_loss = [float(r["train/code_loss"]) for r in rows if r.get("train/code_loss")]
    diffusion = [float(r["train/diffusion_loss"]) for r in rows if r.get("train/diffusion_loss")]
    assert (max(code_loss) > 0) == (path == "discrete") and (max(diffusion) > 0) == (path == "continuous")
    assert (tmp_path / "lightning_logs/version_0/config.yaml").is_file()


def test_the_compiled_training_step_equals_the_eager_one(make_system):
    """compile=True runs training steps through torch.compile'd decoder: same loss and gradients as eager;
    eval mode (validation, sampling) stays eager."""
    torch.manual_seed(0)
    eager = make_system("continuous")
    compiled = make_system("continuous", compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    batch = encoded_batch(eager, ["t2i", "caption", "edit"], seq_len=160)
    from torch._dynamo.utils import counters

    counters.clear()
    grads = []
    for system in (eager, compiled):
        system.model.train()
        loss = system.compute_losses(batch).total
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.reshape(-1) for p in system.model.parameters()])))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled decoder really ran
    assert "_orig_mod" not in "".join(compiled.model.state_dict())  # checkpoints keep their names


def test_compiled_training_encodes_vqvae_images_through_the_compiled_encode(make_system):
    """compile=True compiles a VQ-VAE's encode for training steps (the VAE's stays eager: slower compiled);
    validation and sampling encode eagerly, and the two agree on the codes."""
    from torch._dynamo.utils import counters

    from anymodal.data.stream import PackedBatches

    assert make_system("continuous", compile=True)._compiled[1] is None
    system = make_system("discrete", compile=True)
    stream = PackedBatches([ShapesWorld(size=32, seed=0)], system.encoder, 160, 2, None, 0.0, 0.0, seed=0)
    batch = next(iter(stream))
    assert batch.image_kind == "pixels" and batch.num_images > 0
    codes = []
    for training in (True, False):
        system.train(training)
        counters.clear()
        codes.append(system.encode_images(batch)[0].tokens)
        assert (counters["stats"]["unique_graphs"] >= 1) == training  # compiled in training only
    assert (codes[0] == codes[1]).float().mean() > 0.98  # fp32 both; a near tie may round the other way


def encoded_documents(system, tasks: list[str], seed: int = 0) -> list[Document]:
    """Shapes-world documents of `tasks`, their images encoded by the system's tokenizer (codes or latents)."""
    rng = np.random.default_rng(seed)
    docs = [ShapesWorld(size=32, seed=seed).document(t, rng) for t in tasks]
    pixels = torch.stack([im.pixels for d in docs for im in d.images])  # (N, 3, 32, 32)
    with torch.no_grad():
        encoded = iter(system.image_tokenizer.encode(pixels))  # (N, h, w) codes or (N, C, h, w) latents
    key = "codes" if system.discrete else "latents"
    return [Document([Image(**{key: next(encoded)}) if isinstance(s, Image) else s for s in d.segments], d.task)
            for d in docs]


def encoded_batch(system, tasks: list[str], seq_len: int, rows: int = 2, seed: int = 0) -> Batch:
    """One packed batch of shapes-world documents, images already encoded (codes or latents)."""
    docs = encoded_documents(system, tasks, seed)
    return collate_rows(next(pack_rows((system.encoder.encode(d) for d in docs), seq_len, rows)), seq_len,
                        system.text.pad_id)


@pytest.mark.parametrize("path, tasks", [("continuous", ["t2i", "caption", "t2i", "vqa"]),
                                         ("discrete", ["t2i", "caption"])])
def test_one_batch_overfits(make_system, path, tasks):
    torch.manual_seed(0)
    system = make_system(path)
    batch = encoded_batch(system, tasks, SEQ_LEN[path])
    assert batch.image_kind == ("codes" if path == "discrete" else "latents")
    opt = torch.optim.AdamW(system.model.parameters(), lr=3e-3, weight_decay=0.0)
    # global_step stays 0 in a plain loop, so the diffusion noise and timesteps are the same every step
    losses = []
    for _ in range(200):
        out = system.compute_losses(batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"{path}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
    assert (out.diffusion > 0) == (path == "continuous") and (out.codes > 0) == (path == "discrete")


def test_code_rows_can_start_from_the_codebook(make_system):
    """code_init=codebook: code rows mirror the VQ-VAE's code similarities at the spread of a random start;
    text rows are untouched; the continuous path refuses it in one sentence."""
    torch.manual_seed(0)
    random = make_system("discrete")
    torch.manual_seed(0)
    codebook = make_system("discrete", code_init="codebook")
    cfg = codebook.model_config
    rows = slice(cfg.code_offset, cfg.code_offset + cfg.codebook_size)
    vectors = codebook.image_tokenizer.codes_to_latents(torch.arange(cfg.codebook_size).view(1, -1, 1))[0, :, :, 0].T
    centred = vectors - vectors.mean(0)

    def similarity_agreement(weight: torch.Tensor) -> float:
        a = torch.nn.functional.normalize(centred, dim=1)
        b = torch.nn.functional.normalize(weight[rows] - weight[rows].mean(0), dim=1)
        return float(torch.corrcoef(torch.stack([(a @ a.T).flatten(), (b @ b.T).flatten()]))[0, 1])

    for weight, baseline in zip(codebook.token_matrices(), random.token_matrices()):
        assert similarity_agreement(weight.detach()) > 0.5 > abs(similarity_agreement(baseline.detach()))
        assert weight[rows].std().item() == pytest.approx(baseline[rows].std().item(), rel=0.1)
        assert torch.equal(weight[:cfg.code_offset], baseline[:cfg.code_offset])
    with pytest.raises(ValueError, match="has no codes"):
        make_system("continuous", code_init="codebook")


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(make_system, path: str, steps: int, root: Path, ckpt_path=None, save=None, **overrides):
    """Train a debug system `steps` steps in total (resuming from `ckpt_path`); returns (losses, system)."""
    torch.manual_seed(0)
    system = make_system(path, ema_decay=0.9, **overrides)
    data = UnifiedDataModule([ShapesWorld(size=32, seed=0)], seq_len=SEQ_LEN[path], batch_size=2, seed=0)
    recorder = LossRecorder()
    trainer = Trainer(accelerator="cpu", max_steps=steps, gradient_clip_val=1.0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[recorder], default_root_dir=root, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(system, datamodule=data, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return recorder.losses, system


@pytest.mark.parametrize("path, optimizer", [("continuous", "adamw"), ("discrete", "adamw"), ("continuous", "muon")])
def test_resumed_training_repeats_the_uninterrupted_run(make_system, tmp_path, path, optimizer):
    straight, _ = fit(make_system, path, 4, tmp_path, optimizer=optimizer)
    first, _ = fit(make_system, path, 2, tmp_path, save=tmp_path / "half.ckpt", optimizer=optimizer)
    second, _ = fit(make_system, path, 4, tmp_path, ckpt_path=tmp_path / "half.ckpt", optimizer=optimizer)
    assert len(straight) == 4 and len(first) == len(second) == 2
    np.testing.assert_allclose(first + second, straight, rtol=0, atol=1e-6)
    assert straight[2:] != straight[:2]  # the resumed half does not start the stream over


def forward(model, system, batch: Batch, timesteps: torch.Tensor | None = None):
    """Next-token logits (B, T, V) and continuous predictions (N, C, h, w) of `model` on a batch, laid out
    as `UnifiedSystem.compute_losses` lays it out (noised images at timestep 500 unless `timesteps`)."""
    batch, latents = system.encode_images(batch)
    layout = build_layout(batch)
    mask = build_attention_mask(layout.document_ids, layout.continuous_ids, "sdpa")
    continuous = None
    if latents is not None:
        t = batch.noised.float() * 500.0 if timesteps is None else timesteps
        references = reference_latents(latents, batch.reference_index()) if model.config.reference_input else None
        continuous = ContinuousInput(layout.continuous_slots, latents, t, references)
    h = model.embed(layout.tokens, continuous, model.code_slots(layout.tokens, system.text.boi_id))
    hidden = model(h, layout.positions, mask)  # (B, T, D)
    pred = None if latents is None else model.image_prediction(hidden, layout.continuous_slots)
    return model.logits(hidden), pred


def story_batch(system, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    story = ShapesWorld(size=32, seed=3).document("story", np.random.default_rng(0))
    cfg = system.model_config
    latents = [torch.randn(cfg.latent_channels, cfg.grid, cfg.grid, generator=g) for _ in story.images]
    it = iter(latents)
    doc = Document([Image(latents=next(it)) if isinstance(s, Image) else s for s in story.segments], "story")
    encoded = system.encoder.encode(doc)
    return collate_rows([[encoded]], len(encoded), system.text.pad_id)


def changed(batch: Batch, which: torch.Tensor) -> Batch:
    images = batch.images.clone()
    images[which] = torch.randn_like(images[which])
    return dataclasses.replace(batch, images=images)


def test_later_tokens_do_not_see_the_noised_copy(make_system):
    system = make_system("continuous", context_policy="clean_and_noised")
    model = system.model.eval()
    batch = story_batch(system)
    hidden_copy = batch.noised & ~batch.visible  # (N,) noised copies that later tokens must not see
    clean_copy = ~batch.noised
    assert hidden_copy.sum() == clean_copy.sum() >= 1
    first_noised = min(off for _, off, _, i in batch.image_slots(CONTINUOUS_IMAGE) if hidden_copy[i])
    later = slice(first_noised, None)
    slots = torch.zeros(batch.tokens.shape[1], dtype=torch.bool)
    for _, off, length, i in batch.image_slots(CONTINUOUS_IMAGE):
        slots[off:off + length] = hidden_copy[i]
    with torch.no_grad():
        logits, _ = forward(model, system, batch)
        other, _ = forward(model, system, changed(batch, hidden_copy))
        seen, _ = forward(model, system, changed(batch, clean_copy))
    text = ~slots[later]
    torch.testing.assert_close(other[0, later][text], logits[0, later][text], rtol=0, atol=1e-6)
    assert not torch.allclose(other[0, later][~text], logits[0, later][~text])  # the copy itself did change
    assert not torch.allclose(seen[0, later][text], logits[0, later][text])  # the clean copy is seen
    # the training step agrees: the text loss ignores the noised copy, the diffusion loss does not
    with torch.no_grad():
        base, moved = system.compute_losses(batch), system.compute_losses(changed(batch, hidden_copy))
    torch.testing.assert_close(moved.text, base.text, rtol=0, atol=1e-6)
    assert not torch.isclose(moved.diffusion, base.diffusion)


def test_with_shared_noise_later_tokens_see_the_noised_image(make_system):
    system = make_system("continuous", context_policy="shared")
    batch = story_batch(system)
    assert batch.noised.all() and batch.visible.all()
    first_image = batch.image_slots(CONTINUOUS_IMAGE)[0]
    later = slice(first_image[1] + first_image[2], None)
    only_first = torch.zeros(batch.num_images, dtype=torch.bool)
    only_first[first_image[3]] = True
    with torch.no_grad():
        logits, _ = forward(system.model.eval(), system, batch)
        other, _ = forward(system.model, system, changed(batch, only_first))
    assert not torch.allclose(other[0, later], logits[0, later])


@pytest.mark.parametrize("path", ["continuous", "discrete", "continuous+reference", "discrete+positions"])
def test_engine_prefill_equals_the_training_forward(make_system, path):
    """Sampling reads a prompt as training reads the same document: the engine's prefill of left-padded
    prompts gives, at each prompt's own columns, the logits of the training forward on that prompt alone
    (with reference_input: each prompt image reads the same reference in both; with code_positions: each code
    of a prompt image adds the same slot's position in both)."""
    reference, positions = path.endswith("+reference"), path.endswith("+positions")
    options = {"reference_input": True} if reference else {"code_positions": True} if positions else {}
    system = make_system(path.split("+")[0], **options)
    model = system.model.eval()
    with torch.no_grad():  # logits of order 1 (a debug model's are near 0), so a misplaced token shows
        model.lm_head.weight.normal_(std=0.2)
        if reference:  # it starts at zero; random, a wrong reference shows
            model.ref_in.weight.normal_(std=0.5)
        if positions:  # random and large, so a slot read at the wrong place shows
            model.code_pos.normal_(std=1.0)
    tasks = ["vqa", "t2i", "caption"] + (["story"] if reference else [])
    docs = encoded_documents(system, tasks)
    # prompts: without the answer, the image, the caption, the story's last picture; images are clean context
    prompts = [system.encoder.encode_prompt(Document(d.segments[:-1], d.task)) for d in docs]
    assert len({len(p) for p in prompts}) == len(tasks) and [len(p.images) for p in prompts][:3] == [1, 0, 1]
    if reference:
        assert len(prompts[3].images) >= 2  # a picture that refers to the one before it
    hidden = Engine(model, system.text, system.objective).start(prompts)  # (R, T, D), left-padded to the longest
    T = hidden.shape[1]
    for r, prompt in enumerate(prompts):  # the longest has no padding; the others do
        with torch.no_grad():
            logits, _ = forward(model, system, collate_rows([[prompt]], len(prompt), system.text.pad_id))
        torch.testing.assert_close(model.logits(hidden[r, T - len(prompt):]), logits[0], rtol=0, atol=1e-5)


def test_each_image_refers_to_the_last_visible_image_before_it_in_its_document(make_system):
    """Batch.reference_index: an edit's result refers to its source, a story's picture (its noised copy and
    its clean copy alike) to the previous picture's clean copy, a first image to nothing, never across
    documents; with reference_input exactly the images that have a reference read it."""
    system = make_system("continuous", reference_input=True)
    docs = encoded_documents(system, ["edit", "t2i", "story"])
    encoded = [system.encoder.encode(d) for d in docs]
    batch = collate_rows([encoded], sum(len(e) for e in encoded), system.text.pad_id)
    n = len(docs[2].images)
    # edit: source (clean context), result; t2i: its image; story: a noised and a clean copy of every picture
    assert batch.noised.tolist() == [False, True, True] + [True, False] * n
    clean = [4 + 2 * k for k in range(n)]  # the story's clean copies
    assert batch.reference_index().tolist() == [-1, 0, -1, -1, -1] + [c for c in clean[:-1] for _ in (0, 1)]
    with torch.no_grad():
        system.model.eval().ref_in.weight.normal_(std=0.5)
        system.model.patch_out.weight.normal_(std=0.5)  # it starts at zero: every prediction would be 0
        _, pred = forward(system.model, system, batch)
        system.model.ref_in.weight.zero_()
        _, silent = forward(system.model, system, batch)
    read = [i for i in range(batch.num_images) if not torch.allclose(pred[i], silent[i], atol=1e-6)]
    assert read == [1] + list(range(5, 3 + 2 * n))


@pytest.fixture
def bundle(make_system, tmp_path):
    """(trained system, bundle folder) of a continuous run with EMA weights."""
    _, system = fit(make_system, "continuous", 2, tmp_path, save=tmp_path / "run.ckpt")
    return system, export_checkpoint(tmp_path / "run.ckpt", tmp_path / "bundle")


def test_export_then_load_gives_the_sampling_models_logits(bundle):
    system, folder = bundle
    loaded = load_bundle(folder, expect="continuous")
    assert loaded.image_path == "continuous" and len(loaded.text) == len(system.text)
    assert loaded.meta["step"] == 2 and loaded.image_size == 32
    batch = encoded_batch(system, ["t2i", "caption", "story"], 256)
    with torch.no_grad():
        logits, pred = forward(loaded.model, system, batch)
        ref_logits, ref_pred = forward(system.sampling_model().eval(), system, batch)
        trained_logits, _ = forward(system.model.eval(), system, batch)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-6)
    assert not torch.allclose(logits, trained_logits)  # the bundle holds the EMA weights, not the raw ones


def test_the_loader_refuses_what_is_not_a_bundle(bundle, tmp_path, tokenizer_dirs):
    _, folder = bundle
    for suffix in (".ckpt", ".bin"):
        pickled = tmp_path / f"pickled{suffix}"
        pickled.mkdir()
        torch.save({"state_dict": {}}, pickled / f"model{suffix}")
        with pytest.raises(BundleError, match=rf"model{suffix}: pickled weights are refused"):
            load_bundle(pickled)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(BundleError, match="is a Hugging Face .*LlamaForCausalLM.* model folder, not an anymodal bundle"):
        load_bundle(hf)
    with pytest.raises(BundleError, match="is an image tokenizer folder"):
        load_bundle(tokenizer_dirs["continuous"])
    other = shutil.copytree(folder, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["model"]["arch"]["dim"] = 2 * config["model"]["arch"]["dim"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="belong to another architecture than its config.json"):
        load_bundle(other)
    with pytest.raises(BundleError, match="is a continuous-path bundle, but a discrete-path one is needed"):
        load_bundle(folder, expect="discrete")


@pytest.mark.parametrize("typo, key", [
    (["--model.init_args.lrr", "0.1"], "'lrr'"),
    ("model:\n  init_args:\n    warmup_stepz: 3\n", "'warmup_stepz'"),
    ("data:\n  init_args:\n    seq_lne: 64\n", "'seq_lne'"),
    ("trainer:\n  max_stepz: 3\n", "'trainer.max_stepz'"),
])
def test_a_recipe_typo_names_the_key(tokenizer_dirs, tmp_path, capsys, monkeypatch, typo, key):
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    if isinstance(typo, str):
        (tmp_path / "typo.yaml").write_text(typo)
        typo = ["--config", str(tmp_path / "typo.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(cli_args("continuous", tokenizer_dirs, tmp_path) + typo)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("anymodal fit: error:") and key in first, err
    assert len(err.splitlines()) < 20  # the message, not the whole usage text


def test_each_code_reads_its_slot_in_its_own_image(make_system):
    """code_slots: <boi> is slot 0 and the codes after it 1..slots (masked slots too), counted afresh at each
    image; text, <eoi> and padding are outside (-1). Only the discrete path has code_positions."""
    boi, offset = 1, 10  # ids: text below 10, codes 10..13, the mask id 14
    tokens = torch.tensor([[5, boi, 10, 13, 12, 11, 2, 6, boi, 14, 14, 10, 11, 2, 0],
                           [boi, 12, 12, 12, 12, 2, 7, 7, 7, 7, 7, 7, 7, 7, 7]])
    slots = code_slots(tokens, boi, offset, code_ids=5, slots=4)
    assert slots.tolist() == [[-1, 0, 1, 2, 3, 4, -1, -1, 0, 1, 2, 3, 4, -1, -1],
                              [0, 1, 2, 3, 4, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]]
    system = make_system("discrete", code_positions=True)
    model = system.model
    batch, _ = system.encode_images(encoded_batch(system, ["t2i", "caption"], SEQ_LEN["discrete"]))  # codes in
    layout = build_layout(batch)
    slots = model.code_slots(layout.tokens, system.text.boi_id)
    assert sorted(slots[slots >= 0].unique().tolist()) == list(range(system.model_config.slots + 1))
    assert int((slots == 0).sum()) == len(batch.images) and model.code_pos.shape[0] == system.model_config.slots + 1
    with pytest.raises(ValueError, match="pass code_slots"):
        model.embed(layout.tokens)
    with pytest.raises(ValueError, match="discrete path"):
        make_system("continuous", code_positions=True)
