"""The shapes-world checker: read images and captions back into scenes, and score them.

`parse_image` follows `specs/shapes-world.md` with no model: each pixel takes the
nearest palette color (the six colors or white) when it lies within `tolerance` of it
(anti-aliased edges lie in between and count as neither); pixels of one color form
4-connected components; components under `min_area` of an object's box are noise; a
component's centroid gives its cell.

Its shape comes from its color mass: the summed coverage of its color (each pixel's share
of the way from white to that color, as alpha blending draws it) over the component and its
soft rim, divided by the area of the world's object box (0.25 S squared). A filled square
covers 1 box, a disc pi/4, the triangle 1/2; the thresholds lie at the geometric means
between them. Blur moves mass around but keeps its sum, so decoded images whose corners a
tokenizer rounded are still read right, where the corner test of the mask was not (it read
a quarter of reconstructed squares as circles).

`ShapesScorer` accumulates per-task results, split by a held-out flag, into the spec's
metric table. On ground-truth renders every metric is 1.0 (tests pin this).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from anymodal.data.shapes import BACKGROUND, BOX, CELL_NAMES, COLORS, MAX_OBJECTS, SHAPES, Obj, Scene, caption

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([*COLORS.values(), BACKGROUND], dtype=np.float32)  # (7, 3); index 6 is white

TOLERANCE = 56.0
"""Largest RGB distance from a palette color at which a pixel still takes that color
(the closest pair of colors, blue and cyan, lies 122 apart)."""

MIN_AREA = 0.15
"""Components smaller than this fraction of an object's box area (0.25 S squared) are noise."""

SHAPE_MASS = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
"""Area of each shape in units of its box."""

RIM = 0.1
"""How far (a fraction of S) beyond its component an object's color mass is gathered."""


def _as_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (S, S, 3) or float (3, S, S) in [0, 1] -> float32 (S, S, 3) in 0..255."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, S, S) tensor in [0, 1], got shape {tuple(image.shape)}")
        array = image.detach().float().clamp(0, 1).mul(255).permute(1, 2, 0).cpu().numpy()
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected a uint8 (S, S, 3) array, got shape {array.shape}")
        if array.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 (S, S, 3) array, got dtype {array.dtype}; "
                "pass float images as (3, S, S) tensors in [0, 1]"
            )
        array = array.astype(np.float32)
    if array.shape[0] != array.shape[1]:
        raise ValueError(f"shapes-world images are square, got {array.shape[1]}x{array.shape[0]}")
    return array


def _nearest_palette(array: np.ndarray, tolerance: float) -> np.ndarray:
    """float (S, S, 3) in 0..255 -> (S, S) index into COLORS, 6 for background, -1 where no palette
    color lies within `tolerance`."""
    d2 = ((array[:, :, None, :] - _PALETTE) ** 2).sum(-1)  # (S, S, 7)
    nearest = d2.argmin(-1)
    return np.where(d2.min(-1) <= tolerance**2, nearest, -1)


def classify_shape(mass: float) -> str:
    """The shape whose area (in box units, `SHAPE_MASS`) is nearest `mass` on a log scale."""
    return min(SHAPE_MASS, key=lambda shape: abs(math.log(max(mass, 1e-6) / SHAPE_MASS[shape])))


def color_coverage(array: np.ndarray, color: str, tolerance: float = TOLERANCE) -> np.ndarray:
    """(S, S) float in [0, 1]: how far each pixel of `array` (float (S, S, 3), 0..255) lies from
    white toward `color`; 0 where the pixel is further than `tolerance` from that white-color line."""
    white = np.asarray(BACKGROUND, dtype=np.float32)
    direction = white - np.asarray(COLORS[color], dtype=np.float32)  # (3,)
    alpha = np.clip((white - array) @ direction / (direction @ direction), 0.0, 1.0)  # (S, S)
    off_line = np.linalg.norm(array - (white - alpha[..., None] * direction), axis=-1)
    return np.where(off_line <= tolerance, alpha, 0.0)


def parse_image(
    image: np.ndarray | torch.Tensor, tolerance: float = TOLERANCE, min_area: float = MIN_AREA
) -> Scene:
    """Read an image (uint8 (S, S, 3) or float (3, S, S) in [0, 1]) back into a Scene.

    The result may break the world's rules (e.g. four objects, or none) when the image does.
    """
    array = _as_array(image)  # (S, S, 3)
    labels = _nearest_palette(array, tolerance)  # (S, S)
    size = labels.shape[0]
    box_area = (BOX * size) ** 2
    reach = max(1.0, RIM * size)
    objects = []
    for index, color in enumerate(_COLOR_NAMES):
        components, n = ndimage.label(labels == index)  # 4-connected
        if n == 0:
            continue
        # each pixel not of another color, within reach, belongs to its nearest component of this color
        distance, (iy, ix) = ndimage.distance_transform_edt(components == 0, return_indices=True)
        other_color = (labels >= 0) & (labels < len(_COLOR_NAMES)) & (labels != index)
        rim = (distance <= reach) & ~other_color
        owner = np.where(rim, components[iy, ix], 0)
        masses = ndimage.sum_labels(color_coverage(array, color, tolerance), owner, np.arange(1, n + 1))
        for label, box in enumerate(ndimage.find_objects(components), start=1):
            mask = components[box] == label
            if mask.sum() < min_area * box_area:
                continue
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() + box[1].start + 0.5, ys.mean() + box[0].start + 0.5  # centroid in pixels
            col = min(int(cx * 3 / size), 2)
            row = min(int(cy * 3 / size), 2)
            objects.append(Obj(color, classify_shape(masses[label - 1] / box_area), row * 3 + col))
    return Scene(tuple(objects))


_ITEM = re.compile(
    r"a (?P<color>{}) (?P<shape>{}) at the (?P<cell>{})".format(
        "|".join(COLORS), "|".join(SHAPES), "|".join(sorted(CELL_NAMES, key=len, reverse=True))
    )
)
_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def parse_caption(text: str) -> Scene | None:
    """A caption's scene, in any order of `a {color} {shape} at the {cell}` items joined by
    `, ` and ` and `; None unless every item parses and the scene obeys the world's rules."""
    text = " ".join(text.strip().lower().rstrip(".").split())
    if not text:
        return None
    objects = []
    for item in _SEPARATOR.split(text):
        match = _ITEM.fullmatch(item)
        if match is None:
            return None
        objects.append(Obj(match["color"], match["shape"], CELL_NAMES.index(match["cell"])))
    scene = Scene(tuple(objects))
    return scene if scene.is_valid(MAX_OBJECTS) else None


def final_answer(text: str) -> str:
    """The answer of a reply that describes the image first ("{caption}: {answer}", ShapesWorld's
    `describe_first`): what follows the last colon; a reply without one is all answer."""
    return text.rsplit(":", 1)[-1]


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or final period."""
    return " ".join(text.strip().lower().rstrip(".").split())


METRICS = (
    "t2i_exact", "t2i_object", "t2i_position", "t2i_count",
    "edit_exact", "caption_exact", "vqa_acc", "story_exact",
)  # fmt: skip

EDIT_KINDS = ("recolor", "move", "remove", "add")
"""The world's four edits. `edit_exact` is also kept per kind (`edit_exact_{kind}`, beside METRICS): the kinds
fail differently (a recolor that redraws the object's shape, a removal that leaves the object)."""
KIND_METRICS = tuple(f"edit_exact_{k}" for k in EDIT_KINDS)
TALLIED = METRICS + KIND_METRICS


def table_rows(*tables: dict[str, dict[str, float]]) -> list[tuple[str, str | None]]:
    """(metric, edit kind or None) rows of a printed score table over `tables` (each `ShapesScorer.scores()`):
    METRICS, and under edit_exact each kind of edit that any of them scored."""
    def scored(m: str) -> bool:
        values = [t.get("all", {}).get(m) for t in tables]
        return any(v is not None and v == v for v in values)  # NaN: no edit of that kind

    kinds = [(m, kind) for m, kind in zip(KIND_METRICS, EDIT_KINDS) if scored(m)]
    return [r for m in METRICS for r in ([(m, None), *kinds] if m == "edit_exact" else [(m, None)])]


@dataclass
class _Tally:
    """Sums behind each metric for one group (seen or held-out)."""

    hits: dict[str, float] = field(default_factory=lambda: {m: 0.0 for m in TALLIED})
    totals: dict[str, float] = field(default_factory=lambda: {m: 0.0 for m in TALLIED})

    def add(self, metric: str, hit: float, total: float = 1.0) -> None:
        self.hits[metric] += hit
        self.totals[metric] += total

    def merged(self, other: _Tally) -> _Tally:
        return _Tally(
            {m: self.hits[m] + other.hits[m] for m in self.hits},
            {m: self.totals[m] + other.totals[m] for m in self.totals},
        )


class ShapesScorer:
    """Accumulates shapes-bench results per task and returns the spec's metric table.

    Each `add_*` takes a `heldout` flag (the document's `meta["heldout"]`) and returns
    whether that item was exact. `scores()` gives `{"seen": ..., "heldout": ..., "all": ...}`,
    each a dict of the METRICS and KIND_METRICS (NaN where nothing was added) and the counts `n_t2i`,
    `n_edit`, `n_caption`, `n_vqa`, `n_story`.
    """

    def __init__(self, tolerance: float = TOLERANCE, min_area: float = MIN_AREA) -> None:
        self.tolerance = tolerance
        self.min_area = min_area
        self.reset()

    def reset(self) -> None:
        self._tallies = {"seen": _Tally(), "heldout": _Tally()}

    def parse(self, image: np.ndarray | torch.Tensor) -> Scene:
        return parse_image(image, self.tolerance, self.min_area)

    def read(self, image: np.ndarray | torch.Tensor) -> str:
        """What this checker reads in `image`, as a canonical caption ("no object" when empty)."""
        scene = self.parse(image)
        return caption(scene) if scene.objects else "no object"

    def _tally(self, heldout: bool) -> _Tally:
        return self._tallies["heldout" if heldout else "seen"]

    def add_t2i(self, prompt_scene: Scene, image: np.ndarray | torch.Tensor, heldout: bool = False) -> bool:
        parsed = self.parse(image)
        tally = self._tally(heldout)
        found_pairs = parsed.pairs
        found = set(parsed.objects)
        tally.add("t2i_exact", float(parsed == prompt_scene))
        tally.add("t2i_object", sum(o.pair in found_pairs for o in prompt_scene), len(prompt_scene))
        tally.add("t2i_position", sum(o in found for o in prompt_scene), len(prompt_scene))
        tally.add("t2i_count", float(len(parsed) == len(prompt_scene)))
        return parsed == prompt_scene

    def add_edit(self, target_scene: Scene, image: np.ndarray | torch.Tensor, heldout: bool = False,
                 kind: str | None = None) -> bool:
        """`kind`: one of EDIT_KINDS, to keep the edit's result in its kind's `edit_exact_{kind}` too."""
        if kind is not None and kind not in EDIT_KINDS:
            raise ValueError(f"edit kind {kind!r} is not one of {', '.join(EDIT_KINDS)}")
        exact = self.parse(image) == target_scene
        self._tally(heldout).add("edit_exact", float(exact))
        if kind is not None:
            self._tally(heldout).add(f"edit_exact_{kind}", float(exact))
        return exact

    def add_caption(self, true_scene: Scene, text: str, heldout: bool = False) -> bool:
        exact = parse_caption(text) == true_scene
        self._tally(heldout).add("caption_exact", float(exact))
        return exact

    def add_vqa(self, answer: str, predicted: str, heldout: bool = False) -> bool:
        exact = normalize_answer(final_answer(predicted)) == normalize_answer(answer)
        self._tally(heldout).add("vqa_acc", float(exact))
        return exact

    def add_story(
        self, scenes: Sequence[Scene], images: Sequence[np.ndarray | torch.Tensor], heldout: bool = False
    ) -> bool:
        """A story is exact when it has one image per scene and every image parses to its scene."""
        exact = len(scenes) == len(images) and all(self.parse(i) == s for s, i in zip(scenes, images))
        self._tally(heldout).add("story_exact", float(exact))
        return exact

    def scores(self) -> dict[str, dict[str, float]]:
        groups = dict(self._tallies)
        groups["all"] = groups["seen"].merged(groups["heldout"])
        table = {}
        for name, tally in groups.items():
            row = {m: (tally.hits[m] / tally.totals[m] if tally.totals[m] else float("nan")) for m in TALLIED}
            row.update(
                n_t2i=int(tally.totals["t2i_exact"]),
                n_edit=int(tally.totals["edit_exact"]),
                n_caption=int(tally.totals["caption_exact"]),
                n_vqa=int(tally.totals["vqa_acc"]),
                n_story=int(tally.totals["story_exact"]),
            )
            table[name] = row
        return table
