"""The shapes world: an endless, exactly scorable source of scenes of colored shapes.

This module follows `specs/shapes-world.md` to the letter: a scene is 1 to 3 objects
(color, shape, cell) on a white canvas split into a 3x3 grid; no two objects share a
cell or a (color, shape) pair. Every task (t2i, caption, vqa, edit, story, text) is
generated from scenes, so every image has a known answer (`anymodal.evaluate.shapes`
reads images back into scenes).

Rendering is fast: each shape's anti-aliased coverage (4x4 supersampling) is computed
once per (size, shape, sub-pixel offset) and cached; positions are quantised to a
quarter pixel, so a render is a few small alpha blends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from .document import TASKS, Document, Image, Text
from .images import pixels_from_array
from .sources import Source, shard_count

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 50, 190),
    "cyan": (20, 190, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CELL_NAMES: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND = (255, 255, 255)
MAX_OBJECTS = 3
BOX = 0.25  # bounding box side, as a fraction of the canvas side
JITTER = 0.03  # largest offset of a box from its cell center, as a fraction of the canvas side
MIN_SIZE = 24  # below this the checker cannot tell the shapes apart
SUPERSAMPLE = 4  # sub-pixel grid for anti-aliasing and for quantising positions

PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
EDIT_KINDS = ("recolor", "move", "remove", "add")
QUESTION_KINDS = ("color", "count", "where", "what")
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True, order=True)
class Obj:
    """One object: a color name, a shape name and a cell index 0..8 (row-major)."""

    color: str
    shape: str
    cell: int

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        if not 0 <= self.cell < 9:
            raise ValueError(f"cell={self.cell} must be in 0..8 (row-major over the 3x3 grid)")

    @property
    def pair(self) -> tuple[str, str]:
        return self.color, self.shape

    @property
    def name(self) -> str:
        """`{color} {shape}`: names the object in its scene."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A set of objects, held sorted by (cell, color, shape) so equality is order-free.

    A Scene read back from a generated image may break the world's rules (no objects,
    two in one cell, ...); `is_valid` tells. Jitter is not part of a scene: it belongs
    to one rendering of it.
    """

    objects: tuple[Obj, ...] = field(default=())

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.objects, key=lambda o: (o.cell, o.color, o.shape)))
        object.__setattr__(self, "objects", ordered)

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self) -> Iterator[Obj]:
        return iter(self.objects)

    @property
    def cells(self) -> set[int]:
        return {o.cell for o in self.objects}

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {o.pair for o in self.objects}

    def at(self, cell: int) -> Obj | None:
        """The object at `cell`, or None."""
        return next((o for o in self.objects if o.cell == cell), None)

    def is_valid(self, max_objects: int = MAX_OBJECTS) -> bool:
        """1..max_objects objects, no shared cell, no shared (color, shape) pair."""
        n = len(self.objects)
        return 1 <= n <= max_objects and len(self.cells) == n and len(self.pairs) == n

    def replace(self, old: Obj | None, new: Obj | None) -> Scene:
        """A copy with `old` removed (if given) and `new` added (if given)."""
        objects = [o for o in self.objects if o != old]
        return Scene(tuple(objects) + ((new,) if new is not None else ()))


# ---------------------------------------------------------------------------------------------
# Holdout and scene sampling


def parse_holdout(holdout: Iterable[str] | None) -> frozenset[tuple[str, str]]:
    """["red circle", ...] -> {("red", "circle"), ...}, checking every name."""
    pairs = set()
    for item in holdout or ():
        parts = item.split()
        if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
            raise ValueError(
                f"holdout entry {item!r} is not a '{{color}} {{shape}}' pair such as 'red circle'; "
                f"colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}"
            )
        pairs.add((parts[0], parts[1]))
    return frozenset(pairs)


def split_allows(scene: Scene, holdout: frozenset[tuple[str, str]], split: str) -> bool:
    """Whether `scene` belongs to `split`: train shows no held-out pair, heldout at least one."""
    if split == "train":
        return not (scene.pairs & holdout)
    if split == "heldout":
        return bool(scene.pairs & holdout)
    return True


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _pick_weighted(rng: np.random.Generator, items: Sequence, cum_weights: np.ndarray):
    """One of `items`, drawn by their cumulative probabilities `cum_weights` (ending at 1)."""
    return items[min(int(np.searchsorted(cum_weights, rng.random(), side="right")), len(items) - 1)]


def random_scene(
    rng: np.random.Generator,
    max_objects: int = MAX_OBJECTS,
    holdout: frozenset[tuple[str, str]] | Iterable[str] = frozenset(),
    split: str = "all",
    min_objects: int = 1,
) -> Scene:
    """A uniformly drawn number of objects in distinct cells with distinct (color, shape) pairs.

    split="train" never uses a held-out pair; split="heldout" always uses at least one.
    """
    holdout = holdout if isinstance(holdout, frozenset) else parse_holdout(holdout)
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    if split == "train":
        allowed = [p for p in PAIRS if p not in holdout]
        chosen = [allowed[i] for i in rng.choice(len(allowed), size=n, replace=False)]
    elif split == "heldout":
        held = sorted(holdout)
        first = _pick(rng, held)
        rest = [p for p in PAIRS if p != first]
        chosen = [first] + [rest[i] for i in rng.choice(len(rest), size=n - 1, replace=False)]
    else:
        chosen = [PAIRS[i] for i in rng.choice(len(PAIRS), size=n, replace=False)]
    return Scene(tuple(Obj(c, s, int(cell)) for (c, s), cell in zip(chosen, cells)))


# ---------------------------------------------------------------------------------------------
# Rendering


def _inside(shape: str, u: np.ndarray, v: np.ndarray, w: float) -> np.ndarray:
    """Whether box coordinates (u right, v down, box [0, w]^2) fall inside `shape`."""
    in_box = (u >= 0) & (u <= w) & (v >= 0) & (v <= w)
    if shape == "square":
        return in_box
    if shape == "circle":
        return (u - w / 2) ** 2 + (v - w / 2) ** 2 <= (w / 2) ** 2
    # isosceles triangle: apex at the top center, base along the bottom edge
    return in_box & (np.abs(u - w / 2) <= v / 2)


@cache
def _coverage(size: int, shape: str, qx: int, qy: int) -> np.ndarray:
    """Anti-aliased coverage (n, n, 1) float32 of a shape whose box starts at (qx, qy)/SUPERSAMPLE px."""
    k = SUPERSAMPLE
    w = BOX * size
    n = math.ceil(w + (k - 1) / k)
    t = (np.arange(n * k) + 0.5) / k  # sample positions in pixels from the patch origin
    u = t[None, :] - qx / k
    v = t[:, None] - qy / k
    cover = _inside(shape, u, v, w).reshape(n, k, n, k).mean(axis=(1, 3)).astype(np.float32)
    cover.setflags(write=False)
    return cover[:, :, None]


def cell_center(cell: int, size: int) -> tuple[float, float]:
    """(x, y) pixel center of `cell` on a size x size canvas."""
    row, col = divmod(cell, 3)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def random_jitter(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, 2) offsets in pixels, at most JITTER * size after quantisation to the sub-pixel grid."""
    limit = JITTER * size - 0.5 / SUPERSAMPLE
    return rng.uniform(-limit, limit, size=(n, 2))


def render(
    scene: Scene, size: int = 32, jitter: np.random.Generator | np.ndarray | None = None
) -> np.ndarray:
    """Draw `scene` as uint8 (size, size, 3) RGB.

    jitter: a generator (offsets drawn with `random_jitter`), an (n_objects, 2) array of
    (x, y) pixel offsets in the scene's object order, or None (every box on its cell center).
    """
    if isinstance(jitter, np.random.Generator):
        jitter = random_jitter(jitter, len(scene.objects), size)
    canvas = np.full((size, size, 3), 255.0, dtype=np.float32)  # (S, S, 3)
    k = SUPERSAMPLE
    half = BOX * size / 2
    for i, obj in enumerate(scene.objects):
        cx, cy = cell_center(obj.cell, size)
        if jitter is not None:
            cx, cy = cx + float(jitter[i][0]), cy + float(jitter[i][1])
        x0, y0 = round((cx - half) * k), round((cy - half) * k)  # box origin in sub-pixels
        px, qx = divmod(x0, k)
        py, qy = divmod(y0, k)
        alpha = _coverage(size, obj.shape, qx, qy)  # (n, n, 1)
        n = alpha.shape[0]
        ys, xs = slice(max(py, 0), min(py + n, size)), slice(max(px, 0), min(px + n, size))
        a = alpha[ys.start - py : ys.stop - py, xs.start - px : xs.stop - px]
        region = canvas[ys, xs]
        region += a * (np.asarray(COLORS[obj.color], dtype=np.float32) - region)
    return np.rint(canvas).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Text


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """The canonical caption: `a red circle at the top left and a blue square at the center`."""
    return _join([f"a {o.color} {o.shape} at the {CELL_NAMES[o.cell]}" for o in scene.objects])


def random_edit(
    scene: Scene,
    rng: np.random.Generator,
    max_objects: int = MAX_OBJECTS,
    holdout: frozenset[tuple[str, str]] = frozenset(),
    split: str = "all",
) -> tuple[str, Scene]:
    """(instruction, edited scene) for a recolor, move, remove or add edit.

    The kind is drawn uniformly among those that keep the scene valid and within `split`
    (train: creates no held-out pair; heldout: keeps at least one).
    """
    options: dict[str, list] = {}
    taken_pairs = scene.pairs
    empty = [c for c in range(9) if c not in scene.cells]

    def ok(new: Scene) -> bool:
        return split_allows(new, holdout, split)

    options["recolor"] = [
        (o, c)
        for o in scene.objects
        for c in COLORS
        if c != o.color and (c, o.shape) not in taken_pairs and ok(scene.replace(o, Obj(c, o.shape, o.cell)))
    ]
    options["move"] = [(o, c) for o in scene.objects for c in empty]
    if len(scene) > 1:
        options["remove"] = [o for o in scene.objects if ok(scene.replace(o, None))]
    if len(scene) < max_objects and empty:
        new_pairs = [p for p in PAIRS if p not in taken_pairs and (split != "train" or p not in holdout)]
        if new_pairs:
            options["add"] = new_pairs
    kinds = [k for k in EDIT_KINDS if options.get(k)]
    kind = _pick(rng, kinds)
    if kind == "recolor":
        o, c = _pick(rng, options["recolor"])
        return f"make the {o.name} {c}", scene.replace(o, Obj(c, o.shape, o.cell))
    if kind == "move":
        o, c = _pick(rng, options["move"])
        return f"move the {o.name} to the {CELL_NAMES[c]}", scene.replace(o, Obj(o.color, o.shape, c))
    if kind == "remove":
        o = _pick(rng, options["remove"])
        return f"remove the {o.name}", scene.replace(o, None)
    (c, s), cell = _pick(rng, options["add"]), _pick(rng, empty)
    return f"add a {c} {s} at the {CELL_NAMES[cell]}", scene.replace(None, Obj(c, s, cell))


def random_question(scene: Scene, rng: np.random.Generator,
                    weights: dict[str, float] | None = None) -> tuple[str, str]:
    """(question, answer) of one of the four kinds (QUESTION_KINDS), drawn among those that apply: uniformly, or
    in proportion to `weights` (kind -> weight; a kind left out is never asked).

    `what color` is asked only of a shape that is unique in the scene; `what shape` asks of
    an occupied or an empty cell with equal chance.
    """
    shape_counts: dict[str, int] = {}
    for o in scene.objects:
        shape_counts[o.shape] = shape_counts.get(o.shape, 0) + 1
    unique = [o for o in scene.objects if shape_counts[o.shape] == 1]
    kinds = [k for k in QUESTION_KINDS if k != "color" or unique]
    w = np.array([weights.get(k, 0.0) for k in kinds]) if weights is not None else None
    if w is None or w.sum() == 0:  # uniformly, also where none of the kinds that apply is weighted
        kind = _pick(rng, kinds)
    else:
        kind = _pick_weighted(rng, kinds, np.cumsum(w / w.sum()))
    if kind == "color":
        o = _pick(rng, unique)
        return f"what color is the {o.shape}?", o.color
    if kind == "count":
        return "how many shapes are there?", NUMBERS[len(scene)]
    if kind == "where":
        o = _pick(rng, scene.objects)
        return f"where is the {o.name}?", CELL_NAMES[o.cell]
    empty = [c for c in range(9) if c not in scene.cells]
    if empty and rng.random() < 0.5:
        return f"what shape is at the {CELL_NAMES[_pick(rng, empty)]}?", "nothing"
    o = _pick(rng, scene.objects)
    return f"what shape is at the {CELL_NAMES[o.cell]}?", o.shape


def task_mix(tasks: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    """The tasks of a mix of ratios (None: all equal) and their cumulative probabilities; refuses an unknown task
    or ratios that are negative or sum to 0, in one sentence."""
    tasks = {t: 1.0 for t in TASKS} if tasks is None else dict(tasks)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} in tasks; expected keys among {', '.join(TASKS)}")
    if any(r < 0 for r in tasks.values()) or sum(tasks.values()) <= 0:
        raise ValueError(f"tasks={tasks} needs non-negative ratios with a positive sum")
    names = [t for t in TASKS if tasks.get(t, 0) > 0]
    weights = np.array([tasks[t] for t in names], dtype=np.float64)
    return names, np.cumsum(weights / weights.sum())


# ---------------------------------------------------------------------------------------------
# The source


class ShapesWorld(Source):
    """Documents of every task drawn from random scenes, endless and reproducible from `seed`.

    Args:
        size: Canvas side in pixels (32 by default; 64 works too; at least 24).
        seed: Seeds every draw; each DataLoader worker derives its own stream from it.
        tasks: Ratios over t2i, caption, vqa, edit, story, text (None: all equal; a missing task: 0).
        holdout: (color, shape) pairs such as "red circle" held out from training.
        split: "train" never shows a held-out pair; "heldout" shows one in every scene; "all" anything.
        max_objects: Most objects per scene (1..3).
        length: Documents per epoch over all workers (None: endless).
        holdout_text: Text-only documents of the train split may name held-out pairs: they show no image, so the
            pairs stay unseen as pictures but are known as words (without it a caption of an unseen pair must
            produce a phrase the model never read).
        describe_first: A question's answer first says what the image shows, then answers: "{caption}: {answer}"
            (`final_answer` reads the answer back). The caption is the part of the scene the model reads best.
        questions: Weights of the question kinds (`color`, `count`, `where`, `what`) of vqa documents (None: all
            equal among the kinds a scene allows).
    """

    def __init__(
        self,
        size: int = 32,
        seed: int = 0,
        tasks: dict[str, float] | None = None,
        holdout: list[str] | None = None,
        split: str = "train",
        max_objects: int = MAX_OBJECTS,
        length: int | None = None,
        holdout_text: bool = False,
        describe_first: bool = False,
        questions: dict[str, float] | None = None,
    ) -> None:
        super().__init__(seed=seed, length=length)
        if size < MIN_SIZE:
            raise ValueError(
                f"size={size} is too small for the shapes world; use 32 or 64 (at least {MIN_SIZE})"
            )
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects={max_objects} must be in 1..{MAX_OBJECTS}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
        self.size = size
        self.max_objects = max_objects
        self.split = split
        self.holdout = parse_holdout(holdout)
        self.holdout_text = holdout_text
        self.describe_first = describe_first
        if questions is not None:
            unknown = sorted(set(questions) - set(QUESTION_KINDS))
            if unknown or any(float(v) < 0 for v in questions.values()) or not any(float(v) > 0 for v in questions.values()):
                raise ValueError(f"questions={questions} must weigh the kinds {', '.join(QUESTION_KINDS)} with numbers "
                                 f">= 0, at least one above 0" + (f" ({', '.join(unknown)} is none of them)" if unknown else ""))
        self.questions = None if questions is None else {k: float(v) for k, v in questions.items()}
        if split == "heldout" and not self.holdout:
            raise ValueError("split='heldout' needs a non-empty holdout list such as ['red circle']")
        if split == "train" and len(PAIRS) - len(self.holdout) < max_objects:
            raise ValueError(
                f"holdout leaves fewer than max_objects={max_objects} pairs to train on; hold out fewer"
            )
        self.set_tasks(tasks)

    def set_tasks(self, tasks: dict[str, float] | None) -> None:
        """The task mix of the documents drawn from now on (None: all equal); a stream already running follows it."""
        self.tasks, self.cum_weights = task_mix(tasks)


    @property
    def image_size(self) -> int:
        """Side of the images this source yields, in pixels."""
        return self.size
    def documents(self, shard: int, num_shards: int) -> Iterator[Document]:
        rng = self.rng(shard)
        count = shard_count(self.length, shard, num_shards)
        i = 0
        while count is None or i < count:
            yield self.document(_pick_weighted(rng, self.tasks, self.cum_weights), rng)
            i += 1

    # -- building blocks ------------------------------------------------------------------------

    def scene(self, rng: np.random.Generator) -> Scene:
        return random_scene(rng, self.max_objects, self.holdout, self.split)

    def edit(self, scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
        return random_edit(scene, rng, self.max_objects, self.holdout, self.split)

    def image(self, scene: Scene, rng: np.random.Generator) -> Image:
        return Image(pixels=pixels_from_array(render(scene, self.size, rng)))  # (3, S, S)

    def document(self, task: str, rng: np.random.Generator) -> Document:
        """One document of `task` drawn with `rng`."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if task == "text" and self.holdout_text and self.split == "train":  # words only: every pair may appear
            scene = random_scene(rng, self.max_objects, self.holdout, "all")
        else:
            scene = self.scene(rng)
        meta: dict = {}
        if task == "t2i":
            segments = [Text(caption(scene)), self.image(scene, rng)]
            scenes = [scene]
        elif task == "caption":
            segments = [self.image(scene, rng), Text(caption(scene))]
            scenes = [scene]
        elif task == "text":
            segments, scenes = [Text(caption(scene))], []
            meta["scene"] = scene
        elif task == "vqa":
            question, answer = random_question(scene, rng, self.questions)
            said = f"{caption(scene)}: {answer}" if self.describe_first else answer
            segments = [self.image(scene, rng), Text(question), Text(said)]
            scenes = [scene]
            meta.update(question=question, answer=answer)
        elif task == "edit":
            instruction, target = self.edit(scene, rng)
            segments = [self.image(scene, rng), Text(instruction), self.image(target, rng)]
            scenes = [scene, target]
            meta["instruction"] = instruction
        else:  # story
            n_images = int(rng.integers(2, 5))
            segments = [Text(caption(scene) + "."), self.image(scene, rng)]
            scenes, edits = [scene], []
            for k in range(n_images - 1):  # the last edit says so: the story ends after its image
                instruction, scene = self.edit(scene, rng)
                word = "finally" if k == n_images - 2 else "then"
                segments += [Text(f"{word} {instruction}."), self.image(scene, rng)]
                scenes.append(scene)
                edits.append(instruction)
            meta["edits"] = edits
        shown = scenes or [meta["scene"]]
        meta["scenes"] = scenes
        meta["heldout"] = any(s.pairs & self.holdout for s in shown)
        return Document(segments=segments, task=task, meta=meta)
