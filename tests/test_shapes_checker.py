"""The shapes checker scores 1.0 on ground truth and catches every kind of mistake."""

import math

import numpy as np
import pytest
import torch

from anymodal.data.images import pixels_from_array
from anymodal.data.shapes import (
    CELL_NAMES,
    COLORS,
    Obj,
    Scene,
    ShapesWorld,
    caption,
    random_edit,
    random_scene,
    render,
)
from anymodal.evaluate.shapes import (
    EDIT_KINDS,
    KIND_METRICS,
    METRICS,
    ShapesScorer,
    parse_caption,
    parse_image,
    table_rows,
)


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_scores_one_on_every_metric(size):
    world = ShapesWorld(size=size, seed=size, holdout=["red circle"], split="all")
    rng = np.random.default_rng(size)
    scorer = ShapesScorer()
    for _ in range(150):
        doc = world.document("t2i", rng)
        scorer.add_t2i(doc.meta["scenes"][0], doc.images[0].pixels, heldout=doc.meta["heldout"])
    for _ in range(60):
        doc = world.document("edit", rng)
        scorer.add_edit(doc.meta["scenes"][1], doc.images[1].pixels, heldout=doc.meta["heldout"])
        doc = world.document("caption", rng)
        scorer.add_caption(doc.meta["scenes"][0], doc.texts[0].text, heldout=doc.meta["heldout"])
        doc = world.document("vqa", rng)
        scorer.add_vqa(doc.meta["answer"], doc.texts[1].text, heldout=doc.meta["heldout"])
    for _ in range(30):
        doc = world.document("story", rng)
        scorer.add_story(doc.meta["scenes"], [i.pixels for i in doc.images], heldout=doc.meta["heldout"])
    table = scorer.scores()
    assert set(table) == {"seen", "heldout", "all"}
    for group in ("seen", "heldout", "all"):
        assert all(table[group][m] == 1.0 for m in METRICS), table[group]
    assert table["all"]["n_t2i"] == 150 and table["all"]["n_story"] == 30
    assert table["seen"]["n_t2i"] + table["heldout"]["n_t2i"] == 150
    assert table["heldout"]["n_t2i"] > 0


@pytest.mark.parametrize("size", [32, 64])
def test_parse_image_reads_uint8_and_float_renders(size):
    rng = np.random.default_rng(100 + size)
    for _ in range(100):
        scene = random_scene(rng)
        img = render(scene, size, rng)
        assert parse_image(img) == scene
        assert parse_image(pixels_from_array(img)) == scene


def test_checker_catches_mistakes():
    scene = Scene((Obj("red", "circle", 0), Obj("blue", "square", 4), Obj("green", "triangle", 8)))
    rng = np.random.default_rng(0)
    wrong = {
        "wrong color": Scene(
            (Obj("purple", "circle", 0), Obj("blue", "square", 4), Obj("green", "triangle", 8))
        ),
        "wrong shape": Scene(
            (Obj("red", "square", 0), Obj("blue", "square", 4), Obj("green", "triangle", 8))
        ),
        "moved": Scene((Obj("red", "circle", 1), Obj("blue", "square", 4), Obj("green", "triangle", 8))),
        "missing": Scene((Obj("red", "circle", 0), Obj("blue", "square", 4))),
        "extra": Scene(scene.objects + (Obj("yellow", "circle", 2),)),
    }
    scorer = ShapesScorer()
    for name, other in wrong.items():
        image = render(other, 32, rng)
        assert parse_image(image) == other, name
        assert not scorer.add_t2i(scene, image), name
        assert not scorer.add_edit(scene, image), name
    row = scorer.scores()["seen"]
    assert row["t2i_exact"] == 0.0 and row["edit_exact"] == 0.0
    # prompt objects found per image (wrong color, wrong shape, moved, missing, extra), out of 3 each
    assert math.isclose(row["t2i_object"], (2 + 2 + 3 + 2 + 3) / 15)  # color and shape right
    assert math.isclose(row["t2i_position"], (2 + 2 + 2 + 2 + 3) / 15)  # and the cell
    assert math.isclose(row["t2i_count"], 3 / 5)
    assert math.isnan(scorer.scores()["heldout"]["t2i_exact"])


def test_edits_are_also_scored_per_kind():
    from anymodal.benchmark import edit_kind

    world = ShapesWorld(size=32, seed=5)
    rng = np.random.default_rng(5)
    scorer, kinds = ShapesScorer(), []
    for _ in range(120):  # ground truth, except every removal shown unedited (the source image)
        doc = world.document("edit", rng)
        kinds.append(edit_kind(doc.meta["instruction"]))
        image = doc.images[0 if kinds[-1] == "remove" else 1].pixels
        assert scorer.add_edit(doc.meta["scenes"][1], image, kind=kinds[-1]) == (kinds[-1] != "remove")
    assert set(kinds) == set(EDIT_KINDS)  # every instruction of the world is one of the four kinds
    row = scorer.scores()["seen"]
    assert [row[m] for m in KIND_METRICS] == [1.0, 1.0, 0.0, 1.0]  # recolor, move, remove, add
    assert math.isclose(row["edit_exact"], 1 - kinds.count("remove") / 120)
    assert math.isnan(scorer.scores()["heldout"]["edit_exact_move"])
    rows = table_rows(scorer.scores())  # the kinds under edit_exact; none where no edit was scored
    assert rows[rows.index(("edit_exact", None)) + 1:][:4] == list(zip(KIND_METRICS, EDIT_KINDS))
    assert table_rows(ShapesScorer().scores()) == [(m, None) for m in METRICS]
    assert edit_kind("Then make the red circle blue.") == "recolor" and edit_kind("paint it red") is None
    with pytest.raises(ValueError, match="edit kind 'paint' is not one of recolor, move, remove, add"):
        scorer.add_edit(doc.meta["scenes"][1], image, kind="paint")


@pytest.mark.parametrize("size", [32, 64])
def test_checker_reads_blurred_renders_and_still_catches_wrong_shapes(size):
    """Decoders round corners; the color-mass rule reads blurred squares as squares."""
    from scipy import ndimage

    rng = np.random.default_rng(7 + size)
    sigma = 0.025 * size  # 0.8 px at 32: corners visibly round, the old corner test failed here
    for _ in range(60):
        scene = random_scene(rng)
        img = render(scene, size, rng).astype(np.float32)
        blurred = np.stack([ndimage.gaussian_filter(img[..., c], sigma) for c in range(3)], -1)
        parsed = parse_image(np.rint(blurred).astype(np.uint8))
        assert parsed == scene
        swapped = Scene(tuple(Obj(o.color, {"circle": "square", "square": "triangle", "triangle": "circle"}[o.shape],
                                  o.cell) for o in scene))
        assert parsed != swapped


def test_classify_shape_picks_the_nearest_area():
    from anymodal.evaluate.shapes import classify_shape

    assert [classify_shape(m) for m in (0.3, 0.5, 0.6, 0.7, 0.785, 0.85, 1.0, 1.4)] == [
        "triangle", "triangle", "triangle", "circle", "circle", "circle", "square", "square"]


def test_checker_ignores_noise_and_blank_images():
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert parse_image(blank) == Scene(())
    noisy = render(Scene((Obj("red", "square", 4),)), 32)
    noisy[2, 2] = COLORS["blue"]  # a stray pixel is noise
    noisy[30, 29:31] = COLORS["green"]
    assert parse_image(noisy) == Scene((Obj("red", "square", 4),))
    gray = np.full((32, 32, 3), 128, dtype=np.uint8)  # far from every palette color
    assert parse_image(gray) == Scene(())
    assert parse_image(torch.ones(3, 32, 32)) == Scene(())
    with pytest.raises(ValueError, match="uint8"):
        parse_image(np.zeros((32, 32, 3), dtype=np.float32))


def test_story_scoring_needs_every_image():
    world = ShapesWorld(seed=1)
    rng = np.random.default_rng(0)
    doc = world.document("story", rng)
    images = [i.pixels for i in doc.images]
    scorer = ShapesScorer()
    assert scorer.add_story(doc.meta["scenes"], images)
    assert not scorer.add_story(doc.meta["scenes"], images[:-1])
    broken = list(images)
    broken[-1] = torch.ones_like(broken[-1])
    assert not scorer.add_story(doc.meta["scenes"], broken)
    assert math.isclose(scorer.scores()["all"]["story_exact"], 1 / 3)


def test_parse_caption_round_trips_in_any_order():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = random_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == scene
        assert parse_caption(text + ".") == scene
        items = [f"a {o.color} {o.shape} at the {CELL_NAMES[o.cell]}" for o in scene]
        shuffled = [items[i] for i in rng.permutation(len(items))]
        assert parse_caption(" and ".join(shuffled)) == scene
        assert parse_caption(", ".join(shuffled)) == scene
        _, edited = random_edit(scene, rng)
        assert parse_caption(caption(edited)) != scene


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a pink circle at the top left",
        "a red hexagon at the top left",
        "a red circle at the middle",
        "a red circle",
        "the red circle at the top left",
        "a red circle at the top left and",
        "a red circle at the top left and a blue square at the top left",  # shared cell
        "a red circle at the top left and a red circle at the center",  # shared pair
        "a red circle at the top, a red square at the left, a red triangle at the right and a blue circle at the center",
    ],
)
def test_parse_caption_rejects_wrong_captions(text):
    assert parse_caption(text) is None


def test_vqa_and_caption_scoring():
    scorer = ShapesScorer()
    scene = Scene((Obj("red", "circle", 0),))
    assert scorer.add_vqa("two", " Two. ")
    assert not scorer.add_vqa("two", "three")
    assert scorer.add_vqa("left", "a red circle at the left: left")  # described first: the part after ':'
    assert not scorer.add_vqa("left", "a red circle at the left: right")
    assert scorer.add_caption(scene, "a red circle at the top left")
    assert not scorer.add_caption(scene, "a red circle at the top")
    assert scorer.add_caption(scene, "a red circle at the top left", heldout=True)
    row = scorer.scores()
    assert row["seen"]["vqa_acc"] == 0.5 and row["seen"]["caption_exact"] == 0.5
    assert row["heldout"]["caption_exact"] == 1.0 and row["all"]["n_caption"] == 3


def test_a_wrong_image_is_reported_with_what_the_checker_read():
    scene = Scene(objects=(Obj("red", "circle", 0), Obj("blue", "square", 4)))
    image = np.asarray(render(scene, 32, np.random.default_rng(0)))
    scorer = ShapesScorer()
    assert scorer.read(image) == "a red circle at the top left and a blue square at the center"
    assert scorer.read(np.full((32, 32, 3), 255, np.uint8)) == "no object"


def test_the_report_shows_the_reading_of_wrong_samples_only():
    from anymodal.evaluate.report import task_samples

    image = np.full((32, 32, 3), 255, np.uint8)
    wrong = {"prompt": "a red circle at the top left", "image": image, "exact": False, "read": "no object"}
    right = {"prompt": "a red circle at the top left", "image": image, "exact": True, "read": None}
    assert "checker read: no object" in task_samples("t2i", [wrong])
    assert "checker read" not in task_samples("t2i", [right])


def test_the_overview_prints_every_prompt_whole_under_small_images(tmp_path):
    from PIL import Image as PILImage

    from anymodal.benchmark import BenchResult
    from anymodal.data.shapes import Obj, Scene, caption, render
    from anymodal.evaluate.report import _wrap, write_overview

    scene = Scene([Obj("yellow", "triangle", 8), Obj("purple", "square", 0), Obj("cyan", "circle", 6)])
    long, short = caption(scene), "a red circle at the center"
    image = render(scene, 24, np.random.default_rng(0))
    samples = {"t2i": [{"image": image, "prompt": long, "exact": True}, {"image": image, "prompt": short,
                                                                          "exact": False}]}
    path = write_overview(tmp_path / "overview.png", {"transfusion": BenchResult({}, {}, samples)})
    canvas = np.asarray(PILImage.open(path).convert("L"))
    lines = len(_wrap(long, 24 * 4 // 6))
    assert lines >= 6  # more lines than a fixed five would have held
    text_top = 8 + 20 + 24 * 4 + 4
    last = canvas[text_top + 11 * (lines - 1): text_top + 11 * lines, 8: 8 + 24 * 4]
    assert (last < 200).any()  # the prompt's last line is drawn
    assert (canvas[text_top + 11 * lines + 2:, :] > 250).all()  # and nothing is cut below it
