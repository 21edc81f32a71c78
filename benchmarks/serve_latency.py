"""Latency of `anymodal serve`: each request type through gradio_client, and four browser sessions at once.

Starts the app (anymodal.app.web.launch) on 127.0.0.1 over the given bundles and measures, per bundle,
the wall time of one request of each type as a client sees it (sent to the answer received): a
text-to-image image at 25 denoising steps (ImageSampling's default), an edit of that image, a caption
and an answer about it, and a story (Story's default of at most 4 images). Then `--sessions` clients
send a text-to-image request at once (gradio_client), and as many headless chromium pages (Playwright,
Debian's browser) each type a prompt and click "generate" at the same time; each one's time to its
image (in the page: from click to the image shown) is recorded, with their median and worst. Requests
queue: the app samples one at a time (ServeSettings.concurrency), so the worst session waits for the
others. `--screenshot` saves one page with its result (the README's docs/app.png).

    .venv/bin/python benchmarks/serve_latency.py                 # the demo bundles, checkpoints/demo/*
    .venv/bin/python benchmarks/serve_latency.py --checkpoint bundles/transfusion --screenshot docs/app.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import gradio
import torch
from sampling import machine  # this folder's benchmarks share the machine record

from anymodal.app.settings import ServeSettings
from anymodal.app.web import launch, load_pipelines
from anymodal.generate import requests
from anymodal.generate.settings import ImageSampling

ROOT = Path(__file__).resolve().parents[1]
DEMO = [ROOT / "checkpoints" / "demo" / "transfusion", ROOT / "checkpoints" / "demo" / "chameleon"]
IMAGE = ImageSampling()
PROMPT = "a red circle at the top left and a blue square at the center."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(call, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = call(*args, **kwargs)
    return time.perf_counter() - start, out


def per_request(client, name: str, repeats: int) -> dict:
    """Seconds of each request type on bundle `name` (median of `repeats`; the first call warms up)."""
    from gradio_client import handle_file

    seconds: dict[str, list[float]] = {k: [] for k in ("t2i", "edit", "caption", "vqa", "story")}
    story_images = []
    for i in range(repeats + 1):
        t, (gallery, _, _) = _timed(client.predict, name, PROMPT, 1, IMAGE.steps, IMAGE.guidance, i,
                                    api_name="/text_to_image")
        source = handle_file(gallery[0]["image"])
        times = {"t2i": t}
        times["edit"], _ = _timed(client.predict, name, source, "make the red circle green.", IMAGE.steps,
                                  IMAGE.guidance, IMAGE.image_guidance, i, api_name="/edit")
        times["caption"], _ = _timed(client.predict, name, source, i, api_name="/caption")
        times["vqa"], _ = _timed(client.predict, name, source, "how many shapes are there?", i, api_name="/answer")
        times["story"], (page, _, _) = _timed(client.predict, name, "a red circle at the center.",
                                              requests.Story(prompt="").max_images, IMAGE.steps, IMAGE.guidance, i,
                                              api_name="/story")
        if i:  # the first round warms up
            for key, value in times.items():
                seconds[key].append(value)
            story_images.append(page.count("<img"))
    out = {key: {"median_s": statistics.median(v), "runs_s": v} for key, v in seconds.items()}
    out["story"]["images"] = story_images
    return out


def concurrent_api(client, name: str, n: int) -> list[float]:
    """`n` text-to-image requests sent at once through gradio_client; seconds from sending to each answer."""
    start = time.perf_counter()
    seconds = [0.0] * n
    jobs = [client.submit(name, PROMPT, 1, IMAGE.steps, IMAGE.guidance, 100 + k, api_name="/text_to_image")
            for k in range(n)]
    for k, job in enumerate(jobs):
        job.add_done_callback(lambda _, k=k: seconds.__setitem__(k, time.perf_counter() - start))
    for job in jobs:
        job.result()
    return seconds


async def _sessions(url: str, n: int, screenshot: Path | None, shots: Path) -> list[float]:
    """`n` browser pages click "generate" together; seconds from each click to its image in the page."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        pages = []
        for _ in range(n):
            page = await (await browser.new_context(viewport={"width": 1280, "height": 960})).new_page()
            page.set_default_timeout(600_000)
            await page.goto(url)
            await page.get_by_label("prompt").fill(PROMPT)
            pages.append(page)

        async def session(page) -> float:
            start = time.perf_counter()
            await page.get_by_role("button", name="generate").click()
            await page.locator("#t2i-images img").first.wait_for(state="visible")
            return time.perf_counter() - start

        seconds = await asyncio.gather(*(session(page) for page in pages))
        for k, page in enumerate(pages):
            await page.wait_for_function("() => [...document.querySelectorAll('.command textarea')]"
                                         ".some(e => e.value.startsWith('anymodal generate t2i'))")
            await page.screenshot(path=shots / f"session{k}.png")
        if screenshot:
            await pages[0].screenshot(path=screenshot)
        page = pages[0]  # and a story, to look at
        await page.get_by_role("tab", name="story").click()
        await page.get_by_label("how the story starts").fill("a red circle at the center.")
        await page.get_by_role("button", name="write").click()
        await page.wait_for_function("() => [...document.querySelectorAll('.command textarea')]"
                                     ".some(e => e.value.startsWith('anymodal generate story'))")
        await page.screenshot(path=shots / "story.png", full_page=True)
        await browser.close()
    return list(seconds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="a bundle (repeatable; default: checkpoints/demo/transfusion and chameleon)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of every request type per bundle")
    parser.add_argument("--sessions", type=int, default=4, help="browser sessions clicking at once")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--screenshot", default=None, help="also save one session's page here (e.g. docs/app.png)")
    parser.add_argument("--shots", default=None, help="folder for every session's screenshot (default: a tmp one)")
    parser.add_argument("--note", default="", help="where the bundles came from, kept with the results")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_latency.json"))
    args = parser.parse_args(argv)
    checkpoints = [str(c) for c in (args.checkpoint or DEMO)]
    missing = [c for c in checkpoints if not (Path(c) / "config.json").is_file()]
    if missing:
        raise SystemExit(f"no bundle at {', '.join(missing)}: run `make demo` or pass --checkpoint")
    torch.set_num_threads(args.threads)
    shots = Path(args.shots or tempfile.mkdtemp(prefix="serve_shots_"))
    shots.mkdir(parents=True, exist_ok=True)

    from gradio_client import Client

    pipelines = load_pipelines(checkpoints)
    demo = launch(pipelines, ServeSettings(port=_free_port()), block=False)
    cpu0, t0, load0 = os.times(), time.perf_counter(), os.getloadavg()
    try:
        client = Client(demo.local_url, verbose=False)
        latency = {name: per_request(client, name, args.repeats) for name in pipelines}
        api = concurrent_api(client, next(iter(pipelines)), args.sessions)
        browser = asyncio.run(_sessions(demo.local_url, args.sessions, args.screenshot and Path(args.screenshot),
                                        shots))
    finally:
        demo.close()
    wall, cpu1 = time.perf_counter() - t0, os.times()
    result = {
        "machine": {**machine("cpu"), "gradio": gradio.__version__},
        "cpu_per_wall": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall,
        "load_average_1min": {"start": load0[0], "end": os.getloadavg()[0]},  # other jobs on the machine
        "note": args.note,
        "bundles": {name: {"folder": pipe.bundle.folder, "image_path": pipe.bundle.image_path,
                           "image_size": pipe.bundle.image_size} for name, pipe in pipelines.items()},
        "settings": {"steps": IMAGE.steps, "guidance": IMAGE.guidance, "image_guidance": IMAGE.image_guidance,
                     "concurrency": ServeSettings().concurrency, "repeats": args.repeats},
        "latency": latency,
        "api_sessions": {"bundle": next(iter(pipelines)), "task": "t2i, 1 image", "sessions": args.sessions,
                         "seconds": api, "median_s": statistics.median(api), "worst_s": max(api)},
        "browser_sessions": {"bundle": next(iter(pipelines)), "task": "t2i, 1 image", "sessions": args.sessions,
                             "seconds": browser, "median_s": statistics.median(browser), "worst_s": max(browser),
                             "screenshots": str(shots)},
        "total_s": wall,
    }
    for name, rows in latency.items():
        print(name, "  ".join(f"{k} {v['median_s']:.2f}s" for k, v in rows.items()))
    print(f"{args.sessions} API clients at once: median {statistics.median(api):.2f}s, worst {max(api):.2f}s")
    print(f"{args.sessions} browser sessions at once: median {result['browser_sessions']['median_s']:.2f}s, "
          f"worst {result['browser_sessions']['worst_s']:.2f}s; screenshots in {shots}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
