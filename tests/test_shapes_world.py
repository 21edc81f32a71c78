"""The shapes world follows specs/shapes-world.md: scenes, texts, tasks, splits, reproducibility."""

import re
import time

import numpy as np
import pytest
import torch

from anymodal.data.document import Image, Text
from anymodal.data.shapes import (
    CELL_NAMES,
    COLORS,
    SHAPES,
    Obj,
    Scene,
    ShapesWorld,
    caption,
    cell_center,
    parse_holdout,
    random_edit,
    random_question,
    random_scene,
    render,
)

HOLDOUT = ["red circle", "blue square"]
COLOR = "|".join(COLORS)
SHAPE = "|".join(SHAPES)
CELL = "|".join(CELL_NAMES)


def docs(world, n):
    it = iter(world)
    return [next(it) for _ in range(n)]


def test_constants_match_the_spec():
    assert COLORS == {
        "red": (230, 25, 25), "green": (30, 160, 50), "blue": (30, 70, 230),
        "yellow": (240, 210, 20), "purple": (150, 50, 190), "cyan": (20, 190, 210),
    }  # fmt: skip
    assert SHAPES == ("circle", "square", "triangle")
    assert CELL_NAMES == (
        "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
    )  # fmt: skip


def test_random_scenes_obey_the_rules():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(2000):
        scene = random_scene(rng)
        n = len(scene)
        counts.add(n)
        assert 1 <= n <= 3
        assert len(scene.cells) == n and len(scene.pairs) == n
        assert scene.is_valid()
    assert counts == {1, 2, 3}
    assert all(len(random_scene(rng, max_objects=1)) == 1 for _ in range(50))


def test_scene_equality_is_order_free_and_checks_validity():
    a, b = Obj("red", "circle", 0), Obj("blue", "square", 4)
    assert Scene((a, b)) == Scene((b, a))
    assert hash(Scene((a, b))) == hash(Scene((b, a)))
    assert Scene((a, b)) != Scene((a,))
    assert not Scene((a, Obj("green", "square", 0))).is_valid()  # shared cell
    assert not Scene((a, Obj("red", "circle", 5))).is_valid()  # shared pair
    assert not Scene(()).is_valid()
    with pytest.raises(ValueError, match="unknown color"):
        Obj("pink", "circle", 0)
    with pytest.raises(ValueError, match="cell"):
        Obj("red", "circle", 9)


def test_canonical_caption_matches_the_spec_example():
    scene = Scene((Obj("blue", "square", 4), Obj("red", "circle", 0)))
    assert caption(scene) == "a red circle at the top left and a blue square at the center"
    three = Scene((Obj("green", "triangle", 8), Obj("blue", "square", 4), Obj("red", "circle", 0)))
    assert caption(three) == (
        "a red circle at the top left, a blue square at the center and a green triangle at the bottom right"
    )
    assert caption(Scene((Obj("cyan", "triangle", 1),))) == "a cyan triangle at the top"


@pytest.mark.parametrize("size", [32, 64])
def test_render_geometry_and_colors(size):
    scene = Scene((Obj("red", "square", 0), Obj("green", "circle", 4), Obj("blue", "triangle", 8)))
    img = render(scene, size)  # no jitter
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all() and (img[-1, size // 2] == 255).all()  # white background
    for obj in scene:
        x, y = cell_center(obj.cell, size)
        assert tuple(img[int(y) + 1, int(x)]) == COLORS[obj.color]  # flat fill at the center
    # the square's fully colored extent is 0.25 * S, give or take its anti-aliased edge
    red = (img == np.array(COLORS["red"], dtype=np.uint8)).all(-1)
    ys, xs = np.nonzero(red)
    assert (
        abs((xs.max() - xs.min() + 1) - 0.25 * size) <= 1
        and abs((ys.max() - ys.min() + 1) - 0.25 * size) <= 1
    )
    # the triangle is bottom-heavy, its apex at the top
    blue = (img == np.array(COLORS["blue"], dtype=np.uint8)).all(-1)
    ys, _ = np.nonzero(blue)
    mid = (ys.min() + ys.max()) / 2
    assert (ys > mid).sum() > 2 * (ys < mid).sum()


@pytest.mark.parametrize("size", [32, 64])
def test_jitter_stays_within_three_percent(size):
    rng = np.random.default_rng(1)
    scene = Scene((Obj("red", "square", 4),))
    offsets = []
    for _ in range(200):
        img = render(scene, size, rng)
        covered = 1.0 - (img[..., 1].astype(np.float64) - 25) / (255 - 25)  # red coverage per pixel
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        cx, cy = (covered * xs).sum() / covered.sum(), (covered * ys).sum() / covered.sum()
        offsets.append((cx - size / 2, cy - size / 2))
    offsets = np.abs(np.array(offsets))
    assert offsets.max() <= 0.03 * size + 0.05
    assert offsets.max() > 0.02 * size  # jitter is really applied


def test_holdout_is_respected_per_split():
    assert parse_holdout(HOLDOUT) == {("red", "circle"), ("blue", "square")}
    held = parse_holdout(HOLDOUT)
    train = ShapesWorld(seed=1, holdout=HOLDOUT, split="train")
    for doc in docs(train, 300):
        assert not doc.meta["heldout"]
        for scene in doc.meta["scenes"] or [doc.meta["scene"]]:
            assert not scene.pairs & held
    heldout = ShapesWorld(seed=1, holdout=HOLDOUT, split="heldout")
    for doc in docs(heldout, 300):
        assert doc.meta["heldout"]
        for scene in doc.meta["scenes"] or [doc.meta["scene"]]:
            assert scene.pairs & held
    both = docs(ShapesWorld(seed=1, holdout=HOLDOUT, split="all"), 300)
    assert 0 < sum(d.meta["heldout"] for d in both) < 300


def test_holdout_text_names_held_out_pairs_in_words_only():
    held = parse_holdout(HOLDOUT)
    world = ShapesWorld(seed=1, holdout=HOLDOUT, split="train", holdout_text=True)
    named = 0
    for doc in docs(world, 600):
        assert not any(scene.pairs & held for scene in doc.meta["scenes"])  # never in a picture
        if doc.task == "text":
            named += bool(doc.meta["scene"].pairs & held)
    assert named > 0  # but in words
    plain = ShapesWorld(seed=1, holdout=HOLDOUT, split="train")
    assert not any(d.task == "text" and d.meta["scene"].pairs & held for d in docs(plain, 600))


def test_reproducible_from_the_seed():
    def fingerprint(world):
        out = []
        for doc in docs(world, 40):
            out.append(tuple(s.text if isinstance(s, Text) else s.pixels.sum().item() for s in doc.segments))
        return out

    assert fingerprint(ShapesWorld(seed=3)) == fingerprint(ShapesWorld(seed=3))
    assert fingerprint(ShapesWorld(seed=3)) != fingerprint(ShapesWorld(seed=4))
    world = ShapesWorld(seed=3)
    first = fingerprint(world)
    assert fingerprint(world) == first  # a second pass restarts the same stream
    world.set_epoch(1)
    assert fingerprint(world) != first
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    assert caption(a.document("t2i", np.random.default_rng(9)).meta["scenes"][0]) == caption(
        b.document("t2i", np.random.default_rng(9)).meta["scenes"][0]
    )


def test_length_and_task_ratios():
    world = ShapesWorld(seed=0, length=25, tasks={"vqa": 1.0})
    out = list(world)
    assert len(out) == len(world) == 25 and {d.task for d in out} == {"vqa"}
    mixed = docs(ShapesWorld(seed=0, tasks={"t2i": 3, "caption": 1}), 400)
    n_t2i = sum(d.task == "t2i" for d in mixed)
    assert {d.task for d in mixed} == {"t2i", "caption"} and 250 < n_t2i < 350
    with pytest.raises(TypeError, match="no len"):
        len(ShapesWorld())


@pytest.mark.parametrize("size", [32, 64])
def test_every_task_has_its_segment_structure(size):
    world = ShapesWorld(size=size, seed=5)
    rng = np.random.default_rng(0)
    structure = {
        "t2i": [Text, Image],
        "caption": [Image, Text],
        "vqa": [Image, Text, Text],
        "edit": [Image, Text, Image],
        "text": [Text],
    }
    for task, kinds in structure.items():
        for _ in range(20):
            doc = world.document(task, rng)
            assert doc.task == task
            assert [type(s) for s in doc.segments] == kinds
            assert len(doc.meta["scenes"]) == len(doc.images)
            for image in doc.images:
                p = image.pixels
                assert p.shape == (3, size, size) and p.dtype == torch.float32
                assert p.min() >= 0 and p.max() <= 1 and p.is_contiguous()
            if task in ("t2i", "caption", "text"):
                scene = (doc.meta["scenes"] or [doc.meta["scene"]])[0]
                assert doc.texts[0].text == caption(scene)
            if task == "vqa":
                assert [t.text for t in doc.texts] == [doc.meta["question"], doc.meta["answer"]]
            if task == "edit":
                assert doc.texts[0].text == doc.meta["instruction"]


def test_story_format():
    world = ShapesWorld(seed=2)
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(60):
        doc = world.document("story", rng)
        kinds = [type(s) for s in doc.segments]
        n = len(doc.images)
        lengths.add(n)
        assert 2 <= n <= 4 and kinds == [Text, Image] * n
        scenes, texts = doc.meta["scenes"], [t.text for t in doc.texts]
        assert len(scenes) == n and len(doc.meta["edits"]) == n - 1
        assert texts[0] == caption(scenes[0]) + "."
        for k, (text, edit, before, after) in enumerate(zip(texts[1:], doc.meta["edits"], scenes, scenes[1:])):
            assert text == f"{'finally' if k == n - 2 else 'then'} {edit}."  # the last edit announces the end
            assert apply_edit(before, edit) == after
    assert lengths == {2, 3, 4}


def apply_edit(scene: Scene, instruction: str) -> Scene:
    """An independent reading of an edit instruction, applied to a scene."""
    find = {o.name: o for o in scene}
    if m := re.fullmatch(rf"make the ({COLOR}) ({SHAPE}) ({COLOR})", instruction):
        old = find[f"{m[1]} {m[2]}"]
        return scene.replace(old, Obj(m[3], old.shape, old.cell))
    if m := re.fullmatch(rf"move the ({COLOR}) ({SHAPE}) to the ({CELL})", instruction):
        old = find[f"{m[1]} {m[2]}"]
        return scene.replace(old, Obj(old.color, old.shape, CELL_NAMES.index(m[3])))
    if m := re.fullmatch(rf"remove the ({COLOR}) ({SHAPE})", instruction):
        return scene.replace(find[f"{m[1]} {m[2]}"], None)
    m = re.fullmatch(rf"add a ({COLOR}) ({SHAPE}) at the ({CELL})", instruction)
    assert m, instruction
    return scene.replace(None, Obj(m[1], m[2], CELL_NAMES.index(m[3])))


def test_edits_respect_their_constraints():
    rng = np.random.default_rng(7)
    held = parse_holdout(HOLDOUT)
    kinds = set()
    for _ in range(1500):
        scene = random_scene(rng, holdout=held, split="train")
        instruction, new = random_edit(scene, rng, holdout=held, split="train")
        kind = instruction.split()[0]
        kinds.add(kind)
        assert new.is_valid(), (scene, instruction)  # never empty, never > 3, no shared cell or pair
        assert apply_edit(scene, instruction) == new
        assert not new.pairs & held
        if kind == "move":
            target = CELL_NAMES.index(instruction.split(" to the ")[1])
            assert target not in scene.cells
        if kind == "remove":
            assert len(scene) >= 2
        if kind == "add":
            assert len(scene) <= 2
        if kind == "make":
            assert len(new.pairs - scene.pairs) == 1
    assert kinds == {"make", "move", "remove", "add"}
    for _ in range(300):
        scene = random_scene(rng, holdout=held, split="heldout")
        _, new = random_edit(scene, rng, holdout=held, split="heldout")
        assert new.pairs & held


def test_set_tasks_changes_what_a_running_stream_draws():
    world = ShapesWorld(seed=3, tasks={"t2i": 1.0, "edit": 1.0})
    stream = world.documents(0, 1)
    assert {next(stream).task for _ in range(40)} == {"t2i", "edit"}
    world.set_tasks({"caption": 1.0})
    assert {next(stream).task for _ in range(20)} == {"caption"}
    with pytest.raises(ValueError, match="unknown task"):
        world.set_tasks({"captions": 1.0})


def test_answers_described_first_say_the_caption_then_the_answer():
    plain = ShapesWorld(seed=3, tasks={"vqa": 1.0})
    described = ShapesWorld(seed=3, tasks={"vqa": 1.0}, describe_first=True)
    for _ in range(20):
        a, b = plain.document("vqa", np.random.default_rng(_)), described.document("vqa", np.random.default_rng(_))
        assert a.meta == b.meta and a.segments[1].text == b.segments[1].text  # the same question and answer
        assert b.segments[2].text == f"{caption(b.meta['scenes'][0])}: {a.meta['answer']}"
        assert a.segments[2].text == a.meta["answer"]


def test_questions_and_answers():
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(1500):
        scene = random_scene(rng)
        question, answer = random_question(scene, rng)
        if m := re.fullmatch(rf"what color is the ({SHAPE})\?", question):
            matches = [o for o in scene if o.shape == m[1]]
            assert len(matches) == 1 and answer == matches[0].color
            seen.add("color")
        elif question == "how many shapes are there?":
            assert answer == ("one", "two", "three")[len(scene) - 1]
            seen.add("count")
        elif m := re.fullmatch(rf"where is the ({COLOR}) ({SHAPE})\?", question):
            obj = next(o for o in scene if o.name == f"{m[1]} {m[2]}")
            assert answer == CELL_NAMES[obj.cell]
            seen.add("where")
        else:
            m = re.fullmatch(rf"what shape is at the ({CELL})\?", question)
            assert m, question
            obj = scene.at(CELL_NAMES.index(m[1]))
            assert answer == (obj.shape if obj else "nothing")
            seen.add("what-nothing" if obj is None else "what")
    assert seen == {"color", "count", "where", "what", "what-nothing"}


def _question_kinds(world: ShapesWorld, n: int) -> dict[str, int]:
    rng, kinds = np.random.default_rng(5), {}
    for _ in range(n):
        q = world.document("vqa", rng).meta["question"]
        kind = "color" if q.startswith("what color") else "count" if q.startswith("how many") else \
            "where" if q.startswith("where") else "what"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_question_kinds_follow_their_weights():
    uniform = _question_kinds(ShapesWorld(seed=2), 2000)
    assert all(400 < uniform[k] < 600 for k in ("count", "where", "what"))  # color: only of a unique shape
    weighted = _question_kinds(ShapesWorld(seed=2, questions={"where": 3.0, "count": 1.0}), 2000)
    assert set(weighted) == {"where", "count"} and 0.70 < weighted["where"] / 2000 < 0.80
    only_color = _question_kinds(ShapesWorld(seed=2, questions={"color": 1.0}), 300)  # else uniform among the rest
    assert only_color["color"] > 250 and sum(only_color.values()) == 300
    for bad, says in (({"why": 1.0}, "why is none of them"), ({"where": -1.0}, ">= 0"), ({"where": 0.0}, "above 0")):
        with pytest.raises(ValueError, match=re.escape(says)):
            ShapesWorld(questions=bad)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown task"):
        ShapesWorld(tasks={"t2v": 1.0})
    with pytest.raises(ValueError, match="holdout entry"):
        ShapesWorld(holdout=["pink circle"])
    with pytest.raises(ValueError, match="needs a non-empty holdout"):
        ShapesWorld(split="heldout")
    with pytest.raises(ValueError, match="too small"):
        ShapesWorld(size=8)
    with pytest.raises(ValueError, match="split"):
        ShapesWorld(split="test")
    with pytest.raises(ValueError, match="unknown task"):
        ShapesWorld().document("t2v", np.random.default_rng(0))


def test_rendering_is_fast():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    start = time.perf_counter()
    for scene in scenes:
        render(scene, 32, rng)
    assert time.perf_counter() - start < 2.0  # about 0.1 s on one core: thousands of scenes per second
