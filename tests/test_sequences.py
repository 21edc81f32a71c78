"""Documents -> encoded sequences -> packed Batches: image frames, loss masks, the clean/noised policy,
packing with per-document positions, guidance dropout, code filling, and the resumable stream."""

import itertools
import random

import numpy as np
import pytest
import torch
from conftest import TEXT_TOKENIZER

from anymodal.batch import (
    CONTINUOUS_IMAGE,
    DISCRETE_IMAGE,
    DOCUMENT,
    IGNORE,
    NO_SPAN,
    PAD_DOCUMENT,
    Batch,
    derive_indices,
)
from anymodal.data.datamodule import UnifiedDataModule
from anymodal.data.document import TASKS, Document, Image, Text
from anymodal.data.packing import collate_rows, pack_rows, padding_share
from anymodal.data.sequence import SequenceEncoder, drop_conditions, generated_images
from anymodal.data.shapes import ShapesWorld
from anymodal.data.stream import PackedBatches
from anymodal.layout import build_layout
from anymodal.tokenizers.text import load_text_tokenizer

SLOTS = 4
KIND = {"discrete": DISCRETE_IMAGE, "continuous": CONTINUOUS_IMAGE}


@pytest.fixture(scope="module")
def text():
    return load_text_tokenizer(TEXT_TOKENIZER)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(size=32, seed=0)


def documents(world: ShapesWorld, tasks=TASKS, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [world.document(task, rng) for task in tasks]


def frames(tokens: list[int], text) -> list[tuple[int, int]]:
    """(boi index, eoi index) of every image frame."""
    bois = [i for i, t in enumerate(tokens) if t == text.boi_id]
    eois = [i for i, t in enumerate(tokens) if t == text.eoi_id]
    assert len(bois) == len(eois)
    return list(zip(bois, eois))


@pytest.mark.parametrize("path", ["discrete", "continuous"])
def test_every_task_is_framed_and_masked(text, world, path):
    enc = SequenceEncoder(text, path, SLOTS)
    for doc in documents(world):
        e = enc.encode(doc)
        toks, mask = e.tokens, e.loss_mask
        assert len(mask) == len(toks) and toks[0] == text.bos_id and toks[-1] == text.eos_id and not mask[-1]
        assert text.decode(toks) == "".join(t.text for t in doc.texts)
        generated = generated_images(doc)
        assert len(frames(toks, text)) == len(doc.images) == len(generated)
        for (boi, eoi), image, target in zip(frames(toks, text), doc.images, generated):
            inside = [(s, im) for s, im in zip(e.spans, e.images) if boi < s[1] < eoi]
            assert inside and all(im is image for _, im in inside), doc.task
            assert all(kind == KIND[path] and length == SLOTS for (kind, _, length), _ in inside)
            # the slots fill the frame exactly: <boi> slots... <eoi>
            assert inside[0][0][1] == boi + 1 and sum(s[2] for s, _ in inside) == eoi - boi - 1
            assert all(t == text.pad_id for t in toks[boi + 1:eoi])
            if path == "discrete":  # codes are trained (from <boi> on) exactly when the image is generated
                assert all(m == target for m in mask[boi:eoi - 1]), doc.task
                assert mask[eoi - 1]  # the last code predicts <eoi>
            else:  # no cross-entropy at or into continuous slots
                assert not any(mask[boi:eoi]), doc.task
            assert mask[boi - 1]  # <boi> itself is predicted
            assert eoi == len(toks) - 1 or mask[eoi]  # what follows <eoi> is predicted
        slots = {p for kind, off, length in e.spans for p in range(off, off + length)}
        assert all(mask[i] for i in range(len(toks) - 1) if i not in slots and i + 1 not in slots), doc.task
        # targets: next token where trained, IGNORE everywhere else
        batch = collate_rows([[e]], len(e), text.pad_id)
        targets = batch.targets[0].tolist()
        assert targets == [toks[i + 1] if mask[i] else IGNORE for i in range(len(toks) - 1)] + [IGNORE]


def test_generated_images_per_task(world):
    docs = {d.task: d for d in documents(world)}
    assert generated_images(docs["t2i"]) == [True]
    assert generated_images(docs["edit"]) == [False, True]
    assert generated_images(docs["caption"]) == generated_images(docs["vqa"]) == [False]
    assert generated_images(docs["story"]) == [True] * len(docs["story"].images)
    assert generated_images(docs["text"]) == []


def test_context_images_can_be_trained(text, world):
    caption = documents(world, ["caption"])[0]
    boi = 1
    plain = SequenceEncoder(text, "discrete", SLOTS).encode(caption)
    trained = SequenceEncoder(text, "discrete", SLOTS, train_context_images=True).encode(caption)
    assert not any(plain.loss_mask[boi:boi + SLOTS]) and all(trained.loss_mask[boi:boi + SLOTS])
    cont = SequenceEncoder(text, "continuous", SLOTS, train_context_images=True).encode(caption)
    assert cont.noised == [True, False] and not any(cont.loss_mask[boi:boi + 2 * SLOTS + 1])


def test_story_images_get_a_hidden_noised_copy_and_a_clean_copy(text, world):
    story = next(d for d in documents(world, ["story"] * 4) if len(d.images) >= 3)
    n = len(story.images)
    e = SequenceEncoder(text, "continuous", SLOTS, context_policy="clean_and_noised").encode(story)
    # every image is context for what follows it (the last one for <eos>, which sampling reads after the clean
    # image): noised (hidden) copy, then clean (visible) copy
    assert len(e.spans) == 2 * n
    assert e.noised == [True, False] * n
    assert e.visible == [False, True] * n
    assert e.tokens[-2:] == [text.eoi_id, text.eos_id] and e.loss_mask[-2]  # <eos> trained after the clean copy
    for i in range(n):
        (_, off_noised, length), (_, off_clean, _) = e.spans[2 * i], e.spans[2 * i + 1]
        assert e.images[2 * i] is e.images[2 * i + 1] is story.images[i]
        assert off_clean == off_noised + length  # adjacent, inside one frame
        assert e.tokens[off_noised - 1] == text.boi_id and e.tokens[off_clean + length] == text.eoi_id
    shared = SequenceEncoder(text, "continuous", SLOTS, context_policy="shared").encode(story)
    assert len(shared.spans) == n and shared.noised == [True] * n and shared.visible == [True] * n
    assert len(e) - len(shared) == n * SLOTS
    # an image at the end (t2i) or only conditioning (edit source) never gets a second copy
    t2i, edit = documents(world, ["t2i", "edit"])
    assert (e := SequenceEncoder(text, "continuous", SLOTS).encode(t2i)).noised == [True] and e.visible == [True]
    e = SequenceEncoder(text, "continuous", SLOTS).encode(edit)
    assert e.noised == [False, True] and e.visible == [True, True]
    d = SequenceEncoder(text, "discrete", SLOTS).encode(story)
    assert len(d.spans) == n and not any(d.noised) and all(d.visible)


def test_hidden_copies_share_the_clean_copys_positions(text, world):
    """Training positions equal the sampling layout: the noised copy does not shift later tokens."""
    story = next(d for d in documents(world, ["story"] * 4) if len(d.images) >= 3)
    both = SequenceEncoder(text, "continuous", SLOTS, context_policy="clean_and_noised").encode(story)
    shared = SequenceEncoder(text, "continuous", SLOTS, context_policy="shared").encode(story)
    pos = derive_indices(collate_rows([[both]], len(both), text.pad_id)).positions[0]
    hidden = torch.zeros(len(both), dtype=torch.bool)
    for (_, off, length), visible in zip(both.spans, both.visible):
        if not visible:
            hidden[off:off + length] = True
            assert torch.equal(pos[off:off + length], pos[off + length:off + 2 * length])
    assert torch.equal(pos[~hidden], torch.arange(len(shared)))


def test_encoder_rejects_unknown_path_and_policy(text):
    with pytest.raises(ValueError, match="image_path="):
        SequenceEncoder(text, "pixels", SLOTS)
    with pytest.raises(ValueError, match="context_policy="):
        SequenceEncoder(text, "continuous", SLOTS, context_policy="noised")


def test_prompt_encoding_keeps_images_clean(text, world):
    story = documents(world, ["story"])[0]
    p = SequenceEncoder(text, "continuous", SLOTS).encode_prompt(story)
    assert len(p.spans) == len(story.images) and not any(p.noised) and all(p.visible)
    assert p.tokens[-1] == text.eoi_id


def test_packing_puts_whole_documents_in_rows_with_their_own_positions(text, world):
    enc = SequenceEncoder(text, "continuous", SLOTS)
    docs = [enc.encode(d) for d in documents(world, TASKS * 3, seed=1)]
    seq_len, rows = 96, 3
    batches = list(pack_rows(iter(docs), seq_len, rows))
    flat = [d for batch in batches for row in batch for d in row]
    assert [id(d) for d in flat] == [id(d) for d in docs]  # in order, none split, none lost
    assert all(len(batch) == rows for batch in batches[:-1])
    assert all(sum(len(d) for d in row) <= seq_len for batch in batches for row in batch)
    assert any(len(row) > 1 for batch in batches for row in batch)
    batch_rows = batches[0]
    batch = collate_rows(batch_rows, seq_len, text.pad_id)
    idx = derive_indices(batch)
    images = []
    for r, row in enumerate(batch_rows):
        doc_spans = [s for s in batch.spans[r].tolist() if s[0] == DOCUMENT]
        off = 0
        for k, (d, (_, start, length)) in enumerate(zip(row, doc_spans)):
            assert (start, length) == (off, len(d))
            assert batch.tokens[r, off:off + length].tolist() == d.tokens
            assert batch.loss_mask[r, off:off + length].tolist() == d.loss_mask
            hidden = torch.zeros(length, dtype=torch.bool)  # noised copies share the clean copy's positions
            for (_, o, n), visible in zip(d.spans, d.visible):
                hidden[o:o + n] = not visible
            assert idx.positions[r, off:off + length][~hidden].tolist() == list(range(int((~hidden).sum())))
            assert (idx.document_ids[r, off:off + length] == k).all()
            off += length
            images += d.images
        assert len(doc_spans) == len(row)
        assert (idx.document_ids[r, off:] == PAD_DOCUMENT).all() and (idx.positions[r, off:] == 0).all()
        assert (batch.tokens[r, off:] == text.pad_id).all() and not batch.loss_mask[r, off:].any()
        assert (batch.targets[r, off - 1:] == IGNORE).all()
    # image spans index the stacked images in row-major order, and their slots carry that index
    assert batch.image_kind == "pixels" and batch.num_images == len(images)
    assert all(torch.equal(batch.images[i], im.pixels) for i, im in enumerate(images))
    for r, off, length, i in batch.image_slots(CONTINUOUS_IMAGE):
        expected = i if batch.visible[i] else -(2 + i)
        assert (idx.continuous_ids[r, off:off + length] == expected).all()
    assert set(batch.spans[batch.image_index < 0][:, 0].tolist()) <= {DOCUMENT, NO_SPAN}
    per_row = [sum(1 + len(d.spans) for d in row) for row in batch_rows]
    assert batch.spans.shape[1] == max(per_row)
    assert all((batch.spans[r, n:, 0] == NO_SPAN).all() for r, n in enumerate(per_row))


def test_a_pool_fills_rows_best_fit_and_uses_every_document_once(text, world):
    enc = SequenceEncoder(text, "continuous", SLOTS)
    docs = [enc.encode(d) for d in documents(world, TASKS * 12, seed=2)]
    seq_len, rows, pool = 160, 4, 16
    batches = list(pack_rows(iter(docs), seq_len, rows, pool=pool))
    packed = [row for batch in batches for row in batch]
    assert sorted(id(d) for row in packed for d in row) == sorted(id(d) for d in docs)  # none split, lost or doubled
    assert all(sum(len(d) for d in row) <= seq_len for row in packed)
    assert all(len(batch) == rows for batch in batches[:-1])
    order = {id(d): i for i, d in enumerate(docs)}
    starts = [order[id(row[0])] for row in packed]
    assert starts == sorted(starts)  # each row opens with the oldest document still held
    row_of = {id(d): r for r, row in enumerate(packed) for d in row}
    assert max(row_of[id(d)] - order[id(d)] for d in docs) <= pool  # none waits more than `pool` rows
    next_fit = list(pack_rows(iter(docs), seq_len, rows))
    assert padding_share(batches, seq_len) < 0.5 * padding_share(next_fit, seq_len)
    assert [id(d) for b in pack_rows(iter(docs), seq_len, rows, pool=0) for r in b for d in r] == \
        [id(d) for d in docs]  # pool 0: stream order, as before
    with pytest.raises(ValueError, match="pack_pool=-1 must be >= 0"):
        UnifiedDataModule([world], pack_pool=-1)


def test_left_padded_rows_lay_out_like_right_padded_ones_shifted(text, world):
    """Sampling prompts (`left_pad`) end together: the padding moves to the start of each row, and keeps
    document id PAD_DOCUMENT, position 0 and continuous id -1."""
    enc = SequenceEncoder(text, "continuous", SLOTS)
    docs = [enc.encode_prompt(d) for d in documents(world, ["caption", "t2i", "vqa"])]
    T = max(len(d) for d in docs)
    pads = [T - len(d) for d in docs]
    assert sorted(pads)[0] == 0 and sorted(pads)[1] > 0
    right = build_layout(collate_rows([[d] for d in docs], T, text.pad_id))
    left_batch = collate_rows([[d] for d in docs], T, text.pad_id, left_pad=True)
    left = build_layout(left_batch)
    for r, (d, pad) in enumerate(zip(docs, pads)):
        for name in ("tokens", "positions", "document_ids", "continuous_ids"):
            assert torch.equal(getattr(left, name)[r, pad:], getattr(right, name)[r, :len(d)]), name
        assert (left.tokens[r, :pad] == text.pad_id).all() and not left_batch.loss_mask[r, :pad].any()
        assert (left.document_ids[r, :pad] == PAD_DOCUMENT).all() and (left.positions[r, :pad] == 0).all()
        assert (left.continuous_ids[r, :pad] == -1).all()
    rows = right.continuous_slots[:, 0] // T  # (N,) each image's row: its slots move by that row's padding
    assert len(rows) == 3 and torch.equal(left.continuous_slots, right.continuous_slots + torch.tensor(pads)[rows, None])


def test_a_document_longer_than_a_row_is_refused(text, world):
    story = SequenceEncoder(text, "discrete", 64).encode(documents(world, ["story"])[0])
    with pytest.raises(ValueError, match=rf"story document of {len(story)} tokens does not fit seq_len=128"):
        list(pack_rows(iter([story]), 128, 2))


def test_a_batch_mixing_pixels_and_latents_is_refused(text):
    enc = SequenceEncoder(text, "continuous", SLOTS)
    docs = [enc.encode(Document([Text("a"), Image(pixels=torch.zeros(3, 8, 8))], "t2i")),
            enc.encode(Document([Text("a"), Image(latents=torch.zeros(4, 4, 4))], "t2i"))]
    with pytest.raises(ValueError, match="mixes pre-encoded and raw images"):
        collate_rows([docs], 64, text.pad_id)


@pytest.mark.parametrize("task", TASKS)
def test_drop_conditions_removes_exactly_the_conditions(world, task):
    doc = documents(world, [task])[0]
    rng = random.Random(0)
    def kept(p_text, p_image):
        return [id(s) for s in drop_conditions(doc, rng, p_text, p_image).segments]

    assert kept(0.0, 0.0) == [id(s) for s in doc.segments]
    dropped = drop_conditions(doc, rng, 1.0, 1.0)
    if task == "t2i":
        assert kept(1.0, 1.0) == [id(doc.segments[1])] and dropped.task == "t2i"
    elif task == "edit":
        src, instr, tgt = map(id, doc.segments)
        assert kept(1.0, 1.0) == [tgt] and kept(1.0, 0.0) == [src, tgt] and kept(0.0, 1.0) == [instr, tgt]
    else:  # captions, questions, stories and plain text keep everything
        assert dropped is doc
    # about p of the t2i captions are dropped
    if task == "t2i":
        captioned = sum(len(kept(0.3, 0.0)) == 2 for _ in range(1000))
        assert 620 < captioned < 780


def test_fill_codes_writes_codes_into_their_slots(text, world):
    enc = SequenceEncoder(text, "discrete", SLOTS)
    docs = [enc.encode(d) for d in documents(world, ["edit", "t2i", "text", "caption"])]
    batch = collate_rows([docs[:2], docs[2:]], 64, text.pad_id)
    codes = torch.randint(0, 50, (batch.num_images, 2, 2))
    filled = batch.fill_codes(codes, code_offset=1000)
    slots = torch.zeros_like(batch.tokens, dtype=torch.bool)
    for r, off, length, i in batch.image_slots(DISCRETE_IMAGE):
        assert filled.tokens[r, off:off + length].tolist() == (codes[i].reshape(-1) + 1000).tolist()
        slots[r, off:off + length] = True
    assert slots.sum() == batch.num_images * SLOTS
    assert torch.equal(filled.tokens[~slots], batch.tokens[~slots])
    assert (batch.tokens[slots] == text.pad_id).all()  # the input batch is left as it was
    with pytest.raises(ValueError, match="has 9 codes but its span holds 4 slots"):
        batch.fill_codes(torch.zeros(batch.num_images, 3, 3, dtype=torch.long), 1000)


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    fields = ("tokens", "loss_mask", "spans", "image_index", "images", "noised", "visible", "task_ids")
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields)


def test_stream_is_reproducible_and_resumes_at_a_batch(text):
    enc = SequenceEncoder(text, "continuous", SLOTS)

    def take(n, seed=0, start=0):
        sources = [ShapesWorld(size=32, seed=seed), ShapesWorld(size=32, seed=seed + 7, tasks={"text": 1.0})]
        stream = PackedBatches(sources, enc, seq_len=96, rows=2, weights=[3.0, 1.0], seed=seed, start=start)
        return list(itertools.islice(iter(stream), n))

    first = take(4)
    assert same_batches(first, take(4))
    assert same_batches(first[2:], take(2, start=2))
    assert not same_batches(first[:2], take(2, start=2))
    assert not same_batches(first, take(4, seed=1))
