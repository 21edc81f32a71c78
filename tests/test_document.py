"""The Document schema: valid documents build, every invalid case raises."""

import pytest
import torch

from anymodal.data.document import TASKS, Document, Image, Text


def test_valid_documents_of_every_kind():
    pixels = torch.rand(3, 8, 8)
    codes = torch.randint(0, 16, (4, 4))
    latents = torch.randn(4, 2, 2)
    for task in TASKS:
        doc = Document([Text("a red circle"), Image(pixels=pixels), Text("then more")], task=task)
        assert doc.task == task
    doc = Document(
        [Image(codes=codes), Text("x"), Image(latents=latents), Image(pixels=pixels, codes=codes)],
        task="story",
        meta={"heldout": False},
    )
    assert [type(s) for s in doc.segments] == [Image, Text, Image, Image]
    assert len(doc.images) == 3 and len(doc.texts) == 1
    assert doc.images[1].latents is latents and doc.texts[0].text == "x"
    assert Document([Text("just text")]).task == "text"
    assert Document([Text("")]).meta == {}


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: Text(3), TypeError),
        (lambda: Image(), ValueError),
        (lambda: Image(pixels=torch.rand(8, 8)), ValueError),
        (lambda: Image(pixels=torch.rand(1, 8, 8)), ValueError),
        (lambda: Image(pixels=torch.zeros(3, 8, 8, dtype=torch.uint8)), ValueError),
        (lambda: Image(codes=torch.zeros(16, dtype=torch.long)), ValueError),
        (lambda: Image(latents=torch.zeros(4, 4)), ValueError),
        (lambda: Document([]), ValueError),
        (lambda: Document([Text("a")], task="translate"), ValueError),
        (lambda: Document(["a plain string"]), TypeError),
        (lambda: Document([Text("a"), torch.rand(3, 8, 8)]), TypeError),
    ],
    ids=[
        "text-not-str",
        "image-empty",
        "pixels-2d",
        "pixels-1-channel",
        "pixels-uint8",
        "codes-1d",
        "latents-2d",
        "no-segments",
        "unknown-task",
        "str-segment",
        "tensor-segment",
    ],
)
def test_invalid_cases_raise(build, error):
    with pytest.raises(error):
        build()
