"""Data sources: safe image loading, worker sharding, digits, JSONL manifests, WebDataset shards,
and the bad-record policy (skip with a count, or raise under strict)."""

import io
import json
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from anymodal.data.digits import DigitsSource
from anymodal.data.document import Image, Text
from anymodal.data.images import BadImage, load_image
from anymodal.data.jsonl import JsonlSource
from anymodal.data.shapes import ShapesWorld
from anymodal.data.sources import BadRecord, RecordErrors
from anymodal.data.webdataset import WebDatasetSource

RED, GREEN, BLUE = (230, 25, 25), (30, 160, 50), (30, 70, 230)


def png_bytes(color=RED, size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    PIL.Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width=100_000, height=100_000) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs), with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke showpage\n"


def bad_images() -> dict[str, bytes]:
    good = png_bytes(size=(32, 32))
    noisy = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        noisy, "PNG"
    )
    noisy = noisy.getvalue()
    return {
        "corrupt": noisy[:60] + bytes(len(noisy) - 120) + noisy[-60:],  # header intact, data zeroed
        "truncated": noisy[: len(noisy) // 2],
        "text-named-png": b"this is not an image\n",
        "svg": SVG,
        "eps": EPS,
        "huge": huge_png_header(),
        "empty": good[:0],
    }


# ---------------------------------------------------------------------------------------------
# images


def test_load_image_converts_and_center_crops(tmp_path):
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = RED, GREEN, BLUE
    path = tmp_path / "wide.png"
    PIL.Image.fromarray(wide).save(path)
    pixels = load_image(path, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    center = torch.tensor(GREEN, dtype=torch.float32) / 255
    assert torch.allclose(pixels[:, 4:12, 4:12].mean((1, 2)), center, atol=0.02)  # the middle third survives
    # transparency composites onto white; grayscale becomes RGB; bytes work like paths
    clear = load_image(png_bytes((0, 0, 0, 0), mode="RGBA"), 8)
    assert torch.allclose(clear, torch.ones(3, 8, 8))
    gray = load_image(png_bytes(128, mode="L"), 8)
    assert torch.allclose(gray, torch.full((3, 8, 8), 128 / 255))
    jpeg = io.BytesIO()
    PIL.Image.new("RGB", (200, 100), BLUE).save(jpeg, "JPEG")
    assert load_image(jpeg.getvalue(), 32).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "name, message",
    [
        ("corrupt", "corrupt"),
        ("truncated", "truncated"),
        ("text-named-png", "supported format"),
        ("svg", "supported format"),
        ("eps", "supported format"),
        ("huge", "header"),
        ("empty", "is empty"),
    ],
)
def test_bad_images_raise_bad_image(name, message, tmp_path):
    data = bad_images()[name]
    with pytest.raises(BadImage, match=message):
        load_image(data, 32)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    with pytest.raises(BadImage, match=str(path)):
        load_image(path, 32)


def test_pixel_and_byte_limits_do_not_rely_on_pil(monkeypatch, tmp_path):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # PIL's global bomb check switched off
    with pytest.raises(BadImage, match="100000x100000 pixels"):
        load_image(huge_png_header(), 32)
    with pytest.raises(BadImage, match="max_pixels=100"):
        load_image(png_bytes(size=(11, 10)), 8, max_pixels=100)
    assert load_image(png_bytes(size=(10, 10)), 8, max_pixels=100).shape == (3, 8, 8)
    with pytest.raises(BadImage, match="max_bytes"):
        load_image(png_bytes(), 8, max_bytes=10)
    with pytest.raises(BadImage, match="does not exist"):
        load_image(tmp_path / "missing.png", 8)


# ---------------------------------------------------------------------------------------------
# the base source: workers and the bad-record policy


def _identity(x):
    return x


def test_workers_draw_different_streams_that_add_up_to_length():
    world = ShapesWorld(seed=0, length=10, tasks={"text": 1.0})
    loader = DataLoader(world, batch_size=None, num_workers=2, collate_fn=_identity)
    texts = [doc.texts[0].text for doc in loader]
    assert len(texts) == 10
    by_worker = texts[0::2], texts[1::2]  # the loader alternates between its workers
    assert by_worker[0] != by_worker[1]
    alone = [doc.texts[0].text for doc in world]
    assert texts[0::2] == alone[:5]  # shard 0 draws the same stream with or without workers
    assert alone != [doc.texts[0].text for doc in ShapesWorld(seed=1, length=10, tasks={"text": 1.0})]


def test_record_errors_count_warn_and_raise():
    errors = RecordErrors("data.jsonl")
    with pytest.warns(UserWarning, match=r"data.jsonl:3: bad image.*1 skipped so far"):
        errors.skip("data.jsonl:3", "bad image", "missing file")
    with pytest.warns(UserWarning, match="2 skipped so far.*1 bad image, 1 invalid json"):
        errors.skip("data.jsonl:7", "invalid json")
    assert errors.counts == {"bad image": 1, "invalid json": 1} and errors.total == 2
    with pytest.raises(BadRecord, match=r"data.jsonl:9: bad image \(huge\); fix or remove"):
        RecordErrors("data.jsonl", strict=True).skip("data.jsonl:9", "bad image", "huge")


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_documents():
    source = DigitsSource(size=16, seed=0, tasks={"t2i": 1.0, "caption": 1.0})
    docs = list(source)
    assert len(docs) == len(source) == 1617
    assert {d.task for d in docs} == {"t2i", "caption"}
    for doc in docs[:50]:
        kinds = [type(s) for s in doc.segments]
        assert kinds == ([Text, Image] if doc.task == "t2i" else [Image, Text])
        names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        assert doc.texts[0].text == f"a handwritten {names[doc.meta['label']]}"
        p = doc.images[0].pixels
        assert p.shape == (3, 16, 16) and 0 <= p.min() and p.max() <= 1
        assert p[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and p.min() < 0.5  # white background, dark ink
    assert {d.meta["label"] for d in docs} == set(range(10))


def test_digits_split_length_and_seed():
    train, val = DigitsSource(split="train"), DigitsSource(split="val")
    assert len(train) + len(val) == 1797 and len(val) == 180
    train_set = {tuple(p.flatten().tolist()) for p in train.pixels[:, 0, ::4, ::4]}
    assert not any(tuple(p.flatten().tolist()) in train_set for p in val.pixels[:20, 0, ::4, ::4])
    assert DigitsSource(split="val", seed=5).labels == val.labels  # the split ignores the seed
    order = [d.meta["index"] for d in DigitsSource(split="val", seed=1)]
    assert order == [d.meta["index"] for d in DigitsSource(split="val", seed=1)]
    assert order != [d.meta["index"] for d in DigitsSource(split="val", seed=2)]
    assert sorted(order) == list(range(180))  # one shuffled pass
    assert len(list(DigitsSource(split="val", length=400))) == 400
    assert {d.task for d in DigitsSource(split="val", tasks={"caption": 1})} == {"caption"}
    with pytest.raises(ValueError, match="no task"):
        DigitsSource(tasks={"vqa": 1.0})


# ---------------------------------------------------------------------------------------------
# JSONL


def write_manifest(tmp_path, lines: list) -> str:
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "red.png").write_bytes(png_bytes(RED))
    (tmp_path / "img" / "green.png").write_bytes(png_bytes(GREEN))
    (tmp_path / "blue.png").write_bytes(png_bytes(BLUE))
    for name, data in bad_images().items():
        (tmp_path / "img" / f"{name}.png").write_bytes(data)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


GOOD_LINES = [
    {"task": "t2i", "segments": [{"text": "a red square"}, {"image": "img/red.png"}]},
    {
        "task": "edit",
        "segments": [{"image": "img/red.png"}, {"text": "make it green"}, {"image": "img/green.png"}],
    },
    {
        "segments": [{"text": "red."}, {"image": "img/red.png"}, {"text": "then blue."}, {"image": "BLUE"}],
        "meta": {"id": 7},
    },
]


def good_lines(tmp_path):
    lines = json.loads(json.dumps(GOOD_LINES))
    lines[2]["segments"][3]["image"] = str(tmp_path / "blue.png")  # an absolute path
    return lines


def mean_color(image: Image) -> list[int]:
    return [round(v) for v in (image.pixels.mean((1, 2)) * 255).tolist()]


def test_jsonl_reads_pairs_edits_and_interleaved_documents(tmp_path):
    path = write_manifest(tmp_path, good_lines(tmp_path))
    docs = list(JsonlSource(path, image_size=8))
    assert [d.task for d in docs] == ["t2i", "edit", "story"]
    assert [type(s) for s in docs[0].segments] == [Text, Image]
    assert [type(s) for s in docs[1].segments] == [Image, Text, Image]
    assert [type(s) for s in docs[2].segments] == [Text, Image, Text, Image]
    assert mean_color(docs[1].images[1]) == list(GREEN) and mean_color(docs[2].images[1]) == list(BLUE)
    assert docs[2].images[0].pixels.shape == (3, 8, 8)
    assert docs[2].meta["id"] == 7 and docs[2].meta["line"] == 3


BAD_LINES = {
    "invalid json": '{"task": "t2i", "segments": [',
    "unknown key": {"task": "t2i", "segments": [{"text": "x"}], "caption": "oops"},
    "unknown task": {"task": "t2v", "segments": [{"text": "x"}]},
    "invalid segment": {"segments": [{"text": "x", "image": "img/red.png"}]},
    "missing": {"segments": [{"image": "img/nope.png"}]},
    "corrupt": {"segments": [{"image": "img/corrupt.png"}]},
    "truncated": {"segments": [{"image": "img/truncated.png"}]},
    "unsupported": {"segments": [{"image": "img/svg.png"}]},
    "huge": {"segments": [{"image": "img/huge.png"}]},
}


def test_jsonl_skips_bad_lines_with_a_count(tmp_path):
    lines = good_lines(tmp_path) + list(BAD_LINES.values())
    source = JsonlSource(write_manifest(tmp_path, lines), image_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(source)
    assert len(docs) == 3
    assert source.errors.counts == {
        "invalid json": 1, "unknown key": 1, "unknown task": 1, "invalid segment": 1, "bad image": 5,
    }  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert len(messages) == 9 and "9 skipped so far" in messages[-1]
    assert "data.jsonl:4: invalid json" in messages[0] and "data.jsonl:12: bad image" in messages[-1]


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_jsonl_strict_names_the_file_and_line(tmp_path, name):
    path = write_manifest(tmp_path, good_lines(tmp_path)[:1] + [BAD_LINES[name]])
    with pytest.raises(BadRecord, match=r"data\.jsonl:2: .*strict=False"):
        list(JsonlSource(path, image_size=8, strict=True))


def test_jsonl_shuffle_and_loop(tmp_path):
    lines = [{"segments": [{"text": f"line {i}"}]} for i in range(20)]
    path = write_manifest(tmp_path, lines)

    def texts(source, n=None):
        it = iter(source)
        return [next(it).texts[0].text for _ in range(n)] if n else [d.texts[0].text for d in it]

    plain = texts(JsonlSource(path))
    assert plain == [f"line {i}" for i in range(20)]
    shuffled = texts(JsonlSource(path, shuffle=True, seed=1))
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    assert shuffled == texts(JsonlSource(path, shuffle=True, seed=1))
    assert shuffled != texts(JsonlSource(path, shuffle=True, seed=2))
    looped = texts(JsonlSource(path, loop=True, shuffle=True, seed=1), 50)
    assert looped[:20] == shuffled and sorted(looped[20:40]) == sorted(plain) and looped[20:40] != shuffled
    only_bad = write_manifest(tmp_path, ["not json"])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable document"):
        texts(JsonlSource(only_bad, loop=True), 5)


# ---------------------------------------------------------------------------------------------
# WebDataset


def write_shards(tmp_path, corrupt: bool = False) -> str:
    samples = [
        [{"__key__": f"{i:03d}", "png": png_bytes(RED), "txt": f"red {i}".encode()} for i in range(4)],
        [
            {"__key__": "100", "jpg": _jpeg(GREEN), "txt": b"green"},
            {
                "__key__": "101",
                "src.png": png_bytes(RED),
                "tgt.png": png_bytes(BLUE),
                "json": json.dumps(
                    {
                        "task": "edit",
                        "segments": [{"image": "src.png"}, {"text": "make it blue"}, {"image": "tgt.png"}],
                    }
                ).encode(),
            },
        ],
    ]
    if corrupt:
        bad = bad_images()
        samples[1] += [
            {"__key__": "200", "png": bad["truncated"], "txt": b"truncated"},
            {"__key__": "201", "png": bad["huge"], "txt": b"huge"},
            {"__key__": "202", "png": bad["corrupt"], "txt": b"corrupt"},
            {"__key__": "203", "json": b'{"segments": [{"image": "gone.png"}]}'},
            {"__key__": "204", "cls": b"3"},
        ]
    for n, shard in enumerate(samples):
        with wds.TarWriter(str(tmp_path / f"shard-{n}.tar")) as sink:
            for sample in shard:
                sink.write(sample)
    return str(tmp_path / "shard-{0..1}.tar")


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (24, 24), color).save(buf, "JPEG")
    return buf.getvalue()


def test_webdataset_pairs_and_json_documents(tmp_path):
    urls = write_shards(tmp_path)
    docs = list(WebDatasetSource(urls, image_size=8, seed=0))
    assert len(docs) == 6
    pairs = [d for d in docs if d.meta["key"] != "101"]
    assert {d.task for d in pairs} == {"t2i", "caption"}
    for d in pairs:
        assert [type(s) for s in d.segments] == ([Text, Image] if d.task == "t2i" else [Image, Text])
    edit = next(d for d in docs if d.meta["key"] == "101")
    assert edit.task == "edit" and [type(s) for s in edit.segments] == [Image, Text, Image]
    assert mean_color(edit.images[1]) == list(BLUE) and edit.texts[0].text == "make it blue"
    assert next(d for d in docs if d.meta["key"] == "100").texts[0].text == "green"
    assert [d.meta["key"] for d in docs] == [d.meta["key"] for d in WebDatasetSource([urls], image_size=8)]
    shuffled = [d.meta["key"] for d in WebDatasetSource(urls, image_size=8, shuffle=10, seed=3)]
    assert sorted(shuffled) == sorted(d.meta["key"] for d in docs)
    assert shuffled == [d.meta["key"] for d in WebDatasetSource(urls, image_size=8, shuffle=10, seed=3)]
    only_t2i = WebDatasetSource(urls, image_size=8, tasks={"t2i": 1.0})
    assert {d.task for d in only_t2i if d.meta["key"] != "101"} == {"t2i"}


def test_webdataset_skips_bad_samples_with_a_count(tmp_path):
    urls = write_shards(tmp_path, corrupt=True)
    missing = str(tmp_path / "shard-9.tar")
    source = WebDatasetSource([urls, missing], image_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(source)
    assert len(docs) == 6
    assert source.errors.counts == {
        "bad image": 3,
        "missing member": 1,
        "unknown layout": 1,
        "unreadable shard": 1,
    }
    messages = [str(w.message) for w in caught]
    assert not any("unclosed" in m for m in messages)
    messages = [m for m in messages if "skipped" in m]
    assert any("shard-1.tar:200: bad image" in m for m in messages) and "6 skipped so far" in messages[-1]
    assert any("shard-9.tar" in m and "unreadable shard" in m for m in messages)


def test_webdataset_strict_raises_on_a_corrupt_image(tmp_path):
    urls = write_shards(tmp_path, corrupt=True)
    with pytest.raises(BadRecord, match=r"shard-1\.tar:200: bad image .*truncated"):
        list(WebDatasetSource(urls, image_size=8, strict=True))
    with pytest.raises(BadRecord, match="shard-9.tar"):
        list(WebDatasetSource(str(tmp_path / "shard-9.tar"), strict=True))
