"""`anymodal serve`: the web app in a real browser (Debian's chromium driven by Playwright) and through
gradio_client, on tiny bundles made here. Screenshots go to pytest's tmp folder (screenshots0/); the
README's docs/app.png comes from benchmarks/serve_latency.py on the demo bundles."""

from __future__ import annotations

import shlex
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from conftest import TEXT_TOKENIZER
from PIL import Image as PILImage

from anymodal.app.settings import ServeSettings
from anymodal.app.web import launch, load_pipelines
from anymodal.checkpoint import load_bundle, save_bundle
from anymodal.commands.cli import build_parser, main
from anymodal.commands.generate import image_sampling
from anymodal.generate.settings import KEEP_SOURCE, ImageSampling
from anymodal.generate.tasks import Pipeline

SIZE = {"continuous": 32, "discrete": 12}
SETTINGS = dict(max_images=4, max_steps=30, max_story_images=2)
TIMEOUT_MS = 30_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tokenizer_dirs, tmp_path_factory) -> dict[str, str]:
    """Tiny bundles of both paths, with random heads so that outputs depend on the inputs."""
    from anymodal.systems.unified import UnifiedSystem

    root = tmp_path_factory.mktemp("app_bundles")
    out = {}
    for path in ("continuous", "discrete"):
        torch.manual_seed(0)
        system = UnifiedSystem(text_tokenizer=TEXT_TOKENIZER, image_tokenizer=tokenizer_dirs[path], size="debug",
                               image_size=SIZE[path], warmup_steps=2, ema_decay=0.0)
        system.configure_model()
        model = system.sampling_model()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.2)
            if path == "continuous":
                model.patch_out.weight.copy_(torch.randn(model.patch_out.weight.shape, generator=gen) * 0.05)
        out[path] = str(save_bundle(root / path, model, system.text, system.image_tokenizer,
                                    system.objective.config()))
    return out


@pytest.fixture(scope="module")
def server(folders):
    demo = launch(load_pipelines([folders["continuous"], folders["discrete"]]),
                  ServeSettings(port=_free_port(), **SETTINGS), block=False)
    yield demo.local_url.rstrip("/")
    demo.close()


@pytest.fixture(scope="module")
def slow(folders):
    """A server whose bundle sleeps 50 ms per denoising step (to watch progress and the queue), with two
    places in its queue; yields its URL and the (start, end) of every text-to-image call."""
    spans = []

    class Slow(Pipeline):
        def text_to_image(self, *args, on_step=None, **kwargs):
            def step(done: int, total: int) -> None:
                time.sleep(0.05)
                on_step(done, total)

            start = time.perf_counter()
            try:
                return super().text_to_image(*args, on_step=step, **kwargs)
            finally:
                spans.append((start, time.perf_counter()))

    demo = launch({"slow": Slow(load_bundle(folders["continuous"]))}, ServeSettings(port=_free_port(), queue_size=2),
                  block=False)
    yield demo.local_url.rstrip("/"), spans
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("app_images")
    red = root / "red.png"
    PILImage.new("RGB", (48, 48), (200, 30, 30)).save(red)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    huge = root / "huge.png"  # 9000 x 9000 pixels in its header, a few KB on disk
    PILImage.new("1", (9000, 9000)).save(huge)
    return {"red": str(red), "corrupt": str(corrupt), "huge": str(huge)}


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the browser tests need Debian's chromium (`make install` installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


# ---------------------------------------------------------------------------------------------- browser
def command_line(page, start: str) -> str:
    """Wait until a "same on the command line" box holds a line that starts with `start`; that line."""
    return page.wait_for_function(
        "start => [...document.querySelectorAll('.command textarea')].map(e => e.value)"
        ".find(v => v.startsWith(start)) || null", arg=start).json_value()


def test_a_prompt_typed_in_the_page_gives_an_image_and_its_command_line(page, shots):
    page.get_by_label("prompt").fill("a red circle at the center.")
    page.get_by_role("button", name="generate").click()
    image = page.locator("#t2i-images img").first
    image.wait_for(state="visible")
    line = command_line(page, "anymodal generate t2i")
    assert "--prompt 'a red circle at the center.'" in line
    assert f"--steps {ImageSampling().steps}" in line  # the default, shown with the result
    page.screenshot(path=shots / "t2i.png", full_page=True)


def test_the_page_shows_progress_per_denoising_step(browser, slow, shots):
    page = browser.new_page()
    page.goto(slow[0])
    page.get_by_label("prompt").fill("a red circle.")
    page.get_by_role("button", name="generate").click()
    page.get_by_text("denoising").first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=shots / "progress.png")
    page.locator("#t2i-images img").first.wait_for(timeout=TIMEOUT_MS)
    page.close()


def test_an_uploaded_png_gets_a_caption(page, images, shots):
    page.get_by_role("tab", name="caption").click()
    page.locator("#caption-image input[type=file]").set_input_files(images["red"])
    page.get_by_role("button", name="caption", exact=True).click()
    caption = page.locator("#caption-text textarea")
    page.wait_for_function("el => el.value.length > 0", arg=caption.element_handle())
    command_line(page, "anymodal generate caption")
    page.screenshot(path=shots / "caption.png", full_page=True)


def test_a_corrupt_upload_shows_one_sentence_and_the_server_goes_on(page, images, shots):
    page.get_by_role("tab", name="caption").click()
    page.locator("#caption-image input[type=file]").set_input_files(images["corrupt"])
    page.get_by_role("button", name="caption", exact=True).click()
    message = page.get_by_text("image file corrupt.png has a corrupt header")
    message.first.wait_for()
    assert "Traceback" not in page.content() and "/tmp/" not in message.first.inner_text()
    page.screenshot(path=shots / "corrupt.png", full_page=True)
    # the same page, a good image: served as before
    page.get_by_role("button", name="Remove Image").click()
    page.locator("#caption-image input[type=file]").set_input_files(images["red"])
    page.get_by_role("button", name="caption", exact=True).click()
    caption = page.locator("#caption-text textarea")
    page.wait_for_function("el => el.value.length > 0", arg=caption.element_handle())


def test_a_story_is_written_into_the_page(page, shots):
    page.get_by_role("tab", name="story").click()
    page.get_by_label("how the story starts").fill("a red circle at the center.")
    page.get_by_role("button", name="write").click()
    command_line(page, "anymodal generate story")  # the story is done
    assert page.locator("#story p").first.inner_text() == "a red circle at the center."
    page.screenshot(path=shots / "story.png", full_page=True)


# ---------------------------------------------------------------------------------------------- API
def test_the_api_gives_what_the_requests_give(client, folders, images):
    from gradio_client import handle_file

    gallery, records, lines = client.predict("continuous", "a blue square.", 2, 3, 2.0, 5, api_name="/text_to_image")
    assert len(gallery) == 2 and [r["seed"] for r in records] == [5, 6]
    assert records[0]["steps"] == 3 and records[0]["guidance"] == 2.0
    line = lines.splitlines()[1]
    ns = build_parser().parse_args(shlex.split(line)[1:])
    assert ns.seed == 6 and ns.checkpoint == folders["continuous"]
    assert image_sampling(ns) == ImageSampling(steps=3, guidance=2.0)
    # the page's image is the one `anymodal generate` makes with that line
    direct = Pipeline(load_bundle(folders["continuous"])).text_to_image(["a blue square."], [6], ImageSampling(3, 2.0))
    # the same numbers up to a rounding level: the page samples both seeds in one batch, and CPU kernels may
    # block a batch of two differently from one (seen on an AVX2-only EPYC)
    diff = np.abs(direct[0].astype(int) - _pixels(gallery[1]["image"]).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())

    edited, record, line = client.predict("discrete", handle_file(images["red"]), "make it blue.", 2, 3.0, 1.5, 0,
                                          api_name="/edit")
    assert _pixels(edited).shape == (SIZE["discrete"], SIZE["discrete"], 3)
    assert record["image"] == "red.png" and record["image_guidance"] == 1.5
    assert line.startswith("anymodal generate edit --checkpoint") and "--image red.png" in line
    assert record["keep_source"] == KEEP_SOURCE["discrete"] and "--keep-source 3.0" in line  # left empty: the path's
    _, record, line = client.predict("discrete", handle_file(images["red"]), "make it blue.", 2, 3.0, 1.5, 0,
                                     "as trained", 0, api_name="/edit")
    assert record["keep_source"] == 0 and "--keep-source 0.0" in line
    text, record, line = client.predict("continuous", handle_file(images["red"]), "how many?", 0, api_name="/answer")
    assert record["answer"] == text and "--question 'how many?'" in line


def test_the_decoding_of_a_discrete_bundle_is_chosen_on_the_page(client):
    """Left unset, the calls above decode as the bundle was trained; asked for, one code per forward is on the
    record, and parallel steps from a bundle trained without parallel images are one sentence."""
    from gradio_client.exceptions import AppError

    _, records, _ = client.predict("discrete", "a red circle.", 1, 3, 3.0, 0, "one code per forward",
                                   api_name="/text_to_image")
    assert records[0]["parallel_steps"] is None  # autoregressive: the only way this bundle decodes
    with pytest.raises(AppError) as error:
        client.predict("discrete", "a red circle.", 1, 3, 3.0, 0, "4 parallel steps", api_name="/text_to_image")
    assert "trained without parallel_images" in str(error.value) and "Traceback" not in str(error.value)
    with pytest.raises(AppError, match="is not in the list of choices"):
        client.predict("discrete", "a red circle.", 1, 3, 3.0, 0, "fast please", api_name="/text_to_image")


def test_a_story_streams_through_the_api(client):
    job = client.submit("continuous", "a red circle.", 1, 2, 3.0, 0, api_name="/story")
    html, record, line = job.result()
    assert record["max_images"] == 1 and line.startswith("anymodal generate story")
    assert len(job.outputs()) > 1  # the opening piece arrived before the whole story
    assert html.count("<img") <= 1 and "<p>a red circle.</p>" in html


@pytest.mark.parametrize("call, message", [
    (("caption", "corrupt", 0), "image file corrupt.png has a corrupt header"),
    (("caption", "huge", 0), "huge.png claims 9000x9000 pixels in its header"),
    (("text_to_image", "a red circle. " * 400, 1, 3, 3.0, 0), "the prompt is"),
    (("text_to_image", "a red circle.", 50, 3, 3.0, 0), "greater than maximum value 4"),
    (("text_to_image", "a red circle.", 1, 500, 3.0, 0), "greater than maximum value 30"),
])
def test_bad_input_gets_one_sentence_and_the_server_goes_on(client, images, call, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    name, *args = call
    if name == "caption":
        args[0] = handle_file(images[args[0]])
    with pytest.raises(AppError) as error:
        client.predict("continuous", *args, api_name=f"/{name}")
    assert message in str(error.value) and "Traceback" not in str(error.value)
    text, _, _ = client.predict("continuous", handle_file(images["red"]), 0, api_name="/caption")
    assert isinstance(text, str)


def test_the_queue_samples_one_request_at_a_time_and_refuses_past_its_size(slow):
    """Concurrency 1, two places in the queue: of four requests sent at once, no two sample together and
    at least one is refused with a message."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    url, spans = slow
    client, earlier = Client(url, verbose=False), len(spans)
    jobs = [client.submit("slow", "a red circle.", 1, 6, 3.0, i, api_name="/text_to_image") for i in range(4)]
    refused = []
    for job in jobs:
        try:
            job.result()
        except (QueueError, AppError) as e:
            refused.append(str(e))
    assert refused and all("Queue is full" in r for r in refused), refused
    ours = sorted(spans[earlier:])
    assert len(ours) == 4 - len(refused)
    assert all(b[0] >= a[1] for a, b in zip(ours, ours[1:]))  # never two at once


# ---------------------------------------------------------------------------------------------- command
def test_serve_refuses_a_folder_that_is_not_a_bundle_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith("anymodal serve: error:")


def test_serve_binds_to_localhost_unless_told(server, folders):
    ns = build_parser().parse_args(["serve", "--checkpoint", folders["continuous"]])
    assert ns.host == ServeSettings().host == "127.0.0.1" and ns.checkpoint == [folders["continuous"]]
    assert server.startswith("http://127.0.0.1:")


def _pixels(path: str) -> np.ndarray:
    return np.asarray(PILImage.open(path).convert("RGB"))
