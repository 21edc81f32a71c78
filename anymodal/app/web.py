"""`anymodal serve`: a Gradio page over one or several loaded bundles, one tab per task.

The handlers only turn page inputs into the typed requests of `anymodal.generate.requests` (what
`anymodal generate` calls) and their outputs into page values: every output comes with its settings
record and the `anymodal generate` line that makes it again. Bad input (a file that is not an image, a
prompt longer than the context, settings the bundle cannot use) reaches the page as the request's one
sentence (`gr.Error`), and the server goes on serving. All sampling shares one queue whose concurrency
is `ServeSettings.concurrency`.

    from anymodal.app.settings import ServeSettings
    from anymodal.app.web import launch, load_pipelines
    launch(load_pipelines(["checkpoints/demo/transfusion"]), ServeSettings(port=7860))
"""

from __future__ import annotations

import base64
import contextvars
import html
import io
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image as PILImage

from anymodal.app.settings import ServeSettings
from anymodal.checkpoint import load_bundle
from anymodal.data.images import MAX_BYTES
from anymodal.generate import requests
from anymodal.generate.settings import IMAGE_GUIDANCE, KEEP_SOURCE, ImageSampling
from anymodal.generate.tasks import Pipeline, StoryStep

IMAGE = ImageSampling()
STORY = requests.Story(prompt="")
DECODING = {"as trained": None, "one code per forward": 0, "4 parallel steps": 4, "8 parallel steps": 8,
            "16 parallel steps": 16}
"""How a discrete bundle decodes an image's codes (`ImageSampling.parallel_steps`): as it was trained (parallel
for a bundle trained with parallel_images), autoregressively, or in n parallel steps."""
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#t2i-images .gallery-item { max-width: 320px; }
"""
"""The bundles' images are small (24 px in the shapes recipes): enlarge them without blurring; a lone gallery image would
otherwise fill the column's width and overflow its height."""


def _upload_path(payload) -> str | None:
    if payload is None:
        return None
    if payload.path is None:
        raise gr.Error("send the image as a file upload", print_exception=False)
    return payload.path


def image_upload(**kwargs) -> gr.Image:
    """An image upload handed to the handler as its file path, unopened, so that `load_image` (inside the
    request) vets it: gr.Image would open it with PIL first and show a corrupt file as a bare "Error"."""
    image = gr.Image(type="filepath", sources=["upload"], elem_classes="pixelated", height=256, **kwargs)
    # Set on the instance: Gradio writes a .pyi file beside the module of any Component subclass.
    image.preprocess = _upload_path
    return image


def load_pipelines(checkpoints: Sequence[str], device: str = "cpu") -> dict[str, Pipeline]:
    """{name: Pipeline} of bundle folders; a name is the folder's name (its whole path if two share it)."""
    if not checkpoints:
        raise ValueError("give at least one --checkpoint")
    names = [Path(c).name for c in checkpoints]
    return {(Path(c).name if names.count(Path(c).name) == 1 else str(c)): Pipeline(load_bundle(c, device))
            for c in checkpoints}


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def _page_errors(uploads: Sequence[str | None] = ()) -> Iterator[None]:
    """A request's ValueError as one sentence in the page (upload paths shown as the file's name)."""
    try:
        yield
    except ValueError as e:
        message = str(e.args[0]) if e.args else str(e)
        for path in uploads:
            if path:
                message = message.replace(path, Path(path).name)
        raise gr.Error(html.escape(message), print_exception=False) from None


def _report(progress: gr.Progress, desc: str):
    """A request's `Progress` callback that moves the page's progress bar."""
    return lambda p: progress((p.done, p.total), desc=desc, unit=p.what)


def _shown(record: dict[str, Any], upload: str | None) -> dict[str, Any]:
    """The record as shown: an uploaded file by its name, not its place in Gradio's cache."""
    return {**record, "image": Path(upload).name} if upload and "image" in record else record


def _png_uri(image) -> str:
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def story_html(steps: Sequence[StoryStep], done: bool) -> str:
    """The story so far as HTML: paragraphs and inline images (enlarged 4x, pixelated)."""
    parts = []
    for step in steps:
        if step.image is not None:
            h, w = step.image.shape[:2]
            parts.append(f'<img src="{_png_uri(step.image)}" width="{4 * w}" height="{4 * h}" '
                         'style="image-rendering: pixelated; margin: 4px 0" alt="story image">')
        elif step.text:
            parts.append(f"<p>{html.escape(step.text)}</p>")
    if not done:
        parts.append("<p><em>writing…</em></p>")
    return '<div class="story">' + "\n".join(parts) + "</div>"


def _integer(name: str, value: float | None, low: int, high: int) -> int:
    """A whole number from a page field, refused in one sentence outside [low, high]."""
    if value is None or not float(value).is_integer() or not low <= value <= high:
        raise gr.Error(f"{name}={value} must be a whole number from {low} to {high}", print_exception=False)
    return int(value)


class _Stopped(Exception):
    """The page went away: stop sampling the story."""


# ---------------------------------------------------------------------------------------------- the app
class App:
    """The handlers of the page, over {name: Pipeline}."""

    def __init__(self, pipelines: dict[str, Pipeline], settings: ServeSettings | None = None) -> None:
        if not pipelines:
            raise ValueError("the app needs at least one bundle")
        self.pipelines, self.settings = pipelines, settings or ServeSettings()

    def _pipeline(self, name: str) -> tuple[Pipeline, str]:
        if name not in self.pipelines:
            raise gr.Error(f"unknown bundle {html.escape(str(name))}; choose one of {', '.join(self.pipelines)}",
                           print_exception=False)
        pipe = self.pipelines[name]
        return pipe, pipe.bundle.folder or name

    def _image_sampling(self, steps: float, guidance: float, image_guidance: float | None = None,
                        decoding: str = "as trained", keep_source: float | None = None) -> ImageSampling:
        # `decoding` is one of DECODING: the page's dropdown refuses any other value in one sentence
        return ImageSampling(steps=_integer("steps", steps, 1, self.settings.max_steps), guidance=float(guidance),
                             image_guidance=None if image_guidance is None else float(image_guidance),
                             parallel_steps=DECODING[decoding],
                             keep_source=None if keep_source is None else float(keep_source))

    def describe(self, name: str) -> str:
        pipe, folder = self._pipeline(name)
        b = pipe.bundle
        return (f"`{folder}`: {b.image_path} images of {b.image_size} px, a context of "
                f"{b.config.arch.max_seq_len} tokens")

    # one handler per tab: inputs -> request -> page values (output, settings records, command lines)
    def text_to_image(self, bundle: str, prompt: str, num_images: float, steps: float, guidance: float,
                      seed: float | None, decoding: str = "as trained", progress=gr.Progress()):
        pipe, folder = self._pipeline(bundle)
        n = _integer("number of images", num_images, 1, self.settings.max_images)
        request = requests.TextToImage([prompt], n, int(seed or 0),
                                       self._image_sampling(steps, guidance, decoding=decoding))
        with _page_errors():
            outputs = requests.text_to_image(pipe, request, _report(progress, "denoising"))
        records = [o.record for o in outputs]
        gallery = [(o.image, f"seed {o.record['seed']}") for o in outputs]
        return gallery, records, "\n".join(requests.command_line("t2i", folder, r) for r in records)

    def edit(self, bundle: str, image: str | None, instruction: str, steps: float, guidance: float,
             image_guidance: float | None, seed: float | None, decoding: str = "as trained",
             keep_source: float | None = None, progress=gr.Progress()):
        pipe, folder = self._pipeline(bundle)
        if not image:
            raise gr.Error("upload an image to edit", print_exception=False)
        request = requests.Edit([image], [instruction], int(seed or 0),
                                self._image_sampling(steps, guidance, image_guidance, decoding, keep_source))
        with _page_errors([image]):
            out = requests.edit(pipe, request, _report(progress, "denoising"))[0]
        record = _shown(out.record, image)
        return out.image, record, requests.command_line("edit", folder, record)

    def caption(self, bundle: str, image: str | None, seed: float | None, progress=gr.Progress()):
        pipe, folder = self._pipeline(bundle)
        if not image:
            raise gr.Error("upload an image to caption", print_exception=False)
        with _page_errors([image]):
            out = requests.caption(pipe, requests.Caption([image], int(seed or 0)), _report(progress, "captioning"))[0]
        record = _shown(out.record, image)
        return out.text, record, requests.command_line("caption", folder, record)

    def answer(self, bundle: str, image: str | None, question: str, seed: float | None, progress=gr.Progress()):
        pipe, folder = self._pipeline(bundle)
        if not image:
            raise gr.Error("upload an image to ask about", print_exception=False)
        with _page_errors([image]):
            out = requests.answer(pipe, requests.Question([image], [question], int(seed or 0)),
                                  _report(progress, "answering"))[0]
        record = _shown(out.record, image)
        return out.text, record, requests.command_line("vqa", folder, record)

    def story(self, bundle: str, prompt: str, max_images: float, steps: float, guidance: float,
              seed: float | None, decoding: str = "as trained", progress=gr.Progress()):
        """Yields the story as it grows: the request runs in a thread and hands each piece over a queue."""
        pipe, folder = self._pipeline(bundle)
        most = _integer("most images", max_images, 0, self.settings.max_story_images)
        request = requests.Story(prompt, int(seed or 0), most, self._image_sampling(steps, guidance, decoding=decoding))
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        report = _report(progress, "denoising")

        def checked(callback):
            def call(value) -> None:
                if stop.is_set():
                    raise _Stopped
                callback(value)
            return call

        def run() -> None:
            try:
                pieces.put(requests.story(pipe, request, checked(report), on_piece=checked(pieces.put)))
            except Exception as e:  # handed to the page's thread, which raises it there
                pieces.put(e)

        # the copied context carries Gradio's event (its progress bar) into the thread
        threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True).start()
        shown: list[StoryStep] = []
        try:
            while True:
                item = pieces.get()
                if isinstance(item, StoryStep):
                    shown.append(item)
                    yield story_html(shown, done=False), None, ""
                elif isinstance(item, Exception):
                    with _page_errors():
                        raise item
                else:
                    yield story_html(item.steps, done=True), item.record, requests.command_line(
                        "story", folder, item.record)
                    return
        finally:
            stop.set()

    # ---------------------------------------------------------------------------------------- the page
    def blocks(self) -> gr.Blocks:
        s, names = self.settings, list(self.pipelines)
        with gr.Blocks(title="anymodal", analytics_enabled=False) as demo:
            gr.Markdown("# anymodal\nOne decoder that reads and writes text and images. Each result shows its "
                        "settings and the `anymodal generate` command that makes it again.")
            with gr.Row():
                bundle = gr.Dropdown(names, value=names[0], label="bundle", scale=1)
                about = gr.Markdown(self.describe(names[0]))
            bundle.change(self.describe, bundle, about, queue=False, api_name=False)
            run = {"concurrency_limit": s.concurrency, "concurrency_id": "sampling"}

            def reproduce() -> tuple[gr.JSON, gr.Textbox]:
                line = gr.Textbox(label="the same on the command line", lines=2, max_lines=8, interactive=False,
                                  buttons=["copy"], elem_classes="command")
                return gr.JSON(label="settings and seed", max_height=300), line

            def steps_and_seed() -> tuple[gr.Slider, gr.Number]:
                return (gr.Slider(1, s.max_steps, value=IMAGE.steps, step=1, label="denoising steps"),
                        gr.Number(0, precision=0, minimum=0, label="seed"))

            def guidance(label: str = "guidance", value: float = IMAGE.guidance) -> gr.Slider:
                return gr.Slider(0.0, 10.0, value=value, step=0.1, label=label)

            def decoding() -> gr.Dropdown:
                return gr.Dropdown(list(DECODING), value="as trained", label="decoding (discrete bundles)")

            with gr.Tab("text to image"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="prompt", placeholder="a red circle at the center.", lines=2)
                        n = gr.Slider(1, s.max_images, value=1, step=1, label="number of images")
                        steps, seed = steps_and_seed()
                        cfg, codes = guidance(), decoding()
                        go = gr.Button("generate", variant="primary")
                    with gr.Column():
                        gallery = gr.Gallery(label="images", columns=4, height=360, object_fit="contain", format="png",
                                             elem_classes="pixelated", elem_id="t2i-images")
                        record, line = reproduce()
                go.click(self.text_to_image, [bundle, prompt, n, steps, cfg, seed, codes], [gallery, record, line],
                         api_name="text_to_image", show_progress_on=gallery, **run)

            with gr.Tab("edit"):
                with gr.Row():
                    source = image_upload(label="image to edit", elem_id="edit-source")
                    edited = gr.Image(label="edited", format="png", interactive=False, height=256,
                                      elem_classes="pixelated", elem_id="edit-result")
                with gr.Row():
                    with gr.Column():
                        instruction = gr.Textbox(label="instruction", placeholder="make the red circle blue.")
                        steps, seed = steps_and_seed()
                        cfg = guidance("text guidance")
                        cfg_image = gr.Number(None, minimum=0, label=f"image guidance (empty: the bundle's path's "
                                              f"default, {IMAGE_GUIDANCE['continuous']:g} continuous or "
                                              f"{IMAGE_GUIDANCE['discrete']:g} discrete; 1 = off)")
                        codes = decoding()
                        keep = gr.Number(None, minimum=0, label=f"keep the source (empty: the bundle's path's "
                                         f"default, {KEEP_SOURCE['continuous']:g} continuous or "
                                         f"{KEEP_SOURCE['discrete']:g} discrete; 0 = off)")
                        go = gr.Button("edit", variant="primary")
                    with gr.Column():
                        record, line = reproduce()
                go.click(self.edit, [bundle, source, instruction, steps, cfg, cfg_image, seed, codes, keep],
                         [edited, record, line],
                         api_name="edit", show_progress_on=edited, **run)

            with gr.Tab("caption"):
                with gr.Row():
                    with gr.Column():
                        image = image_upload(label="image", elem_id="caption-image")
                        seed = gr.Number(0, precision=0, minimum=0, label="seed")
                        go = gr.Button("caption", variant="primary")
                    with gr.Column():
                        text = gr.Textbox(label="caption", interactive=False, elem_id="caption-text")
                        record, line = reproduce()
                go.click(self.caption, [bundle, image, seed], [text, record, line], api_name="caption",
                         show_progress_on=text, **run)

            with gr.Tab("questions"):
                with gr.Row():
                    with gr.Column():
                        image = image_upload(label="image", elem_id="vqa-image")
                        question = gr.Textbox(label="question", placeholder="how many shapes are there?")
                        seed = gr.Number(0, precision=0, minimum=0, label="seed")
                        go = gr.Button("answer", variant="primary")
                    with gr.Column():
                        text = gr.Textbox(label="answer", interactive=False, elem_id="vqa-text")
                        record, line = reproduce()
                go.click(self.answer, [bundle, image, question, seed], [text, record, line], api_name="answer",
                         show_progress_on=text, **run)

            with gr.Tab("story"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="how the story starts", placeholder="a red circle at the center.")
                        most = gr.Slider(0, s.max_story_images, value=min(STORY.max_images, s.max_story_images),
                                         step=1, label="most images")
                        steps, seed = steps_and_seed()
                        cfg, codes = guidance(), decoding()
                        go = gr.Button("write", variant="primary")
                    with gr.Column():
                        page = gr.HTML(label="story", elem_id="story")
                        record, line = reproduce()
                go.click(self.story, [bundle, prompt, most, steps, cfg, seed, codes], [page, record, line],
                         api_name="story", show_progress_on=page, **run)
        return demo.queue(max_size=s.queue_size, default_concurrency_limit=s.concurrency)


def launch(pipelines: dict[str, Pipeline], settings: ServeSettings | None = None, block: bool = True) -> gr.Blocks:
    """Build the page and serve it; `block=False` returns at once (tests, benchmarks: `.close()` it)."""
    settings = settings or ServeSettings()
    demo = App(pipelines, settings).blocks()
    demo.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=not block,
                max_file_size=MAX_BYTES, ssr_mode=False, css=CSS, quiet=not block, footer_links=["api"])
    return demo
