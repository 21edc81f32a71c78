"""The sampling engine: cache = recompute, batched = one at a time, guidance, story structure, errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from anymodal.checkpoint import Bundle, BundleError, load_bundle, save_bundle
from anymodal.data.document import Image, Text
from anymodal.data.images import BadImage, load_image
from anymodal.diffusion.schedule import build_objective
from anymodal.generate import engine as engine_module
from anymodal.generate.engine import (
    Engine,
    ImageSampling,
    TextSampling,
    guide,
    guide_text,
    keep_near_source,
    sample_logits,
)
from anymodal.generate.tasks import Pipeline, clean_text

# Discrete bundles use 12-pixel images (3x3 = 9 codes) so that the uncached reference stays fast.
IMAGE_SIZE = {"continuous": 32, "discrete": 12}


def _bundle(make_system, tmp_path, path: str, **options) -> Bundle:
    """A debug-size bundle written and loaded back, with heads that make sampling non-trivial."""
    size = IMAGE_SIZE[path]
    system = make_system(path, image_size=size, **options)
    folder = save_bundle(tmp_path / path, system.sampling_model(), system.text, system.image_tokenizer,
                         system.objective.config())
    bundle = load_bundle(folder, expect=path)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model = bundle.model
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.2)
        if path == "continuous":  # zero-initialised: every prediction would be 0
            model.patch_out.weight.copy_(torch.randn(model.patch_out.weight.shape, generator=gen) * 0.05)
            model.patch_out.bias.copy_(torch.randn(model.patch_out.bias.shape, generator=gen) * 0.05)
        if model.config.code_positions:  # large, so a code read at the wrong slot changes what is drawn
            model.code_pos.copy_(torch.randn(model.code_pos.shape, generator=gen))
    return bundle


@pytest.fixture
def continuous(make_system, tmp_path) -> Bundle:
    return _bundle(make_system, tmp_path, "continuous")


@pytest.fixture(params=[False, True], ids=["discrete", "discrete+positions"])
def discrete(request, make_system, tmp_path) -> Bundle:
    return _bundle(make_system, tmp_path, "discrete", code_positions=request.param)


@pytest.fixture(params=["continuous", "discrete"])
def bundle(request, make_system, tmp_path) -> Bundle:
    return _bundle(make_system, tmp_path, request.param)


def _engine(bundle: Bundle, use_cache: bool) -> Engine:
    return Engine(bundle.model, bundle.text, bundle.objective, use_cache=use_cache)


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _source_image(pipe: Pipeline, seed: int) -> Image:
    gen = torch.Generator().manual_seed(seed)
    return pipe.encode_image(torch.rand(3, pipe.bundle.image_size, pipe.bundle.image_size, generator=gen))


def _images_close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == np.uint8 and x.shape == y.shape
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


# ---------------------------------------------------------------- guidance and sampling primitives
def test_guide_formula():
    pred = torch.randn(3, 2, 4, 5)
    uncond_guided = guide(pred[:2], [3.0])
    torch.testing.assert_close(uncond_guided, pred[1] + 3.0 * (pred[0] - pred[1]))
    both = guide(pred, [2.5, 1.5])
    torch.testing.assert_close(both, pred[0] + 1.5 * (pred[0] - pred[1]) + 0.5 * (pred[0] - pred[2]))
    assert torch.equal(guide(pred, [1.0, 1.0]), pred[0])  # every scale 1: the conditional branch exactly
    assert torch.equal(guide(pred[:1], []), pred[0])


def test_top_k_and_top_p_restrict_to_the_allowed_set():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)
    n = 4000
    logits = probs.log().expand(n, -1)
    gen = torch.Generator().manual_seed(0)

    def frequencies(**kwargs) -> torch.Tensor:
        ids = sample_logits(logits, temperature=1.0, generators=[gen] * n, **kwargs)
        return torch.bincount(ids, minlength=5).float() / n

    full = frequencies(top_k=0, top_p=1.0)
    assert (full > 0).all()  # every token is drawn without a restriction
    torch.testing.assert_close(full, probs, atol=0.03, rtol=0)
    top3 = frequencies(top_k=3, top_p=1.0)
    assert top3[[0, 2]].sum() == 0
    torch.testing.assert_close(top3[[1, 3, 4]], probs[[1, 3, 4]] / 0.85, atol=0.03, rtol=0)
    nucleus = frequencies(top_k=0, top_p=0.6)  # .4 < .6 <= .4 + .3: the two most likely tokens
    assert nucleus[[0, 2, 4]].sum() == 0
    torch.testing.assert_close(nucleus[[1, 3]], probs[[1, 3]] / 0.7, atol=0.03, rtol=0)
    tiny_p = frequencies(top_k=0, top_p=0.01)  # the most likely token is always kept
    assert tiny_p[1] == 1
    both = frequencies(top_k=3, top_p=0.9)  # the top 3 reach 0.85 < 0.9: top-k is the tighter bound
    assert both[[0, 2]].sum() == 0 and (both[[1, 3, 4]] > 0).all()
    greedy = sample_logits(logits[:3], temperature=0.0, top_k=0, top_p=1.0)
    assert greedy.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- cache = recompute
def test_text_cached_equals_uncached(continuous):
    pipe = Pipeline(continuous)
    prompts = [pipe.prompt([_source_image(pipe, 0), Text("what is in the picture?")], "vqa"),
               pipe.prompt([Text("a red circle")], "caption")]
    for sampling, seeds in ((TextSampling(max_new_tokens=8), None),
                            (TextSampling(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=8), (3, 4))):
        runs = []
        for use_cache in (True, False):
            engine = _engine(continuous, use_cache)
            engine.start(prompts)
            runs.append(engine.generate_text(sampling, _gens(*seeds) if seeds else None))
        assert runs[0] == runs[1]
        assert max(len(ids) for ids in runs[0]) > 1


def test_discrete_image_cached_equals_uncached(discrete):
    pipe = Pipeline(discrete)
    source = _source_image(pipe, 0)
    prompts = [pipe.prompt([source, Text("make it blue")], "edit"), pipe.prompt([Text("a square")], "t2i"),
               pipe.prompt([source], "edit"), pipe.prompt([], "t2i")]
    sampling = ImageSampling(guidance=3.0, temperature=1.0, top_k=32)
    codes, texts = [], []
    for use_cache in (True, False):
        engine = _engine(discrete, use_cache)
        engine.start(prompts, branches=2)
        codes.append(engine.generate_image(sampling, [sampling.guidance], _gens(5, 6)))
        texts.append(engine.generate_text(TextSampling(max_new_tokens=6)))
    assert codes[0].shape == (2, 3, 3) and codes[0].dtype == torch.long
    assert torch.equal(codes[0], codes[1])
    assert len(codes[0].unique()) > 4  # sampled, not collapsed to one code
    assert texts[0] == texts[1]


def test_continuous_image_cached_equals_uncached_and_text_follows(continuous):
    pipe = Pipeline(continuous)
    prompts = [pipe.prompt([Text("a red circle")], "t2i"), pipe.prompt([Text("two small blue squares")], "t2i"),
               pipe.prompt([], "t2i"), pipe.prompt([], "t2i")]
    sampling = ImageSampling(steps=4, guidance=3.0)
    latents, after, texts = [], [], []
    for use_cache in (True, False):
        engine = _engine(continuous, use_cache)
        engine.start(prompts, branches=2)
        latents.append(engine.generate_image(sampling, [sampling.guidance], _gens(1, 2)))
        after.append(engine.last_hidden.clone())  # the hidden state after <eoi>: it read the clean latents
        texts.append(engine.generate_text(TextSampling(max_new_tokens=8)))
    assert latents[0].shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents[0], latents[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(latents[0][0], latents[0][1])  # different seeds and prompts
    torch.testing.assert_close(after[0], after[1], atol=1e-5, rtol=1e-5)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("name", ["flow", "ddpm"])
def test_clean_and_prediction_invert_each_other_and_read_training_noise_back(name):
    objective = build_objective(name)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noised = objective.noise(x0, gen)
    for i in range(3):  # the training target is the prediction that implies x0
        t = noised.timesteps[i].round() if name == "ddpm" else noised.timesteps[i]
        x_t, target = noised.x_t[i], noised.target[i]
        torch.testing.assert_close(objective.clean(x_t, target, t), x0[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(objective.prediction_for(x_t, x0[i], t), target, atol=1e-3, rtol=1e-3)
    noise = torch.randn(x0.shape, generator=gen)
    for level in (0.05, 0.5, 0.95):  # a given level and noise: the same relations, the noise itself behind x_t
        at = objective.noise_at(x0, noise, level)
        t = at.timesteps[0]
        assert torch.equal(at.timesteps, t.expand(3)) and abs(float(t) / objective.num_train_timesteps - level) < 2e-3
        torch.testing.assert_close(objective.clean(at.x_t, at.target, t), x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(objective.prediction_for(at.x_t, x0, t), at.target, atol=1e-3, rtol=1e-3)
        assert not torch.allclose(at.x_t, objective.noise_at(x0, -noise, level).x_t)


@pytest.mark.parametrize("path", ["continuous", "discrete"])
def test_image_scores_cached_equal_uncached_and_read_the_prompt(make_system, tmp_path, path):
    bundle = _bundle(make_system, tmp_path, path)
    pipe = Pipeline(bundle)
    image = _source_image(pipe, 0)
    x = image.codes if path == "discrete" else image.latents
    prompts = [pipe.prompt([Text(t)], "t2i") for t in ("a red circle", "two blue squares at the top", "a")]
    scores = []
    for use_cache in (True, False):
        engine = _engine(bundle, use_cache)
        engine.start(prompts)
        scores.append(engine.image_scores(torch.stack([x] * 3), _gens(7, 7, 7)))
    assert scores[0].shape == (3,) and (scores[0] > 0).all()
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    assert len(set(scores[0].tolist())) == 3  # the same image and noise: only the prompt differs
    if path == "discrete":  # the codes' mean negative log-likelihood: read back from the logits one by one
        engine = _engine(bundle, False)
        engine.start(prompts[:1])
        engine._feed(torch.tensor([[bundle.text.boi_id]]))
        nll, off = [], bundle.model.config.code_offset
        for code in x.flatten().tolist():
            logits = bundle.model.logits(engine.last_hidden)[0, off:off + bundle.model.config.codebook_size]
            nll.append(-logits.float().log_softmax(-1)[code])
            engine._feed(torch.tensor([[code + off]]))
        torch.testing.assert_close(scores[0][0], torch.stack(nll).mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one per prompt"):
        engine = _engine(bundle, True)
        engine.start(prompts)
        engine.image_scores(torch.stack([x] * 2))


def test_keep_near_source_pulls_only_where_the_prediction_lies_near_the_source():
    objective = build_objective("flow")
    gen = torch.Generator().manual_seed(0)
    source, x = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    near = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    near[..., :4] = True  # the left half of the predicted latents lies 0.1 from the source, the right half 5 away
    x0 = source + torch.where(near, 0.1, 5.0)
    t = 600.0
    x0_kept = objective.clean(x, keep_near_source(objective, x, objective.prediction_for(x, x0, t), t, source, 0.5), t)
    moved = (x0 - x0_kept).abs()
    pull = 0.5 * np.exp(-(0.1 / engine_module.KEEP_RADIUS) ** 2)
    torch.testing.assert_close(x0_kept[..., :4], (x0 + pull * (source - x0))[..., :4])
    assert moved[..., 4:].max() < 1e-3  # 5 away: left as predicted


def test_a_continuous_edit_held_fully_to_its_source_returns_the_source(continuous, monkeypatch):
    """keep_source 1 with a radius that reaches everywhere: every step's clean latents are the source's, so the
    edit returns them; 0 leaves the random model's draw."""
    pipe = Pipeline(continuous)
    src = _source_image(pipe, 3)
    prompt = pipe.prompt([src, Text("make it blue.")], "edit")

    def draw(keep: float) -> torch.Tensor:
        engine = _engine(continuous, True)
        engine.start([prompt])
        return engine.generate_image(ImageSampling(steps=5, keep_source=keep), [], _gens(1), source=src.latents[None])

    free = draw(0.0)
    monkeypatch.setattr(engine_module, "KEEP_RADIUS", 1e9)
    torch.testing.assert_close(draw(1.0)[0], src.latents, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(free[0], src.latents, atol=1e-2)
    # Heun evaluates each step's end too; pulled there, the last step's end (sigma 0.001) would blow the
    # latents up about a thousandfold
    engine = _engine(continuous, True)
    engine.start([prompt])
    half = engine.generate_image(ImageSampling(steps=5, keep_source=0.5, sampler="heun"), [], _gens(1),
                                 source=src.latents[None])
    assert (half[0] - src.latents).abs().max() < 2 * (free[0] - src.latents).abs().max()


def test_text_after_an_image_depends_on_its_latents(continuous):
    """The check above can fail: the hidden state after `<eoi>` moves with the image's clean latents."""
    pipe = Pipeline(continuous)
    hidden = []
    for seed in (1, 2):
        engine = _engine(continuous, use_cache=True)
        engine.start([pipe.prompt([Text("a red circle")], "t2i")])
        engine.generate_image(ImageSampling(steps=2), [], _gens(seed))
        hidden.append(engine.last_hidden)
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3


# ---------------------------------------------------------------- batched = one at a time
def test_text_to_image_batched_equals_one_at_a_time(bundle):
    pipe = Pipeline(bundle)
    prompts = ["a red circle", "two small blue squares at the top left of the picture"]
    sampling = ImageSampling(steps=4, guidance=2.0)
    batched = pipe.text_to_image(prompts, seeds=[3, 7], sampling=sampling, batch_size=2)
    single = pipe.text_to_image(prompts, seeds=[3, 7], sampling=sampling, batch_size=1)
    _images_close(batched, single)
    size = bundle.image_size
    assert batched[0].shape == (size, size, 3)
    assert np.abs(batched[0].astype(int) - batched[1].astype(int)).max() > 1


def test_caption_and_answer_batched_equal_one_at_a_time(continuous):
    pipe = Pipeline(continuous)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=gen) for _ in range(2)]
    greedy = TextSampling(max_new_tokens=6)
    assert pipe.caption(images, greedy, batch_size=2) == pipe.caption(images, greedy, batch_size=1)
    questions = ["what?", "which shapes are in the lower right corner of the picture?"]
    sampled = TextSampling(temperature=1.0, max_new_tokens=6)
    answers = pipe.answer(images, questions, sampled, batch_size=2, seeds=[4, 5])
    assert answers == pipe.answer(images, questions, sampled, batch_size=1, seeds=[4, 5])
    assert any(answers)


@pytest.mark.parametrize("path", ["continuous", "discrete"])
def test_a_reranked_caption_explains_its_image_at_least_as_well_as_the_decoded_one(make_system, tmp_path, path):
    bundle = _bundle(make_system, tmp_path, path)
    pipe = Pipeline(bundle)
    size = bundle.image_size
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen) for _ in range(4)]
    plain = TextSampling(max_new_tokens=6, image_guidance=3.0)
    reranked = TextSampling(max_new_tokens=6, image_guidance=3.0, rerank_words=3)
    decoded = pipe.caption(images, plain)
    chosen = pipe.caption(images, reranked, batch_size=4)
    assert chosen == pipe.caption(images, reranked, batch_size=1)  # batched = one at a time (noise per image)
    assert pipe.caption(images, TextSampling(max_new_tokens=6, image_guidance=3.0, rerank_words=0)) == decoded
    assert chosen != decoded  # near-uniform heads: plausible alternatives everywhere, one of them won

    def score(texts):
        kind = "codes" if path == "discrete" else "latents"
        engine = _engine(bundle, True)
        engine.start([pipe.prompt([Text(clean_text(t))], "t2i") for t in texts])
        x = torch.stack([getattr(pipe.encode_image(im), kind) for im in images])
        return engine.image_scores(x, _gens(*range(len(texts))))

    assert (score(chosen) <= score(decoded) + 1e-6).all()
    assert (score(chosen) < score(decoded) - 1e-6).any()
    with pytest.raises(ValueError, match="rerank_words"):
        pipe.caption(images, TextSampling(rerank_words=-1))


def test_guided_text_reorders_only_the_tokens_the_image_makes_plausible():
    cond = torch.tensor([[0.50, 0.30, 0.195, 0.005]]).log()  # token 3: below TEXT_GUIDANCE_FLOOR of the top
    uncond = torch.tensor([[0.70, 0.10, 0.10, 1e-6]]).log()  # the text alone favours token 0; knows nothing of 3
    scores = guide_text(torch.stack([cond, uncond]), 3.0)
    torch.testing.assert_close(scores[0, :3], (cond + 2.0 * (cond - uncond))[0, :3])
    assert scores[0, 3] == float("-inf")  # the largest gain of all, but the image never made it plausible
    assert scores.argmax(-1).item() == 1  # what the image adds wins over what the text alone would say
    assert cond.argmax(-1).item() == 0
    assert torch.equal(guide_text(torch.stack([cond, uncond]), 1.0)[0, :3], cond[0, :3])


def test_a_guided_caption_reads_its_image_against_the_same_prompt_without_it(continuous, monkeypatch):
    pipe = Pipeline(continuous)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=gen) for _ in range(3)]
    plain, guided = TextSampling(max_new_tokens=6), TextSampling(max_new_tokens=6, image_guidance=4.0)
    seen = []
    real_start = Engine.start

    def start(self, prompts, branches=1):
        seen.append([len(p.images) for p in prompts])
        return real_start(self, prompts, branches)

    monkeypatch.setattr(Engine, "start", start)
    captions, answers = pipe.caption(images, guided), pipe.answer(images, ["what?"] * 3, guided)
    assert seen == [[1, 1, 1, 0, 0, 0]] * 2  # the prompts, then the same without their images
    assert captions != pipe.caption(images, plain) and answers != pipe.answer(images, ["what?"] * 3, plain)
    prompts = [pipe.prompt([pipe.encode_image(im)], "caption") for im in images]
    alone = _engine(continuous, True)
    alone.start(prompts)
    ids = alone.generate_text(plain)
    both = _engine(continuous, True)
    both.start(prompts + [pipe.prompt([], "caption")] * 3, branches=2)
    guided_ids = both.generate_text(guided, guide_from=1)
    assert [i[0] for i in guided_ids] == [i[0] for i in ids] and guided_ids != ids  # the first token as is
    with pytest.raises(ValueError, match="two branches"):
        alone.generate_text(guided, guide_from=0)


# ---------------------------------------------------------------- guidance scale 1 = conditional branch
def test_guidance_scale_one_is_the_conditional_branch(bundle):
    pipe = Pipeline(bundle)
    source = _source_image(pipe, 0)
    full = [pipe.prompt([source, Text("make it blue")], "edit"), pipe.prompt([source, Text("flip it")], "edit")]
    no_text = [pipe.prompt([source], "edit")] * 2
    no_image = [pipe.prompt([Text("make it blue")], "edit"), pipe.prompt([Text("flip it")], "edit")]
    t2i = [pipe.prompt([Text("a red circle")], "t2i"), pipe.prompt([Text("a square")], "t2i")]
    empty = [pipe.prompt([], "t2i")] * 2
    sampling = ImageSampling(steps=3, guidance=1.0, image_guidance=1.0, temperature=1.0)
    for cond, others in ((t2i, empty), (full, no_text + no_image)):
        guided = _engine(bundle, True)
        guided.start(cond + others, branches=1 + len(others) // len(cond))
        scales = [sampling.guidance, sampling.image_guidance][: guided.branches - 1]
        out = guided.generate_image(sampling, scales, _gens(8, 9))
        alone = _engine(bundle, True)
        alone.start(cond)
        ref = alone.generate_image(sampling, [], _gens(8, 9))
        if bundle.image_path == "discrete":
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and a scale above 1 does change the result
    guided = _engine(bundle, True)
    guided.start(t2i + empty, branches=2)
    out = guided.generate_image(ImageSampling(steps=3, guidance=4.0, temperature=1.0), [4.0], _gens(8, 9))
    alone = _engine(bundle, True)
    alone.start(t2i)
    assert not torch.allclose(out.float(), alone.generate_image(sampling, [], _gens(8, 9)).float())


# ---------------------------------------------------------------- work per denoising step
def test_denoising_steps_run_only_the_image_against_the_cache(continuous):
    pipe = Pipeline(continuous)
    prompts = [pipe.prompt([Text("a red circle in the middle")], "t2i"), pipe.prompt([], "t2i")]
    R, T0, L, steps = 2, len(prompts[0]), continuous.config.slots, 5
    counts = {}
    for use_cache in (True, False):
        engine = _engine(continuous, use_cache)
        engine.start(prompts, branches=2)
        engine.generate_image(ImageSampling(steps=steps), [3.0])
        counts[use_cache] = engine.stats
    cached, full = counts[True], counts[False]
    assert cached.denoise_forwards == [R * L] * steps
    assert full.denoise_forwards == [R * (T0 + 1 + L)] * steps  # prompt, <boi>, the image: every step
    # prefill, <boi>, the steps, the clean latents entering the cache, <eoi>
    assert cached.forwards == [R * T0, R] + [R * L] * steps + [R * L, R]
    assert len(full.forwards) == len(cached.forwards)


# ---------------------------------------------------------------- stories
def _bigram(bundle: Bundle, rules: dict[int, int]) -> None:
    """Turn the model into a bigram table: after token a comes rules[a], by a margin of 40 logits.

    Zeroed attention and MLP outputs leave each position's hidden state a function of its own token;
    each ruled token gets its own basis vector as embedding, and the head maps it to its successor.
    """
    model = bundle.model
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.eye(model.config.arch.dim)  # the final RMSNorm scales e_i to sqrt(dim) e_i = 8 e_i
        model.lm_head.weight.zero_()
        for i, (a, b) in enumerate(rules.items()):
            model.embed_tokens.weight[a] = basis[i]
            model.lm_head.weight[b] += 5.0 * basis[i]


def _story_rules(bundle: Bundle, then: str) -> tuple[int, int, dict[int, int]]:
    """Prompt "x." -> A B, then `then` ('image': <boi>, and after <eoi> again A B; 'end': <eos>)."""
    text = bundle.text
    last = text.encode("x.")[-1]
    a, b = text.encode(" red circle")[:2]
    assert len({last, a, b}) == 3
    rules = {last: a, a: b, b: text.boi_id if then == "image" else text.eos_id, text.eoi_id: a}
    return a, b, rules


@pytest.mark.parametrize("then", ["image", "end"])
def test_story_alternates_text_and_images(bundle, then):
    a, b, rules = _story_rules(bundle, then)
    _bigram(bundle, rules)
    pipe = Pipeline(bundle)
    steps = pipe.story("x.", seed=0, max_images=2, sampling=ImageSampling(steps=2),
                       text_sampling=TextSampling(temperature=1.0, max_new_tokens=8))
    kinds = ["image" if s.image is not None else "text" for s in steps]
    words = bundle.text.decode([a, b]).strip()
    if then == "end":
        assert kinds == ["text", "text"] and steps[1].text == words
        return
    # at most max_images images, and no text after the last: it would be an instruction never drawn
    assert kinds == ["text", "text", "image", "text", "image"]
    assert [s.text for s in steps if s.text is not None] == ["x.", words, words]
    size = bundle.image_size
    assert all(s.image.shape == (size, size, 3) and s.image.dtype == np.uint8 for s in steps if s.image is not None)


def test_a_story_samples_its_text_where_greedy_would_always_pick_one_word(bundle):
    """After the prompt two words are equally likely (as "then" and "finally" nearly are after a story's image):
    greedy text takes the same one for every seed, the story default (`STORY_TEXT`) takes both across seeds, each
    seed always the same."""
    text = bundle.text
    last = text.encode("x.")[-1]
    a, b = text.encode(" red circle")[:2]
    _bigram(bundle, {last: a, a: text.eos_id, b: text.eos_id})
    with torch.no_grad():
        bundle.model.lm_head.weight[b] += 5.0 * torch.eye(bundle.model.config.arch.dim)[0]  # b as likely as a
    pipe = Pipeline(bundle)

    def first_word(seed: int, sampling: TextSampling | None = None) -> str:
        return pipe.story("x.", seed=seed, max_images=1, sampling=ImageSampling(steps=2), text_sampling=sampling)[1].text

    words = {a_word: text.decode([t]).strip() for a_word, t in (("a", a), ("b", b))}
    assert len({first_word(seed, TextSampling()) for seed in range(8)}) == 1  # greedy: one of the two, always
    drawn = [first_word(seed) for seed in range(8)]
    assert set(drawn) == {words["a"], words["b"]}
    assert [first_word(seed) for seed in range(8)] == drawn


def test_story_images_back_to_back_are_closed_by_eoi(bundle):
    text = bundle.text
    last = text.encode("x.")[-1]
    _bigram(bundle, {last: text.boi_id, text.eoi_id: text.boi_id})  # nothing but images
    pipe = Pipeline(bundle)
    steps = pipe.story("x.", max_images=3, sampling=ImageSampling(steps=2))
    assert [s.image is not None for s in steps] == [False, True, True, True]
    # the same loop on an engine: its sequence holds <boi> N slots <eoi> per image
    engine = _engine(bundle, True)
    prompt = pipe.prompt([Text("x.")], "story")
    engine.start([prompt, pipe.prompt([], "story")], branches=2)
    for _ in range(3):
        assert engine.generate_text(TextSampling(), stop_at_boi=True) == [[text.boi_id]]
        engine.generate_image(ImageSampling(steps=2), [3.0])
    L, cfg = bundle.config.slots, bundle.config
    row, cont = engine.ids[0, len(prompt):].tolist(), engine.continuous_ids[0, len(prompt):].tolist()
    assert len(row) == 3 * (L + 2)
    for i in range(3):
        block = row[i * (L + 2):(i + 1) * (L + 2)]
        assert block[0] == text.boi_id and block[-1] == text.eoi_id
        slots = block[1:-1]
        if bundle.image_path == "discrete":
            assert all(cfg.code_offset <= s < cfg.vocab_size for s in slots)
        else:
            assert cont[i * (L + 2) + 1:(i + 1) * (L + 2) - 1] == [i] * L  # one continuous image per block
    if bundle.image_path == "continuous":  # each image's clean latents, in both branches, entered the cache
        assert [(im.row, im.timestep) for im in engine.images] == [(0, 0.0), (1, 0.0)] * 3


def test_a_story_guides_only_its_first_image(bundle, monkeypatch):
    """Later images are edits of the one before: the branch without the prompt would pull them back to its scene."""
    text = bundle.text
    _bigram(bundle, {text.encode("x.")[-1]: text.boi_id, text.eoi_id: text.boi_id})  # nothing but images
    scales, generate = [], Engine.generate_image

    def recorded(self, sampling, guidance, *args, **kwargs):  # the engine's own sampling, its scales on record
        scales.append(list(guidance))
        return generate(self, sampling, guidance, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate_image", recorded)
    steps = Pipeline(bundle).story("x.", max_images=3, sampling=ImageSampling(steps=2, guidance=4.0))
    assert sum(s.image is not None for s in steps) == 3 and scales == [[4.0], [1.0], [1.0]]


# ---------------------------------------------------------------- errors people see
def test_prompt_longer_than_the_context_is_refused(continuous):
    pipe = Pipeline(continuous)
    limit = continuous.config.arch.max_seq_len
    prompt = " ".join(["circle"] * limit)
    n = len(pipe.prompt([Text(prompt)], "t2i"))
    with pytest.raises(ValueError, match=f"prompt is {n} tokens long but the model's context is {limit}"):
        pipe.text_to_image([prompt], sampling=ImageSampling(steps=2))


def test_unreadable_images_are_refused(tmp_path, continuous):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a picture")
    with pytest.raises(BadImage, match="not an image in a supported format"):
        load_image(junk, 32)
    buffer = io.BytesIO()
    PILImage.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImage, match="corrupt or truncated"):
        load_image(cut, 32)
    pipe = Pipeline(continuous)
    with pytest.raises(ValueError, match=r"must be \(3, 32, 32\) pixels.*got \(3, 20, 20\).*load_image"):
        pipe.caption([torch.rand(3, 20, 20)])
    with pytest.raises(ValueError, match=r"must be \(3, 32, 32\) pixels"):
        pipe.encode_image(torch.rand(32, 32, 3))


def test_bundle_of_the_wrong_kind_is_refused(continuous):
    with pytest.raises(BundleError, match="continuous-path bundle, but a discrete-path one is needed"):
        load_bundle(continuous.folder, expect="discrete")
