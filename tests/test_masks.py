"""The attention rule: mask_mod's dense mask against a loop-over-spans reference; flex against SDPA."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from anymodal.masks import AttentionMask, block_mask, build_attention_mask, dense_mask, resolve_backend

TEXT, DISCRETE, CONTINUOUS, HIDDEN = "text", "discrete", "continuous", "hidden"


def random_layout(rng: random.Random, length: int) -> list[list[tuple[str, int]]]:
    """Documents, each a list of (kind, length) segments, fitting in `length` tokens (the rest is padding)."""
    docs, used = [], 0
    for _ in range(rng.randint(1, 3)):
        doc = []
        for _ in range(rng.randint(1, 5)):
            kind = rng.choice([TEXT, TEXT, DISCRETE, CONTINUOUS, CONTINUOUS, HIDDEN])
            n = rng.randint(1, 6)
            if used + n > length:
                break
            doc.append((kind, n))
            used += n
        if doc:
            docs.append(doc)
    return docs


def reference_mask(docs: list[list[tuple[str, int]]], length: int) -> torch.Tensor:
    """(T, T) bool from the spans with plain loops: which key each query may see."""
    doc_span, image_span, hidden = [None] * length, [None] * length, [False] * length
    start = 0
    for doc in docs:
        doc_start = start
        doc_end = doc_start + sum(n for _, n in doc)
        for kind, n in doc:
            for t in range(start, start + n):
                doc_span[t] = (doc_start, doc_end)
                if kind in (CONTINUOUS, HIDDEN):
                    image_span[t] = (start, start + n)
                    hidden[t] = kind == HIDDEN
            start += n
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            if doc_span[q] != doc_span[k]:  # padding (None) only meets padding
                continue
            in_same_image = image_span[q] is not None and image_span[q] == image_span[k]
            allowed[q, k] = in_same_image or (k <= q and not hidden[k])
    return allowed


def ids_from_layout(docs, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Tk,) document ids (-1 on padding) and image ids (>= 0 visible, <= -2 hidden, -1 elsewhere)."""
    document_ids = torch.full((length,), -1, dtype=torch.long)
    continuous_ids = torch.full((length,), -1, dtype=torch.long)
    start, image = 0, 0
    for d, doc in enumerate(docs):
        for kind, n in doc:
            document_ids[start : start + n] = d
            if kind == CONTINUOUS:
                continuous_ids[start : start + n] = image
            elif kind == HIDDEN:
                continuous_ids[start : start + n] = -(2 + image)
            image += kind in (CONTINUOUS, HIDDEN)
            start += n
    return document_ids, continuous_ids


def test_dense_mask_matches_reference_on_random_layouts():
    rng = random.Random(0)
    checked = 0
    for _ in range(30):
        length = rng.randint(4, 40)
        layouts = [random_layout(rng, length) for _ in range(8)]
        ids = [ids_from_layout(docs, length) for docs in layouts]
        document_ids = torch.stack([d for d, _ in ids])  # (8, T)
        continuous_ids = torch.stack([i for _, i in ids])
        mask = dense_mask(document_ids, continuous_ids)  # (8, 1, T, T)
        assert mask.shape == (8, 1, length, length) and mask.dtype == torch.bool
        for row, docs in enumerate(layouts):
            expected = reference_mask(docs, length)
            assert torch.equal(mask[row, 0], expected), docs
            assert mask[row, 0].any(dim=-1).all(), "every query row must see at least one key"
            checked += 1
    assert checked >= 200


def test_dense_mask_equals_create_mask_of_the_same_mask_mod():
    from torch.nn.attention.flex_attention import create_mask

    from anymodal.masks import mask_mod

    rng = random.Random(1)
    for _ in range(10):
        length = rng.randint(4, 40)
        ids = [ids_from_layout(random_layout(rng, length), length) for _ in range(4)]
        document_ids = torch.stack([d for d, _ in ids])
        continuous_ids = torch.stack([i for _, i in ids])
        for q_offset in (0, length // 2):
            q_len = length - q_offset
            expected = create_mask(mask_mod(document_ids, continuous_ids, q_offset), 4, 1, q_len, length, device="cpu")
            assert torch.equal(dense_mask(document_ids, continuous_ids, q_offset=q_offset), expected)


@pytest.mark.parametrize(
    "docs",
    [
        [[(TEXT, 7)]],  # text only
        [[(CONTINUOUS, 4), (TEXT, 3)]],  # image at the start
        [[(TEXT, 2), (CONTINUOUS, 4), (TEXT, 2)]],  # in the middle
        [[(TEXT, 3), (CONTINUOUS, 5)]],  # at the end
        [[(TEXT, 1), (CONTINUOUS, 3), (CONTINUOUS, 3), (TEXT, 1)]],  # two adjacent images
        [[(TEXT, 2), (DISCRETE, 4), (TEXT, 2)]],  # discrete codes are causal
        [[(TEXT, 2), (CONTINUOUS, 3)], [(CONTINUOUS, 2), (TEXT, 2)]],  # packed documents
        [[(TEXT, 2), (HIDDEN, 3), (CONTINUOUS, 3), (TEXT, 2)]],  # noised copy, then the clean one
    ],
)
def test_named_layouts(docs):
    length = sum(n for doc in docs for _, n in doc) + 2  # two pad tokens
    document_ids, continuous_ids = ids_from_layout(docs, length)
    mask = dense_mask(document_ids[None], continuous_ids[None])[0, 0]
    assert torch.equal(mask, reference_mask(docs, length))


def test_spot_checks_of_the_rule():
    # text(2) | continuous image(3) | discrete(2) | pad(1)
    docs = [[(TEXT, 2), (CONTINUOUS, 3), (DISCRETE, 2)]]
    document_ids, continuous_ids = ids_from_layout(docs, 8)
    mask = dense_mask(document_ids[None], continuous_ids[None])[0, 0]
    assert mask[2, 4] and mask[4, 2]  # patches see each other both ways
    assert not mask[1, 2]  # text does not see the image ahead
    assert mask[5, 4] and not mask[5, 6]  # discrete codes: causal
    assert not mask[7, 6] and mask[7, 7]  # padding sees only padding
    assert not mask[6, 7]  # and nobody sees it


def test_suffix_queries_equal_rows_of_the_full_mask():
    rng = random.Random(1)
    for _ in range(10):
        length = rng.randint(6, 30)
        ids = [ids_from_layout(random_layout(rng, length), length) for _ in range(3)]
        document_ids = torch.stack([d for d, _ in ids])
        continuous_ids = torch.stack([i for _, i in ids])
        full = dense_mask(document_ids, continuous_ids)
        offset = rng.randint(0, length - 1)
        assert torch.equal(dense_mask(document_ids, continuous_ids, q_offset=offset), full[:, :, offset:])
        q_len = rng.randint(1, length - offset)
        part = dense_mask(document_ids, continuous_ids, q_len=q_len, q_offset=offset)
        assert torch.equal(part, full[:, :, offset : offset + q_len])


def test_bad_inputs_give_clear_errors():
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="must lie within"):
        dense_mask(ids, ids, q_len=3, q_offset=4)
    with pytest.raises(ValueError, match="must both be"):
        dense_mask(ids, ids[:, :4])
    with pytest.raises(ValueError, match="exactly one"):
        AttentionMask()
    with pytest.raises(ValueError, match="auto, sdpa, flex"):
        resolve_backend("xformers", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"


def _flex_vs_sdpa(document_ids, continuous_ids, q_offset, device="cpu", dtype=torch.float32):
    B, Tk = document_ids.shape
    Tq = Tk - q_offset
    q = torch.randn(B, 4, Tq, 16, device=device, dtype=dtype)
    k, v = torch.randn(2, B, 2, Tk, 16, device=device, dtype=dtype)  # GQA: 2 key/value heads
    flex = build_attention_mask(document_ids, continuous_ids, "flex", q_offset=q_offset)
    sdpa = build_attention_mask(document_ids, continuous_ids, "sdpa", q_offset=q_offset)
    assert (flex.q_len, flex.kv_len) == (sdpa.q_len, sdpa.kv_len) == (Tq, Tk)
    with torch.no_grad():
        out_flex = flex_attention(q, k, v, block_mask=flex.block, enable_gqa=True)
        out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa.dense, enable_gqa=True)
    return out_flex, out_sdpa


PACKED_LENGTH = 150  # not a multiple of flex's 128 block size, and with padding at the end of both rows


def packed_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """document_ids, continuous_ids (2, PACKED_LENGTH) of two packed rows holding every kind of segment."""
    docs = [
        [[(TEXT, 30), (CONTINUOUS, 40), (TEXT, 20)], [(TEXT, 10), (HIDDEN, 16), (CONTINUOUS, 16), (TEXT, 5)]],
        [[(TEXT, 5), (DISCRETE, 64), (TEXT, 20), (CONTINUOUS, 36)], [(TEXT, 10)]],
    ]
    ids = [ids_from_layout(row, PACKED_LENGTH) for row in docs]
    return torch.stack([d for d, _ in ids]), torch.stack([i for _, i in ids])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_agrees_with_sdpa_on_the_dense_mask():
    document_ids, continuous_ids = packed_ids()
    for q_offset in (0, 100):
        out_flex, out_sdpa = _flex_vs_sdpa(document_ids, continuous_ids, q_offset)
        torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)


def test_matmul_attention_agrees_with_sdpa_forward_and_backward():
    from anymodal.nn.attention import matmul_attention

    document_ids, continuous_ids = packed_ids()
    length = PACKED_LENGTH
    for q_offset in (0, 100):
        mask = dense_mask(document_ids, continuous_ids, q_offset=q_offset)
        gen = torch.Generator().manual_seed(q_offset)
        q = torch.randn(2, 3, length - q_offset, 16, generator=gen, requires_grad=True)
        k, v = (torch.randn(2, 3, length, 16, generator=gen, requires_grad=True) for _ in range(2))
        grad = torch.randn(2, 3, length - q_offset, 16, generator=gen)
        outs = []
        for attend in (matmul_attention, lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)):
            out = attend(q, k, v, mask)
            outs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
        for mine, sdpa in zip(*outs):
            torch.testing.assert_close(mine, sdpa, atol=1e-5, rtol=1e-5)


def test_the_dense_kernel_is_chosen_by_backend_device_dtype_and_grad():
    from anymodal.nn.attention import use_matmul_attention

    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert use_matmul_attention("auto", bf16)  # training in bf16 on a CPU: matmuls
    assert not use_matmul_attention("auto", fp32)  # fp32: SDPA's kernel is faster
    assert not use_matmul_attention("sdpa", bf16)
    assert use_matmul_attention("matmul", fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's bf16-mixed: q may stay fp32 after RoPE
        assert use_matmul_attention("auto", fp32)
    with torch.no_grad():  # sampling: the forward alone gains nothing
        assert not use_matmul_attention("auto", bf16)
    assert resolve_backend("matmul", "cpu") == "sdpa"  # its mask is the dense one


@pytest.mark.gpu
def test_block_mask_on_cuda_agrees_with_dense_in_bf16():
    rng = random.Random(2)
    length = 384
    ids = [ids_from_layout(random_layout(rng, length // 8) * 8, length) for _ in range(2)]
    document_ids = torch.stack([d for d, _ in ids]).cuda()
    continuous_ids = torch.stack([i for _, i in ids]).cuda()
    assert block_mask(document_ids, continuous_ids).shape[-2:] == (length, length)
    out_flex, out_sdpa = _flex_vs_sdpa(document_ids, continuous_ids, 0, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(out_flex.float(), out_sdpa.float(), atol=2e-2, rtol=2e-2)
