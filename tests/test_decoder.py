"""The native decoder: who influences whom, packed documents, KV cache = recompute, variants, checkpointing."""

import pytest
import torch

from anymodal.config import ArchConfig
from anymodal.masks import build_attention_mask
from anymodal.model.cache import KVCache
from anymodal.model.decoder import Decoder
from anymodal.nn.embeddings import TimestepEmbedder, patchify, unpatchify
from anymodal.nn.rope import RotaryEmbedding, apply_rotary

# One document: text(4) | continuous image(6) | text(3) | discrete image(4) | text(3)  -> T = 20
IMAGE = slice(4, 10)
T = 20


def layout(batch: int = 1):
    """document_ids, continuous_ids, positions: (B, T) int64 of the layout above."""
    document_ids = torch.zeros(batch, T, dtype=torch.long)
    continuous_ids = torch.full((batch, T), -1, dtype=torch.long)
    continuous_ids[:, IMAGE] = 0
    positions = torch.arange(T).expand(batch, T)
    return document_ids, continuous_ids, positions


def run(decoder, h, document_ids, continuous_ids, positions, **kwargs):
    mask = build_attention_mask(document_ids, continuous_ids, "sdpa")
    return decoder(h, positions, mask, **kwargs)


@pytest.fixture
def decoder():
    return Decoder(ArchConfig.from_name("debug")).eval()


@torch.no_grad()
def test_later_tokens_never_change_earlier_outputs(decoder):
    ids = layout()
    h = torch.randn(1, T, 64)
    base = run(decoder, h, *ids)
    for j in (3, 12, 15, 19):  # text before the image, text after it, a discrete code, the last token
        changed = h.clone()
        changed[:, j] += 1.0
        out = run(decoder, changed, *ids)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, j], base[:, j])


@torch.no_grad()
def test_one_patch_changes_every_patch_of_its_image_and_nothing_before_it(decoder):
    ids = layout()
    h = torch.randn(1, T, 64)
    base = run(decoder, h, *ids)
    changed = h.clone()
    changed[:, 8] += 1.0  # a late patch of the image
    out = run(decoder, changed, *ids)
    torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-6, rtol=0)  # text before the image
    for patch in range(4, 10):
        assert (out[0, patch] - base[0, patch]).abs().max() > 1e-4, f"patch {patch} did not see patch 8"


@torch.no_grad()
def test_packed_documents_are_independent(decoder):
    # row: doc A (7) | doc B (9, with an image) | padding (4)
    document_ids = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 4])
    continuous_ids = torch.full((1, 20), -1)
    continuous_ids[0, 9:13] = 3
    positions = torch.tensor([list(range(7)) + list(range(9)) + [0] * 4])
    h = torch.randn(1, 20, 64)
    packed = run(decoder, h, document_ids, continuous_ids, positions)
    for span in (slice(0, 7), slice(7, 16)):
        alone = run(decoder, h[:, span], document_ids[:, span], continuous_ids[:, span], positions[:, span])
        torch.testing.assert_close(packed[:, span], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed).all()  # padding rows see themselves, no NaN


@torch.no_grad()
def test_prefill_then_token_by_token_equals_full_recompute(decoder):
    document_ids, continuous_ids, positions = layout(batch=2)
    h = torch.randn(2, T, 64)
    full = run(decoder, h, document_ids, continuous_ids, positions)
    cache = decoder.new_cache()
    # prefill the text before the image, write the image as one block, then one token at a time
    steps = [slice(0, 4), IMAGE] + [slice(t, t + 1) for t in range(10, T)]
    for step in steps:
        mask = build_attention_mask(
            document_ids[:, : step.stop], continuous_ids[:, : step.stop], "sdpa", q_offset=step.start
        )
        out = decoder(h[:, step], positions[:, step], mask, cache=cache)
        torch.testing.assert_close(out, full[:, step], atol=1e-5, rtol=1e-5)
    assert cache.length == T and cache.keys(0).shape == (2, 2, T, 16)


@torch.no_grad()
def test_peek_leaves_the_cache_unchanged_and_equals_recompute(decoder):
    document_ids, continuous_ids, positions = layout()
    cache = decoder.new_cache()
    prefix = torch.randn(1, 4, 64)
    mask = build_attention_mask(document_ids[:, :4], continuous_ids[:, :4], "sdpa")
    decoder(prefix, positions[:, :4], mask, cache=cache)
    keys, values = cache.keys(1).clone(), cache.values(1).clone()
    image_mask = build_attention_mask(document_ids[:, :10], continuous_ids[:, :10], "sdpa", q_offset=4)
    for _ in range(3):  # three "denoising steps": new patch inputs, same positions
        patches = torch.randn(1, 6, 64)
        out = decoder(patches, positions[:, IMAGE], image_mask, cache=cache, write_cache=False)
        full = run(
            decoder,
            torch.cat([prefix, patches], 1),
            document_ids[:, :10],
            continuous_ids[:, :10],
            positions[:, :10],
        )
        torch.testing.assert_close(out, full[:, IMAGE], atol=1e-5, rtol=1e-5)
        assert cache.length == 4
        assert torch.equal(cache.keys(1), keys) and torch.equal(cache.values(1), values)
    with pytest.raises(ValueError, match="q_offset=4"):
        decoder(
            patches,
            positions[:, IMAGE],
            build_attention_mask(document_ids[:, :6], continuous_ids[:, :6], "sdpa"),
            cache=cache,
        )


@torch.no_grad()
def test_cache_batch_helpers_and_crop(decoder):
    document_ids, continuous_ids, positions = layout(batch=2)
    h = torch.randn(1, T, 64)
    cache = decoder.new_cache()
    decoder(
        h[:, :12],
        positions[:1, :12],
        build_attention_mask(document_ids[:1, :12], continuous_ids[:1, :12], "sdpa"),
        cache=cache,
    )
    doubled = cache.repeat_batch(2)
    assert doubled.batch_size == 2 and doubled.length == 12
    step = build_attention_mask(document_ids[:, :13], continuous_ids[:, :13], "sdpa", q_offset=12)
    out = decoder(h[:, 12:13].expand(2, 1, 64), positions[:, 12:13], step, cache=doubled)
    full = run(decoder, h[:, :13], document_ids[:1, :13], continuous_ids[:1, :13], positions[:1, :13])
    torch.testing.assert_close(out, full[:, 12:].expand(2, 1, 64), atol=1e-5, rtol=1e-5)
    second = doubled.index_select(torch.tensor([1]))
    assert second.batch_size == 1 and second.length == 13
    second.crop(12)  # back to the prefix: the same token again gives the same output
    step = build_attention_mask(document_ids[:1, :13], continuous_ids[:1, :13], "sdpa", q_offset=12)
    out = decoder(h[:, 12:13], positions[:1, 12:13], step, cache=second)
    torch.testing.assert_close(out, full[:, 12:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot crop"):
        second.crop(20)
    with pytest.raises(ValueError, match="do not fit the cache"):  # a batch of 2 against a cache of 1
        decoder(
            h[:, 13:14].expand(2, 1, 64),
            positions[:, 13:14],
            build_attention_mask(document_ids[:, :14], continuous_ids[:, :14], "sdpa", q_offset=13),
            cache=second,
        )


@pytest.mark.parametrize("overrides", [{"n_kv_heads": 1}, {"n_kv_heads": 4}, {"qk_norm": True}])
@torch.no_grad()
def test_variants_run_and_cache_still_equals_recompute(overrides):
    decoder = Decoder(ArchConfig.from_name("debug", **overrides)).eval()
    document_ids, continuous_ids, positions = layout()
    h = torch.randn(1, T, 64)
    full = run(decoder, h, document_ids, continuous_ids, positions)
    assert full.shape == (1, T, 64) and torch.isfinite(full).all()
    cache = KVCache(decoder.config.n_layers)
    decoder(
        h[:, :10],
        positions[:, :10],
        build_attention_mask(document_ids[:, :10], continuous_ids[:, :10], "sdpa"),
        cache=cache,
    )
    mask = build_attention_mask(document_ids, continuous_ids, "sdpa", q_offset=10)
    torch.testing.assert_close(
        decoder(h[:, 10:], positions[:, 10:], mask, cache=cache), full[:, 10:], atol=1e-5, rtol=1e-5
    )


def test_activation_checkpointing_gives_the_same_gradients():
    plain = Decoder(ArchConfig.from_name("debug")).train()
    checkpointed = Decoder(ArchConfig.from_name("debug", checkpoint_activations=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    ids = layout(batch=2)
    h = torch.randn(2, T, 64)
    grads = []
    for model in (plain, checkpointed):
        x = h.clone().requires_grad_()
        run(model, x, *ids).square().mean().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_init_scales_residual_projections():
    decoder = Decoder(ArchConfig.from_name("debug", n_layers=8, dim=256, n_heads=4))
    q_std = decoder.layers[0].self_attn.q_proj.weight.std().item()
    o_std = decoder.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 2e-3 and abs(o_std - 0.02 / 4) < 1e-3


def test_rope_is_relative_and_matches_rotate_half_convention():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(2, 1, 1, 1, 16)
    positions = torch.tensor([[3, 7], [10, 14]])  # same distance 4 in both rows
    cos, sin = rope(positions)  # (2, 2, 16)
    score = [
        (
            apply_rotary(q, cos[r, None, :1], sin[r, None, :1])
            * apply_rotary(k, cos[r, None, 1:], sin[r, None, 1:])
        ).sum()
        for r in range(2)
    ]
    torch.testing.assert_close(score[0], score[1])
    cos0, sin0 = rope(torch.zeros(1, 1, dtype=torch.long))
    assert torch.equal(cos0, torch.ones(1, 1, 16)) and torch.equal(sin0, torch.zeros(1, 1, 16))


def test_patchify_round_trip_and_timestep_embedding():
    latents = torch.randn(3, 4, 8, 12)  # (N, C, h, w)
    patches = patchify(latents, 2)
    assert patches.shape == (3, 4 * 6, 4 * 2 * 2)
    torch.testing.assert_close(patches[0, 1], latents[0, :, 0:2, 2:4].reshape(-1))  # row-major patch grid
    assert torch.equal(unpatchify(patches, 2, 8, 12), latents)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        patchify(latents, 5)
    with pytest.raises(ValueError, match="do not tile"):
        unpatchify(patches, 2, 8, 8)
    emb = TimestepEmbedder(64)(torch.tensor([0.0, 0.5, 1.0]))
    assert emb.shape == (3, 64) and not torch.allclose(emb[0], emb[2])


@pytest.mark.gpu
@torch.no_grad()
def test_flex_backend_on_cuda_matches_sdpa_and_caches():
    decoder = Decoder(ArchConfig.from_name("debug")).cuda().eval()
    document_ids, continuous_ids, positions = (t.cuda() for t in layout(batch=2))
    h = torch.randn(2, T, 64, device="cuda")
    sdpa = decoder(h, positions, build_attention_mask(document_ids, continuous_ids, "sdpa"))
    flex = decoder(h, positions, build_attention_mask(document_ids, continuous_ids, "auto"))
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-4)
    cache = decoder.new_cache()
    decoder(
        h[:, :10],
        positions[:, :10],
        build_attention_mask(document_ids[:, :10], continuous_ids[:, :10], "flex"),
        cache=cache,
    )
    for t in range(10, T):
        mask = build_attention_mask(document_ids[:, : t + 1], continuous_ids[:, : t + 1], "flex", q_offset=t)
        out = decoder(h[:, t : t + 1], positions[:, t : t + 1], mask, cache=cache)
        torch.testing.assert_close(out, sdpa[:, t : t + 1], atol=1e-4, rtol=1e-4)
    bf16 = decoder.to(torch.bfloat16)(
        h.bfloat16(), positions, build_attention_mask(document_ids, continuous_ids, "flex")
    )
    torch.testing.assert_close(bf16.float(), sdpa, atol=0.1, rtol=0.1)
