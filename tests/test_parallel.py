"""Parallel (MaskGIT-style) decoding of discrete images: the unmasking schedule, the training-time masking and
its attention groups, a batch that overfits under the masked objective, and the engine's parallel forward
reading a prompt as training reads it."""

import json
import shlex
import sys

import numpy as np
import pytest
import torch
from test_unified import cli_args, encoded_batch, encoded_documents

from anymodal.batch import DISCRETE_IMAGE, IGNORE
from anymodal.checkpoint import load_bundle
from anymodal.commands.cli import build_parser, main
from anymodal.commands.generate import image_sampling
from anymodal.data.document import Document
from anymodal.data.packing import collate_rows
from anymodal.generate import requests
from anymodal.generate.engine import Engine
from anymodal.generate.settings import PARALLEL_STEPS, ImageSampling
from anymodal.generate.tasks import Pipeline
from anymodal.layout import build_layout
from anymodal.masks import build_attention_mask, dense_mask
from anymodal.parallel import bidirectional, final_images, known_after, mask_for_training


@pytest.mark.parametrize("steps", [1, 4, 8, 16, 64])
def test_every_step_fixes_more_codes_and_the_last_fixes_all(steps):
    counts = [known_after(i, steps, 64) for i in range(steps)]
    assert counts[-1] == 64 and all(b > a for a, b in zip([0] + counts, counts))


def test_final_images_are_masked_predicted_in_place_and_see_each_other(make_system):
    system = make_system("discrete", parallel_images=1.0)
    cfg = system.model_config
    batch, _ = system.encode_images(encoded_batch(system, ["t2i", "caption", "edit"], seq_len=400, rows=1))
    finals = final_images(batch, system.text.eoi_id, system.text.eos_id)
    images = batch.image_slots(DISCRETE_IMAGE)  # t2i image; caption's source; edit source, edit result
    assert [(r, o) for r, o, _ in finals] == [(images[0][0], images[0][1]), (images[3][0], images[3][1])]
    tokens, targets, chosen = mask_for_training(batch, 1.0, cfg.mask_id, system.text.eoi_id, system.text.eos_id,
                                                torch.Generator().manual_seed(0))
    assert chosen == finals
    before = batch.targets
    for r, off, n in chosen:
        span = slice(off, off + n)
        masked = tokens[r, span] == cfg.mask_id
        assert masked.any()
        assert torch.equal(targets[r, span][masked], batch.tokens[r, span][masked])  # each slot: its own code
        assert (targets[r, span][~masked] == IGNORE).all() and targets[r, off - 1] == IGNORE
    outside = torch.ones_like(tokens, dtype=torch.bool)
    for r, off, n in chosen:
        outside[r, off - 1:off + n] = False
    assert torch.equal(targets[outside], before[outside])  # text and the other images keep their targets
    layout = build_layout(batch)
    allowed = dense_mask(layout.document_ids, bidirectional(layout.continuous_ids, chosen))[:, 0]
    causal = dense_mask(layout.document_ids, layout.continuous_ids)[:, 0]
    for r, off, n in chosen:
        assert allowed[r, off:off + n, off:off + n].all()  # both ways inside the masked image
        assert not causal[r, off, off + n - 1]
        assert not allowed[r, off - 1, off]  # <boi> does not see it; later tokens do
        assert allowed[r, off + n, off:off + n].all()


def test_one_batch_overfits_under_the_masked_objective(make_system):
    torch.manual_seed(0)
    system = make_system("discrete", parallel_images=1.0)
    batch = encoded_batch(system, ["t2i", "t2i"], seq_len=200)
    opt = torch.optim.AdamW(system.model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):  # global_step stays 0: the same codes are masked every step
        out = system.compute_losses(batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(float(out.codes))
    assert losses[-1] < 0.2 * losses[0], f"code loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("code_positions", [False, True])
def test_the_parallel_forward_reads_a_prompt_as_training_does(make_system, code_positions):
    """One greedy parallel step predicts every slot from an all-masked image: the same hidden states and codes as
    the training forward on prompt + <boi> + masked slots with the image's slots in one group (with
    code_positions: each masked slot adds its own slot's position in both)."""
    system = make_system("discrete", parallel_images=1.0, code_positions=code_positions)
    model = system.model.eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
        if code_positions:  # random and large, so a slot read at the wrong place shows
            model.code_pos.normal_(std=1.0)
    cfg = system.model_config
    doc = encoded_documents(system, ["t2i"])[0]
    prompt = system.encoder.encode_prompt(Document(doc.segments[:-1], "t2i"))
    engine = Engine(model, system.text)
    engine.start([prompt])
    seen = []  # the decoder's outputs: <boi>, the parallel step, the final write, <eoi>
    hook = model.decoder.register_forward_hook(lambda module, args, out: seen.append(out))
    codes = engine.generate_image(ImageSampling(parallel_steps=1, temperature=0.0), scales=[])  # (1, g, g)
    hook.remove()
    L = cfg.slots
    full = collate_rows([[prompt]], len(prompt), system.text.pad_id)
    tokens = torch.cat([full.tokens, torch.tensor([[system.text.boi_id] + [cfg.mask_id] * L])], 1)
    spans = full.spans.clone()
    spans[0, 0, 2] += 1 + L  # the document now holds <boi> and the slots
    layout = build_layout(type(full)(tokens=tokens, loss_mask=torch.zeros_like(tokens, dtype=torch.bool),
                                     spans=spans, image_index=full.image_index))
    T = tokens.shape[1]
    groups = bidirectional(layout.continuous_ids, [(0, T - L, L)])
    with torch.no_grad():
        mask = build_attention_mask(layout.document_ids, groups, "sdpa")
        hidden = model(model.embed(layout.tokens, None, model.code_slots(layout.tokens, system.text.boi_id)),
                       layout.positions, mask)
        logits = model.logits(hidden[0, T - L:])[:, cfg.code_offset:cfg.code_offset + cfg.codebook_size]
    torch.testing.assert_close(seen[1][0], hidden[0, T - L:], rtol=0, atol=1e-5)
    assert torch.equal(codes.reshape(-1), logits.argmax(-1))
    assert 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size


def test_parallel_decoding_is_seeded_and_refused_without_a_mask_id(make_system):
    system = make_system("discrete", parallel_images=0.5)
    model = system.model.eval()
    doc = encoded_documents(system, ["t2i"])[0]
    prompt = system.encoder.encode_prompt(Document(doc.segments[:-1], "t2i"))
    sampling = ImageSampling(parallel_steps=4, temperature=1.0)

    def draw(seed: int) -> np.ndarray:
        engine = Engine(model, system.text)
        engine.start([prompt])
        return engine.generate_image(sampling, [], [torch.Generator().manual_seed(seed)]).numpy()

    assert np.array_equal(draw(1), draw(1)) and not np.array_equal(draw(1), draw(2))
    with torch.no_grad():  # the mask id is an input only: never drawn, even when the head favours it
        model.lm_head.weight[system.model_config.mask_id] = 10 * model.lm_head.weight.abs().max()
    for steps in (0, 4):  # autoregressive and parallel decoding of the same bundle
        engine = Engine(model, system.text)
        engine.start([prompt])
        codes = engine.generate_image(ImageSampling(parallel_steps=steps, temperature=1.0), [])
        assert int(codes.max()) < system.model_config.codebook_size
    plain = make_system("discrete")
    engine = Engine(plain.model.eval(), plain.text)
    engine.start([prompt])
    with pytest.raises(ValueError, match="trained without parallel_images"):
        engine.generate_image(sampling, [])
    with pytest.raises(ValueError, match="has no codes"):
        make_system("continuous", parallel_images=0.5)


@pytest.mark.parametrize("steps", [0, 4])
def test_keep_source_holds_an_edit_to_its_source_codes(make_system, steps):
    """A large `keep_source` copies the source's codes into every slot, autoregressive (0) or parallel; 0 leaves
    the untrained model's draw as it was; without a source (text to image) it changes nothing."""
    system = make_system("discrete", parallel_images=0.5)
    model = system.model.eval()
    doc = encoded_documents(system, ["edit"])[0]
    prompt = system.encoder.encode_prompt(Document(doc.segments[:-1], "edit"))
    source = doc.segments[0].codes  # (g, g)

    def draw(keep: float, src=source[None]) -> torch.Tensor:
        engine = Engine(model, system.text)
        engine.start([prompt])
        sampling = ImageSampling(parallel_steps=steps, temperature=1.0, keep_source=keep)
        return engine.generate_image(sampling, [], [torch.Generator().manual_seed(3)], source=src)[0]

    free = draw(0.0)
    assert torch.equal(draw(1e4), source) and not torch.equal(free, source)
    assert torch.equal(draw(3.0, src=None), free)


def test_the_recipe_trains_a_parallel_bundle_that_the_commands_sample(tokenizer_dirs, tmp_path, monkeypatch):
    """The chameleon recipe with parallel_images through `anymodal fit`, `export`, then `generate t2i
    --parallel-steps`: the image is written, progress counts parallel steps, and the record's command line asks
    for the same steps."""
    monkeypatch.setattr(sys, "argv", ["anymodal"])  # LightningCLI warns when it sees pytest's arguments too
    main(cli_args("discrete", tokenizer_dirs, tmp_path) + [
        "--model.init_args.parallel_images", "1.0", "--model.init_args.size", "debug",
        "--data.init_args.batch_size", "2", "--data.init_args.val_batches", "1", "--trainer.max_steps=2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
    ])
    (ckpt,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bundle")])
    main(["generate", "t2i", "--checkpoint", str(tmp_path / "bundle"), "--prompt", "a red circle at the center",
          "--parallel-steps", "2", "--out", str(tmp_path / "t2i")])
    (row,) = [json.loads(line) for line in (tmp_path / "t2i" / "index.jsonl").read_text().splitlines()]
    assert (tmp_path / "t2i" / row["file"]).is_file() and row["parallel_steps"] == 2
    seen = []  # the progress of a request counts parallel steps, not codes
    requests.text_to_image(Pipeline(load_bundle(tmp_path / "bundle")), requests.TextToImage(
        ["a red circle"], sampling=ImageSampling(parallel_steps=2)), progress=seen.append)
    assert [(p.done, p.total) for p in seen] == [(1, 2), (2, 2)]
    line = requests.command_line("t2i", str(tmp_path / "bundle"), row)
    assert image_sampling(build_parser().parse_args(shlex.split(line)[1:])).parallel_steps == 2
    pipe = Pipeline(load_bundle(tmp_path / "bundle"))
    for asked, used in ((None, PARALLEL_STEPS), (0, 0)):  # unasked: as trained; 0: one code per forward
        seen = []
        (out,) = requests.text_to_image(pipe, requests.TextToImage(["a red circle"], sampling=ImageSampling(
            parallel_steps=asked)), progress=seen.append)
        assert out.record["parallel_steps"] == used and seen[-1].total == (used or pipe.bundle.config.slots)
        line = requests.command_line("t2i", str(tmp_path / "bundle"), out.record)
        assert image_sampling(build_parser().parse_args(shlex.split(line)[1:])).parallel_steps == used


def test_changed_code_weights_mark_the_codes_an_edit_changes_at_their_targets(make_system):
    from anymodal.losses import changed_code_weights

    system = make_system("discrete", parallel_images=1.0)
    batch, _ = system.encode_images(encoded_batch(system, ["t2i", "edit"], seq_len=400, rows=1))
    images = batch.image_slots(DISCRETE_IMAGE)  # t2i image; edit source; edit result
    (_, _, n, _), (rs, offs, _, _), (r, off, _, _) = images[0], images[1], images[2]
    changed = batch.tokens[r, off:off + n] != batch.tokens[rs, offs:offs + n]  # (n,)
    assert changed.any() and not changed.all()  # blank background keeps its code
    assert torch.equal(changed_code_weights(batch, 1.0), torch.ones(batch.tokens.shape))
    w = changed_code_weights(batch, 5.0)
    expected = torch.ones(batch.tokens.shape)
    expected[r, off - 1:off - 1 + n][changed] = 5.0  # position p predicts code p + 1
    assert torch.equal(w, expected)  # the t2i image and the edit's source (no reference in place) stay 1
    w = changed_code_weights(batch, 5.0, masked=[(r, off, n)])  # MaskGIT: each slot predicts its own code
    expected = torch.ones(batch.tokens.shape)
    expected[r, off:off + n][changed] = 5.0
    assert torch.equal(w, expected)
    losses = {}
    for weight in (1.0, 5.0):  # the same masking both times (it is seeded by the step)
        system.hparams.changed_code_weight = weight
        losses[weight] = system.compute_losses(batch)
    assert losses[1.0].codes != losses[5.0].codes and losses[1.0].text == losses[5.0].text
    with pytest.raises(ValueError, match="changed_code_weight=0 must be positive"):
        make_system("discrete", changed_code_weight=0)
