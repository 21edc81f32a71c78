"""Reconstruction metrics of an image tokenizer: PSNR, SSIM, codebook use, shapes-world exactness.

`evaluate_image_tokenizer` encodes and decodes the first `n` images of a source with the
tokenizer's public API (`decode(encode(x))`, exactly what a generator's images go through).
"""

from __future__ import annotations

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from anymodal.data.sources import Source
from anymodal.tokenizers.vae import VAE
from anymodal.tokenizers.vqvae import VQVAE


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (share of codes seen at least once) and perplexity (exp of the code entropy) of code counts.

    counts: (K,) how often each of the K codes occurred.
    """
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return {"codebook_usage": 0.0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": (counts > 0).double().mean().item(), "perplexity": entropy.exp().item()}


def source_images(source: Source, n: int) -> tuple[torch.Tensor, list]:
    """The first `n` images (n, 3, H, W) of `source` with each one's shapes-world scene (None when unknown)."""
    images, scenes = [], []
    for doc in source:
        doc_scenes = doc.meta.get("scenes")
        for i, image in enumerate(doc.images):
            if image.pixels is None:
                continue
            images.append(image.pixels)
            scenes.append(doc_scenes[i] if doc_scenes is not None and i < len(doc_scenes) else None)
            if len(images) == n:
                return torch.stack(images), scenes
    if not images:
        raise ValueError("the source yielded no images with pixels; evaluate on an image source")
    return torch.stack(images), scenes


@torch.no_grad()
def evaluate_image_tokenizer(tok: VQVAE | VAE, source: Source, n: int = 512, batch_size: int = 64) -> dict:
    """Reconstruction metrics of `tok` on the first `n` images of `source`.

    Returns psnr and ssim (data range 1), n; for a VQ-VAE codebook_usage and perplexity over the
    codes of these images and code_roundtrip (share of codes that encoding the decoded image gives back);
    for a shapes-world source shapes_exact, the share of reconstructions the
    checker reads back to their scene exactly.
    """
    from anymodal.evaluate.shapes import parse_image

    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n} and batch_size={batch_size} must both be >= 1")
    images, scenes = source_images(source, n)  # (n, 3, H, W)
    device = next(tok.parameters()).device
    was_training = tok.training
    tok.eval()
    psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    is_vq = isinstance(tok, VQVAE)
    counts = torch.zeros(tok.codebook_size if is_vq else 1, dtype=torch.long, device=device)
    exact, scored, same_codes = 0, 0, 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)  # (b, 3, H, W)
        if is_vq:
            codes = tok.encode(x)  # (b, h, w)
            counts += torch.bincount(codes.flatten(), minlength=tok.codebook_size)
            recon = tok.decode(codes)
            same_codes += int((tok.encode(recon.clamp(0, 1)) == codes).sum())
        else:
            recon = tok.decode(tok.encode(x))  # (b, 3, H, W)
        psnr.update(recon, x)
        ssim.update(recon, x)
        for i, scene in enumerate(scenes[start:start + batch_size]):
            if scene is not None:
                scored += 1
                exact += parse_image(recon[i].float().cpu()) == scene
    tok.train(was_training)
    metrics = {"psnr": psnr.compute().item(), "ssim": ssim.compute().item(), "n": len(images)}
    if is_vq:
        metrics.update(codebook_stats(counts))
        metrics["code_roundtrip"] = same_codes / int(counts.sum())
    if scored:
        metrics["shapes_exact"] = exact / scored
    return metrics
