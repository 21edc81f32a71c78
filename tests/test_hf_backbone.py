"""Pretrained Hugging Face LMs as the backbone (anymodal.model.hf): tiny models of every supported family, built
from configs and saved to a temporary folder (nothing is downloaded). Logits equal transformers'; what cannot be
reproduced is refused in one sentence; the vocabulary extension keeps the text logits; two training steps, a
sampled image and a caption on each image path; export back to plain transformers."""

import csv
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from anymodal.checkpoint import BundleError, export_hf, load_bundle, save_bundle
from anymodal.commands.cli import main
from anymodal.config import ArchConfig
from anymodal.data.document import Document, Image
from anymodal.data.packing import collate_rows, pack_rows
from anymodal.data.shapes import ShapesWorld, caption, random_scene
from anymodal.generate.settings import ImageSampling, TextSampling
from anymodal.generate.tasks import Pipeline
from anymodal.masks import build_attention_mask
from anymodal.model.hf import load_text_model, read_lm_arch
from anymodal.model.unified import ModelConfig
from anymodal.systems.optim import build_optimizer
from anymodal.systems.unified import UnifiedSystem

SHAPES = ["a red circle at the top left and a blue square at the center", "move the red circle to the bottom",
          "how many shapes are there? three", "a green triangle at the bottom right, a cyan square at the left"]
TEXTS = [caption(random_scene(np.random.default_rng(i))) for i in range(200)] + SHAPES * 20
SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)

# family -> (config fields, tokenizer specials: bos, eos, pad, unk), each as the real family writes them
LLAMA_TOKENS = dict(bos="<s>", eos="</s>", pad=None, unk="<unk>")
QWEN_TOKENS = dict(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", unk=None)
FAMILIES = {
    "llama": (dict(model_type="llama", rope_theta=500.0), LLAMA_TOKENS),
    "smollm": (dict(model_type="llama", tie_word_embeddings=True),
               dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>")),
    "llama3": (dict(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, unk=None)),
    "mistral": (dict(model_type="mistral", sliding_window=256, head_dim=24), LLAMA_TOKENS),
    "qwen2": (dict(model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True), QWEN_TOKENS),
    "qwen3": (dict(model_type="qwen3", head_dim=32), dict(QWEN_TOKENS, eos="<|im_end|>")),
    "gemma": (dict(model_type="gemma", head_dim=32), dict(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>")),
}
EXTRA_ROWS = {"qwen2": 8}  # Qwen's embedding has rows past its tokenizer's ids


def make_tokenizer(bos=None, eos=None, pad=None, unk=None) -> PreTrainedTokenizerFast:
    specials = list(dict.fromkeys(t for t in (unk, pad, bos, eos) if t))
    raw = Tokenizer(models.BPE(unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)


def save_lm(folder, fields: dict, vocab_size: int, seed: int = 0) -> None:
    """A tiny causal LM of `fields` with weights moved off their init (norms off 1, biases off 0)."""
    fields = dict(SHAPE, **fields)
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab_size, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory) -> dict[str, str]:
    """{family: folder} of tiny LMs with their own tokenizers, saved as transformers saves them."""
    root = tmp_path_factory.mktemp("lms")
    dirs = {}
    for name, (fields, tokens) in FAMILIES.items():
        tok = make_tokenizer(**tokens)
        tok.save_pretrained(root / name)
        save_lm(root / name, fields, len(tok) + EXTRA_ROWS.get(name, 0))
        dirs[name] = str(root / name)
    return dirs


def unified(lm_dir: str, tokenizer_dirs: dict, path: str, **overrides) -> UnifiedSystem:
    kwargs = dict(init_from=lm_dir, image_tokenizer=tokenizer_dirs[path], warmup_steps=2, ema_decay=0.0)
    system = UnifiedSystem(**{**kwargs, **overrides})
    system.configure_model()
    return system


def shapes_batch(system: UnifiedSystem, tasks: list[str], seq_len: int):
    """A packed batch of shapes-world documents, images encoded by the system's image tokenizer."""
    rng = np.random.default_rng(0)
    docs = [ShapesWorld(size=system.image_size, seed=0).document(t, rng) for t in tasks]
    with torch.no_grad():
        encoded = iter(system.image_tokenizer.encode(torch.stack([im.pixels for d in docs for im in d.images])))
    key = "codes" if system.discrete else "latents"
    docs = [Document([Image(**{key: next(encoded)}) if isinstance(s, Image) else s for s in d.segments], d.task)
            for d in docs]
    rows = next(pack_rows((system.encoder.encode(d) for d in docs), seq_len, 2))
    return collate_rows(rows, seq_len, system.text.pad_id)


def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a UnifiedModel on text ids (B, T), one causal document per row."""
    B, T = ids.shape
    mask = build_attention_mask(torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1), "sdpa")
    hidden = model(model.embed(ids), torch.arange(T).expand(B, T), mask)
    return model.logits(hidden)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_load_text_model_equals_transformers(lm_dirs, family):
    reference = AutoModelForCausalLM.from_pretrained(lm_dirs[family]).eval()
    ours = load_text_model(lm_dirs[family])
    ids = torch.randint(0, reference.config.vocab_size, (2, 48))
    expected, got = reference(ids).logits, ours(ids)
    assert got.shape == expected.shape == (2, 48, reference.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    print(f"{family}: max |logits - transformers| = {(got - expected).abs().max().item():.2e}")


def test_each_family_maps_onto_its_features(lm_dirs):
    archs = {name: read_lm_arch(folder) for name, folder in lm_dirs.items()}
    assert archs["smollm"].tied_embeddings and not archs["llama"].tied_embeddings
    assert archs["llama3"].rope_scaling["rope_type"] == "llama3" and archs["llama"].rope_scaling is None
    assert archs["qwen2"].qkv_bias and archs["qwen3"].qk_norm and archs["qwen3"].head_dim == 32
    assert archs["mistral"].max_seq_len == 256  # capped at the sliding window: within it attention is full
    gemma = archs["gemma"]
    assert gemma.norm_offset and gemma.embed_scale and gemma.mlp_act == "gelu_tanh" and gemma.tied_embeddings
    assert read_lm_arch(lm_dirs["llama"], checkpoint_activations=True).checkpoint_activations
    with pytest.raises(ValueError, match="arch overrides dim conflict with the pretrained LM's shape"):
        read_lm_arch(lm_dirs["llama"], dim=128)
    with pytest.raises(ValueError, match="max_seq_len=1024 is longer than .* handles \\(256, its sliding window\\)"):
        read_lm_arch(lm_dirs["mistral"], max_seq_len=1024)


# ------------------------------------------------------------------------------------------------ refusals
REFUSED = [
    ("gpt2", dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4),
     r"holds a gpt2 model \(learned absolute positions, LayerNorm and biased fused projections\), which anymodal "
     r"cannot reproduce exactly; supported families are llama, mistral, qwen2, qwen3, gemma"),
    ("phi", dict(model_type="phi", hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
     r"holds a phi model \(partial rotary embeddings"),
    ("yarn", dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 128}),
     r"\(llama\) uses RoPE scaling 'yarn', which anymodal's decoder does not compute; it would give different "
     r"logits, so it is refused"),
    ("attention_bias", dict(model_type="llama", attention_bias=True), r"uses a bias on the attention output projection"),
    ("mlp_bias", dict(model_type="llama", mlp_bias=True), r"uses biases in the MLP \(mlp_bias=True\)"),
    ("gelu", dict(model_type="mistral", hidden_act="gelu"), r"uses the MLP activation 'gelu'"),
]


@pytest.mark.parametrize("name, fields, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_cannot_be_reproduced_is_refused_in_one_sentence(tmp_path, name, fields, message):
    fields = dict(fields)
    AutoConfig.for_model(fields.pop("model_type"), vocab_size=64, **fields).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message) as refused:
        load_text_model(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_bad_folder_gets_one_sentence(tmp_path, lm_dirs, tokenizer_dirs):
    with pytest.raises(FileNotFoundError, match="LM folder '.*nope' does not exist; pass a local Hugging Face"):
        load_text_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json, so it is not a Hugging Face model folder"):
        load_text_model(tmp_path)
    bert = tmp_path / "bert"
    AutoConfig.for_model("bert", vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         architectures=["BertForMaskedLM"]).save_pretrained(bert)
    with pytest.raises(ValueError, match="holds BertForMaskedLM, not a causal language model"):
        load_text_model(bert)
    with pytest.raises(ValueError, match="holds no model_type, not a causal language model"):
        load_text_model(tokenizer_dirs["discrete"])  # an image tokenizer folder
    pickled = tmp_path / "pickled"
    AutoConfig.for_model("llama", vocab_size=64, **SHAPE).save_pretrained(pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds no \\*.safetensors weights \\(it holds pytorch_model.bin: pickled"):
        load_text_model(pickled)
    wrong = tmp_path / "wrong"
    AutoConfig.for_model("llama", vocab_size=64, **dict(SHAPE, hidden_size=128)).save_pretrained(wrong)
    (wrong / "model.safetensors").symlink_to(f"{lm_dirs['llama']}/model.safetensors")
    with pytest.raises(ValueError, match="the weights in .* do not match its config.json \\(.*wrong shape"):
        load_text_model(wrong)


def test_a_bad_init_from_on_the_command_line_is_one_line(tmp_path, capsys, monkeypatch, tokenizer_dirs):
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "recipes/models/liquid-shapes.yaml"),
              "--config", str(ROOT / "recipes/strategy/cpu.yaml"),
              "--model.init_args.init_from", str(tmp_path / "nope"),
              "--model.init_args.image_tokenizer", tokenizer_dirs["discrete"]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "LM folder" in err and "does not exist" in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------ the seam
@pytest.mark.parametrize("family, added", [("llama", ["<pad>", "<boi>", "<eoi>"]),
                                           ("smollm", ["<pad>", "<boi>", "<eoi>"]),
                                           ("qwen2", ["<bos>", "<pad>", "<boi>", "<eoi>"]),
                                           ("gemma", ["<boi>", "<eoi>"])])
@torch.no_grad()
def test_the_vocabulary_extension_keeps_the_lms_tokens_and_text_logits(lm_dirs, tokenizer_dirs, family, added):
    own = AutoTokenizer.from_pretrained(lm_dirs[family])
    system = unified(lm_dirs[family], tokenizer_dirs, "discrete")
    text, config = system.text, system.model_config
    assert list(text.added) == added
    assert text.eos_id == own.eos_token_id and (own.bos_token is None or text.bos_id == own.bos_token_id)
    assert text.pad_id not in (text.eos_id, text.bos_id)
    assert config.text_vocab_size == len(own) + len(added) and config.vocab_size == len(text) + 64  # + the codebook
    bos = [] if "<bos>" in added else [text.bos_id]  # the LM's own bos, or none (an added one is a new row)
    ids = torch.tensor([bos + text.encode(s)[:12] for s in (SHAPES[0], SHAPES[3])])
    reference = AutoModelForCausalLM.from_pretrained(lm_dirs[family]).eval()
    n = len(own)  # the LM's own tokens
    torch.testing.assert_close(text_logits(system.model, ids)[..., :n], reference(ids).logits[..., :n],
                               atol=1e-4, rtol=1e-4)
    weight = system.model.embed_tokens.weight
    lm_rows = reference.get_input_embeddings().weight[:n]
    new = weight[system.lm_rows.logical_not()]  # added specials and the 64 codes
    assert len(new) == len(added) + 64 and system.lm_rows[:n].all()
    spread = (new - lm_rows.mean(0)).norm(dim=1).mean() / (lm_rows - lm_rows.mean(0)).norm(dim=1).mean()
    assert 0.7 < spread < 1.3  # rows like the LM's own: around their mean, with their spread
    assert torch.cdist(new, new).add(torch.eye(len(new))).min() > 0.1 * (lm_rows - lm_rows.mean(0)).norm(dim=1).mean()


def train_two_steps(system: UnifiedSystem, seq_len: int, steps: int = 2) -> list[float]:
    batch = shapes_batch(system, ["t2i", "caption", "vqa"], seq_len)
    hp = system.hparams  # the system's own optimizer (AdamW, or Muon on the decoder blocks + AdamW)
    opt = build_optimizer(hp.optimizer, system.model, system.param_groups(), hp.lr, tuple(hp.betas), hp.weight_decay)
    if hp.new_rows_lr is not None:
        system.scale_row_steps(opt)
    losses = []
    for _ in range(steps):
        out = system.compute_losses(batch)
        opt.zero_grad()
        out.total.backward()
        system.on_after_backward()
        opt.step()
        losses.append(out.total.item())
        assert np.isfinite(losses[-1]) and (out.codes > 0) == system.discrete and (out.diffusion > 0) != system.discrete
    return losses


@pytest.mark.parametrize("path", ["discrete", "continuous"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_steps_then_an_image_and_a_caption(lm_dirs, tokenizer_dirs, tmp_path, family, path):
    size = 24 if path == "discrete" else 32  # 6x6 codes keep sampling quick; 32 px is 4x4 patches
    system = unified(lm_dirs[family], tokenizer_dirs, path, image_size=size)
    train_two_steps(system, seq_len=128)
    folder = save_bundle(tmp_path / "bundle", system.sampling_model(), system.text, system.image_tokenizer,
                         system.objective.config())
    pipe = Pipeline(load_bundle(folder, expect=path))
    (image,) = pipe.text_to_image(["a red circle at the center"], sampling=ImageSampling(steps=2))
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    (text,) = pipe.caption([torch.rand(3, size, size) * 2 - 1], sampling=TextSampling(max_new_tokens=6))
    assert isinstance(text, str)


@pytest.mark.parametrize("path", ["discrete", "continuous"])
def test_every_task_samples_on_an_hf_backbone_and_the_cache_equals_recompute(lm_dirs, tokenizer_dirs, tmp_path, path):
    size = 24 if path == "discrete" else 32
    system = unified(lm_dirs["gemma"], tokenizer_dirs, path, image_size=size)  # gemma: the most unlike Llama
    with torch.no_grad():
        if path == "continuous":  # zero-initialised: every prediction would be 0
            system.model.patch_out.weight.normal_(std=0.05)
    folder = save_bundle(tmp_path / "bundle", system.model, system.text, system.image_tokenizer,
                         system.objective.config())
    images = [torch.rand(3, size, size) * 2 - 1]
    fast, slow = Pipeline(load_bundle(folder)), Pipeline(load_bundle(folder), use_cache=False)
    sampling, text = ImageSampling(steps=2), TextSampling(max_new_tokens=4)
    for pipe in (fast, slow):
        pipe.out = (pipe.text_to_image(["a red circle"], sampling=sampling)[0],
                    pipe.edit(images, ["make it blue"], sampling=sampling)[0], pipe.answer(images, ["what?"], text)[0])
    for cached, recomputed in zip(fast.out[:2], slow.out[:2]):  # images: float rounding may move a level
        assert np.abs(cached.astype(int) - recomputed.astype(int)).max() <= 1
    assert fast.out[2] == slow.out[2]  # the answer
    story = fast.story("a red circle.", max_images=1, sampling=sampling, text_sampling=text)
    assert story[0].text == "a red circle." and len(story) >= 1


@torch.no_grad()
def snapshot(system: UnifiedSystem) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in system.model.state_dict().items()}


def test_freeze_text_trains_only_what_the_lm_lacks(lm_dirs, tokenizer_dirs):
    system = unified(lm_dirs["llama"], tokenizer_dirs, "continuous", freeze_text=True)
    before = snapshot(system)
    train_two_steps(system, seq_len=128)
    after, rows = snapshot(system), system.lm_rows
    for name in before:
        if name.startswith("decoder."):
            assert torch.equal(before[name], after[name]), name
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(before[name][rows], after[name][rows]), name  # the LM's own rows: not even decayed
        assert not torch.equal(before[name][~rows], after[name][~rows]), name  # <pad>, <boi>, <eoi>
    assert not torch.equal(before["patch_in.weight"], after["patch_in.weight"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_new_rows_lr_is_adamw_at_that_rate_for_what_the_lm_lacks(lm_dirs, tokenizer_dirs, optimizer):
    """One matrix holds both kinds of rows (qwen2: tied): after a step at lr=1e-3, new_rows_lr=3e-3, the LM's rows
    and the decoder equal a plain step at 1e-3, the new rows and the image heads a plain step at 3e-3. Under
    muon the token matrices stay with AdamW, so the same holds (and Muon steps the decoder blocks at lr)."""

    def one_step(**rates) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        system = unified(lm_dirs["qwen2"], tokenizer_dirs, "continuous", optimizer=optimizer, **rates)
        train_two_steps(system, seq_len=128, steps=1)
        return {"lm": system.lm_rows, **snapshot(system)}

    mixed, slow, fast = one_step(lr=1e-3, new_rows_lr=3e-3), one_step(lr=1e-3), one_step(lr=3e-3)
    rows, emb = mixed["lm"], "embed_tokens.weight"
    assert not torch.equal(slow[emb], fast[emb])
    torch.testing.assert_close(mixed[emb][rows], slow[emb][rows], atol=1e-7, rtol=0)
    torch.testing.assert_close(mixed[emb][~rows], fast[emb][~rows], atol=1e-7, rtol=0)
    torch.testing.assert_close(mixed["decoder.norm.weight"], slow["decoder.norm.weight"], atol=1e-7, rtol=0)
    torch.testing.assert_close(mixed["patch_out.weight"], fast["patch_out.weight"], atol=1e-7, rtol=0)
    block = next(k for k in mixed if k.startswith("decoder.layers.") and k.endswith("q_proj.weight"))
    torch.testing.assert_close(mixed[block], slow[block], atol=1e-7, rtol=0)


def test_new_arch_fields_default_to_the_native_decoder():
    arch = ArchConfig.from_name("debug")
    new = {"head_size": 0, "qkv_bias": False, "tied_embeddings": False, "mlp_act": "silu", "norm_offset": False,
           "embed_scale": False, "rope_scaling": None}
    assert {k: getattr(arch, k) for k in new} == new
    written_before = {k: v for k, v in dataclasses.asdict(arch).items() if k not in new}  # a bundle's older config
    config = ModelConfig.from_dict({"arch": written_before, "text_vocab_size": 10, "image_path": "discrete",
                                    "codebook_size": 4})
    assert config.arch == arch
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported; the decoder computes default, linear"):
        ArchConfig.from_name("debug", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="head_size=15 must be even for rotary embeddings"):
        ArchConfig.from_name("debug", head_size=15)


def test_freeze_text_and_new_rows_lr_need_an_lm(tokenizer_dirs, lm_dirs):
    with pytest.raises(ValueError, match="freeze_text and new_rows_lr need init_from"):
        UnifiedSystem(image_tokenizer=tokenizer_dirs["discrete"], size="debug", freeze_text=True)
    with pytest.raises(ValueError, match="brings its own tokenizer .* leave text_tokenizer unset"):
        UnifiedSystem(init_from=lm_dirs["llama"], text_tokenizer="tokenizers/shapes-text",
                      image_tokenizer=tokenizer_dirs["discrete"])


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("backbone", ["native", "native-qk-norm", "llama", "smollm", "qwen2", "qwen3", "gemma"])
@torch.no_grad()
def test_export_to_plain_transformers(lm_dirs, tokenizer_dirs, tmp_path, make_system, backbone):
    if backbone.startswith("native"):
        system = make_system("discrete", arch={"qk_norm": backbone == "native-qk-norm"})
    else:
        system = unified(lm_dirs[backbone], tokenizer_dirs, "discrete")
    for p in system.model.parameters():  # away from the init, so that a dropped weight would show
        p.add_(0.02 * torch.randn_like(p))
    bundle = save_bundle(tmp_path / "bundle", system.model, system.text, system.image_tokenizer, None)
    main(["export", "--checkpoint", str(bundle), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = system.model_config
    assert {"<boi>", "<eoi>"} <= set(tok.get_vocab()) and tok.convert_tokens_to_ids("<boi>") == system.text.boi_id
    assert hf.config.vocab_size == config.vocab_size and (tmp_path / "hf/image_tokenizer/model.safetensors").is_file()
    codes = torch.randint(config.code_offset, config.vocab_size, (2, 20))
    text = [tok(t, add_special_tokens=False).input_ids[:4] for t in (SHAPES[0], SHAPES[3])]
    ids = torch.cat([torch.tensor(text), codes], 1)  # (2, 24): text, then image codes
    torch.testing.assert_close(hf(ids).logits, text_logits(system.model.eval(), ids), atol=1e-4, rtol=1e-4)
    loaded = load_bundle(tmp_path / "hf", expect="discrete")
    torch.testing.assert_close(text_logits(loaded.model, ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_generate_samples_from_an_exported_folder(tmp_path, make_system):
    system = make_system("discrete")
    bundle = save_bundle(tmp_path / "bundle", system.model, system.text, system.image_tokenizer, None)
    export_hf(bundle, tmp_path / "hf")
    main(["generate", "t2i", "--checkpoint", str(tmp_path / "hf"), "--prompt", "a red circle at the center",
          "--out", str(tmp_path / "out")])
    assert (tmp_path / "out/0000.png").is_file()


def test_continuous_models_do_not_export_to_hf(tmp_path, make_system):
    system = make_system("continuous")
    bundle = save_bundle(tmp_path / "bundle", system.model, system.text, system.image_tokenizer,
                         system.objective.config())
    with pytest.raises(BundleError, match="continuous-path model: transformers has no class for its diffusion head"):
        export_hf(bundle, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ end to end
def test_text_lm_then_a_two_step_liquid_fit_then_export(tmp_path, tokenizer_dirs, monkeypatch):
    """`anymodal text-lm` makes an LM folder; the Liquid recipe starts from it through the CLI; the run's checkpoint
    exports to a folder plain transformers runs."""
    lm = tmp_path / "lm"
    main(["text-lm", "--out", str(lm), "--size", "debug", "--steps", "2", "--seq-len", "128", "--batch-size", "2"])
    with torch.no_grad():
        ids = torch.randint(0, 300, (1, 30))
        torch.testing.assert_close(load_text_model(lm)(ids), AutoModelForCausalLM.from_pretrained(lm)(ids).logits,
                                   atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(sys, "argv", ["anymodal"])
    main(["fit", "--config", str(ROOT / "recipes/models/liquid-shapes.yaml"),
          "--config", str(ROOT / "recipes/strategy/cpu.yaml"),
          "--model.init_args.init_from", str(lm), "--model.init_args.image_tokenizer", tokenizer_dirs["discrete"],
          "--model.init_args.new_rows_lr", "3e-3", "--data.init_args.batch_size", "2",
          "--trainer.max_steps=2", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.log_every_n_steps=1",
          "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                              "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2}}]),
          "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
          "--trainer.num_sanity_val_steps=0"])
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert len(losses) == 2 and np.isfinite(losses).all()
    (ckpt,) = tmp_path.glob("ckpt/*.ckpt")
    main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    bundle = load_bundle(tmp_path / "hf")
    ids = torch.tensor([[bundle.text.bos_id, bundle.text.boi_id, bundle.config.code_offset + 5]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits,
                                   text_logits(bundle.model, ids), atol=1e-4, rtol=1e-4)
