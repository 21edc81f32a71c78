"""Typed requests (anymodal.generate.requests) and the `anymodal generate` commands built on them."""

import json
import shlex
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from anymodal.checkpoint import Bundle, load_bundle, save_bundle
from anymodal.commands.cli import build_parser, main
from anymodal.commands.generate import image_sampling, text_sampling
from anymodal.generate import requests
from anymodal.generate.settings import IMAGE_GUIDANCE, KEEP_SOURCE, ImageSampling, TextSampling
from anymodal.generate.tasks import Pipeline

SIZE = {"continuous": 32, "discrete": 12}  # 12 px: 3x3 codes keep the discrete path fast


def _bundle(make_system, tmp_path, path: str) -> Bundle:
    system = make_system(path, image_size=SIZE[path])
    folder = save_bundle(tmp_path / path, system.sampling_model(), system.text, system.image_tokenizer,
                         system.objective.config())
    bundle = load_bundle(folder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random heads, so that outputs depend on the settings
        bundle.model.lm_head.weight.copy_(torch.randn(bundle.model.lm_head.weight.shape, generator=gen) * 0.2)
        if path == "continuous":
            bundle.model.patch_out.weight.copy_(torch.randn(bundle.model.patch_out.weight.shape, generator=gen) * 0.05)
    return bundle


@pytest.fixture(params=["continuous", "discrete"])
def bundle(request, make_system, tmp_path) -> Bundle:
    return _bundle(make_system, tmp_path, request.param)


@pytest.fixture
def continuous(make_system, tmp_path) -> Bundle:
    return _bundle(make_system, tmp_path, "continuous")


def _png(path, size: int, color=(200, 30, 30)):
    PILImage.new("RGB", (size, size), color).save(path)
    return str(path)


def test_text_to_image_reports_every_step_and_records_its_settings(bundle):
    pipe = Pipeline(bundle)
    seen: list[requests.Progress] = []
    sampling = ImageSampling(steps=3, guidance=2.0)
    outputs = requests.text_to_image(pipe, requests.TextToImage(["a red circle.", "a blue square."], num_images=2,
                                                                seed=7, sampling=sampling, batch_size=3), seen.append)
    assert len(outputs) == 4
    assert [o.record["seed"] for o in outputs] == [7, 8, 9, 10]
    assert [o.record["prompt"] for o in outputs] == ["a red circle."] * 2 + ["a blue square."] * 2
    assert outputs[0].record["steps"] == 3 and outputs[0].record["guidance"] == 2.0
    per_image = 3 if bundle.image_path == "continuous" else bundle.config.slots  # denoising steps or codes
    assert [p.done for p in seen] == list(range(1, 2 * per_image + 1))  # two batches, every step reported
    assert all(p.total == 2 * per_image for p in seen)
    # the request is the Pipeline call with the seeds it records: nothing else changes the images
    direct = pipe.text_to_image([o.record["prompt"] for o in outputs], [7, 8, 9, 10], sampling, 3)
    for o, im in zip(outputs, direct):
        assert np.array_equal(o.image, im)


def test_a_sampler_is_chosen_at_sampling_time_where_it_fits(continuous):
    pipe = Pipeline(continuous)
    ask = lambda sampler: requests.text_to_image(pipe, requests.TextToImage(  # noqa: E731
        ["a red circle."], sampling=ImageSampling(steps=3, sampler=sampler)))[0]
    euler, heun = ask(None), ask("heun")
    assert heun.record["sampler"] == "heun"
    assert not np.array_equal(euler.image, heun.image)  # Heun takes other steps
    with pytest.raises(ValueError, match="sampler 'ddim' does not fit the flow objective.*euler, heun"):
        ask("ddim")


def test_edit_caption_and_answer_take_paths_and_pair_inputs(continuous, tmp_path):
    pipe = Pipeline(continuous)
    image = _png(tmp_path / "red.png", 48)  # resized to the bundle's 32 px on load
    edited = requests.edit(pipe, requests.Edit([image], ["make it blue."], sampling=ImageSampling(steps=2)))
    assert edited[0].image.shape == (32, 32, 3) and edited[0].record["image"] == image
    assert edited[0].record["image_guidance"] == IMAGE_GUIDANCE["continuous"]  # unasked: the path's own, on record
    caption = requests.caption(pipe, requests.Caption([image], sampling=TextSampling(max_new_tokens=4)))
    assert caption[0].record == {"image": image, "caption": caption[0].text, "seed": 0,
                                 **{k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in TextSampling(max_new_tokens=4).__dict__.items()}}
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        requests.answer(pipe, requests.Question([image, image], ["what is it?"]))
    with pytest.raises(ValueError, match="give at least one prompt"):
        requests.text_to_image(pipe, requests.TextToImage([]))


def test_story_pieces_stream_in_order(bundle):
    pieces = []
    out = requests.story(Pipeline(bundle), requests.Story("a red circle.", max_images=1,
                                                          sampling=ImageSampling(steps=2),
                                                          text_sampling=TextSampling(max_new_tokens=6)),
                         on_piece=pieces.append)
    assert pieces == out.steps and pieces[0].text == "a red circle."
    assert out.record["prompt"] == "a red circle." and out.record["max_images"] == 1


def test_the_command_line_of_a_record_parses_back_to_its_settings(continuous):
    sampling = ImageSampling(steps=7, guidance=4.5, guidance_interval=(0.1, 0.9), sampler="heun", temperature=0.5)
    out = requests.text_to_image(Pipeline(continuous), requests.TextToImage(["a red circle."], seed=3,
                                                                            sampling=ImageSampling(steps=1)))
    record = {**out[0].record, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in sampling.__dict__.items()}}
    line = requests.command_line("t2i", "bundles/x", record)
    ns = build_parser().parse_args(shlex.split(line)[1:])
    assert image_sampling(ns) == sampling
    assert ns.seed == 3 and ns.prompt == ["a red circle."] and ns.checkpoint == "bundles/x"


def test_the_command_line_of_a_caption_or_answer_gives_back_its_text_sampling(continuous, tmp_path):
    pipe = Pipeline(continuous)
    image = _png(tmp_path / "red.png", SIZE["continuous"])
    sampling = TextSampling(temperature=0.5, top_k=7, top_p=0.9, max_new_tokens=5, image_guidance=1.5,
                            rerank_words=2)
    out = requests.caption(pipe, requests.Caption([image], seed=4, sampling=sampling))[0]
    ns = build_parser().parse_args(shlex.split(requests.command_line("caption", "bundles/x", out.record))[1:])
    assert text_sampling(ns) == sampling and ns.seed == 4 and ns.image == [image]
    asked = requests.answer(pipe, requests.Question([image], ["what?"], sampling=replace(sampling, rerank_words=0)))
    line = requests.command_line("vqa", "bundles/x", {**asked[0].record, "question": "what?"})
    assert "--rerank-words" not in line  # answers are not reranked
    assert text_sampling(build_parser().parse_args(shlex.split(line)[1:])) == replace(sampling, rerank_words=0)


def test_discrete_edits_record_keep_source_and_refuse_a_negative_one(make_system, tmp_path):
    pipe = Pipeline(_bundle(make_system, tmp_path, "discrete"))
    image = _png(tmp_path / "red.png", SIZE["discrete"])
    ask = lambda keep: requests.edit(pipe, requests.Edit(  # noqa: E731
        [image], ["make it blue."], sampling=ImageSampling(keep_source=keep)))[0]
    out = ask(1e4)  # the source's codes in every slot: its image again, as the tokenizer decodes it
    assert out.record["keep_source"] == 1e4 and out.record["image_guidance"] == IMAGE_GUIDANCE["discrete"]
    src = pipe.encode_image(torch.from_numpy(np.asarray(PILImage.open(image), np.float32) / 255).permute(2, 0, 1))
    assert np.array_equal(out.image, pipe.decode_images(src.codes[None])[0])
    line = requests.command_line("edit", "bundles/x", out.record)
    assert image_sampling(build_parser().parse_args(shlex.split(line)[1:])).keep_source == 1e4
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="keep_source=.* must be a finite number >= 0"):
            ask(bad)
    t2i = requests.text_to_image(pipe, requests.TextToImage(["a red circle."]))[0]
    assert "keep_source" not in t2i.record and "--keep-source" not in requests.command_line("t2i", "x", t2i.record)


def test_continuous_edits_record_their_keep_source_and_refuse_one_above_1(continuous, tmp_path):
    pipe = Pipeline(continuous)
    image = _png(tmp_path / "red.png", 32)
    ask = lambda keep: requests.edit(pipe, requests.Edit(  # noqa: E731
        [image], ["make it blue."], sampling=ImageSampling(steps=2, keep_source=keep)))[0]
    assert ask(None).record["keep_source"] == KEEP_SOURCE["continuous"]  # unasked: the path's own, on record
    with pytest.raises(ValueError, match="keep_source=1.5 must be between 0 and 1 on the continuous path"):
        ask(1.5)


def test_generate_commands_write_what_the_requests_return(continuous, tmp_path, capsys):
    folder = continuous.folder
    main(["generate", "t2i", "--checkpoint", folder, "--prompt", "a red circle.", "--num-images", "2",
          "--steps", "2", "--out", str(tmp_path / "t2i")])
    rows = [json.loads(line) for line in (tmp_path / "t2i" / "index.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and all((tmp_path / "t2i" / r["file"]).is_file() for r in rows)
    assert rows[0]["steps"] == 2 and rows[0]["guidance"] == ImageSampling().guidance
    image = _png(tmp_path / "src.png", 32)
    main(["generate", "edit", "--checkpoint", folder, "--image", image, "--instruction", "make it blue.",
          "--steps", "2", "--cfg-image", "2.0", "--out", str(tmp_path / "edit")])
    row = json.loads((tmp_path / "edit" / "index.jsonl").read_text())
    assert row["image_guidance"] == 2.0 and row["instruction"] == "make it blue."
    capsys.readouterr()
    main(["generate", "vqa", "--checkpoint", folder, "--image", image, "--question", "what?", "--question", "where?",
          "--max-new-tokens", "3", "--json"])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["question"] for a in answers] == ["what?", "where?"]
    main(["generate", "story", "--checkpoint", folder, "--prompt", "a red circle.", "--max-images", "1",
          "--steps", "2", "--out", str(tmp_path / "story")])
    assert (tmp_path / "story" / "story.html").is_file()


def test_generate_refuses_a_sampler_of_another_objective_in_one_line(continuous, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "t2i", "--checkpoint", continuous.folder, "--prompt", "x", "--sampler", "ddpm",
              "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("anymodal generate: error: sampler 'ddpm' does not fit the flow objective")
    assert not (tmp_path / "o").exists()  # nothing written


def test_prompts_as_people_type_them_read_as_the_canonical_text(continuous):
    """Casing (the shapes tokenizer lower-cases), spaces and a story's missing final period change nothing."""
    from anymodal.benchmark import typed
    from anymodal.generate.tasks import as_question, as_sentence, clean_text

    pipe = Pipeline(continuous)
    canonical = "a red circle at the top left and a blue square at the center"
    variants = [typed(canonical, i) for i in range(4)]
    assert len(set(variants)) == 4 and canonical not in variants
    assert [clean_text(v).lower().rstrip(".") for v in variants] == [canonical] * 4
    sampling = ImageSampling(steps=2)
    for prompt in variants[1:3] + ["  A Red Circle at the top left and a BLUE square at the center "]:
        assert np.array_equal(pipe.text_to_image([prompt], [0], sampling)[0],
                              pipe.text_to_image([canonical], [0], sampling)[0])
    assert as_sentence(" a red circle ") == as_sentence("a red circle.") == "a red circle."
    assert as_sentence("is it red?") == "is it red?"
    assert as_question(" What color is the triangle ") == "What color is the triangle?"
    assert as_question("what color is the triangle.") == as_question("what color is the triangle?")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    questions = ["what color is the triangle?", "WHAT COLOR IS THE TRIANGLE", "What  color is the triangle."]
    assert len(set(pipe.answer([image] * 3, questions, TextSampling(max_new_tokens=4)))) == 1
    text = TextSampling(max_new_tokens=4)
    story = [s.text for s in pipe.story("A red circle", max_images=1, sampling=sampling, text_sampling=text)]
    assert story[0] == "A red circle."  # the prompt as the story shows it; what follows reads it lower-cased
    assert story[1:] == [s.text for s in pipe.story("a red circle.", max_images=1, sampling=sampling,
                                                    text_sampling=text)][1:]
