"""A small text-only LM, trained on a source's text and saved as a Hugging Face folder.

It is the starting point of the Liquid recipe on the shapes world (`recipes/models/liquid-shapes.yaml`):
a stand-in, at CPU scale, for the pretrained LM folder (SmolLM, Qwen2.5, ...) a GPU run starts from.

    anymodal text-lm --out checkpoints/shapes-lm --steps 600

The folder holds config.json + model.safetensors (a Llama model: `AutoModelForCausalLM` loads it) and the
text tokenizer, so `UnifiedSystem(init_from=...)` and `load_text_model` read it like any other LM folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from anymodal.batch import IGNORE
from anymodal.config import ArchConfig
from anymodal.data.document import Document, Text
from anymodal.data.packing import collate_rows, pack_rows
from anymodal.data.sequence import SequenceEncoder
from anymodal.layout import build_layout
from anymodal.masks import build_attention_mask
from anymodal.model.hf import TextModel, save_hf_model
from anymodal.tokenizers.text import load_text_tokenizer


@dataclass
class TextLMSettings:
    """How `train_text_lm` trains and where it writes."""

    out: str
    """Folder to write (a Hugging Face causal-LM folder with its tokenizer)."""
    tokenizer: str = "tokenizers/shapes-text"
    """Text tokenizer folder; the LM's vocabulary is its ids."""
    size: str = "shapes"
    """Named decoder size (anymodal.config.SIZES); `shapes` matches the shapes-world unified recipes."""
    tied_embeddings: bool = False
    """Share the embedding with the LM head (SmolLM-style)."""
    steps: int = 600
    """Optimizer steps."""
    seq_len: int = 256
    """Tokens per packed row."""
    batch_size: int = 8
    """Rows per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to a tenth)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    seed: int = 0
    """Seed of the initial weights."""


def text_documents(source) -> Iterator[Document]:
    """Every document of `source` as a text document: its text segments, in order, without its images (so the
    text is tokenized exactly as the unified model will see it)."""
    for doc in source:
        texts = [s for s in doc.segments if isinstance(s, Text)]
        if texts:
            yield Document(texts, task="text")


def train_text_lm(settings: TextLMSettings, source, log_every: int = 50) -> Path:
    """Train a text LM of `settings.size` on the text of `source` (an iterable of Documents) and write it to
    `settings.out` as a Hugging Face folder; returns the folder."""
    torch.manual_seed(settings.seed)
    text = load_text_tokenizer(settings.tokenizer)
    arch = ArchConfig.from_name(settings.size, tied_embeddings=settings.tied_embeddings)
    if settings.seq_len > arch.max_seq_len:
        raise ValueError(f"seq_len={settings.seq_len} is longer than size {settings.size!r} handles ({arch.max_seq_len})")
    model = TextModel(arch, len(text))
    torch.nn.init.normal_(model.embed_tokens.weight, std=arch.init_std)
    if model.lm_head is not None:
        torch.nn.init.normal_(model.lm_head.weight, std=arch.init_std)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = min(1.0, (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    encoder = SequenceEncoder(text, "discrete", slots=1)  # text documents only: the image settings are unused
    rows = pack_rows((encoder.encode(d) for d in text_documents(source)), settings.seq_len, settings.batch_size)
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = collate_rows(next(rows), settings.seq_len, text.pad_id)
        layout = build_layout(batch)
        mask = build_attention_mask(layout.document_ids, layout.continuous_ids, arch.attention)
        logits = model(layout.tokens, layout.positions, mask)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == settings.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    out = save_hf_model(settings.out, arch, model.state_dict(), len(text), text.bos_id, text.eos_id, text.pad_id)
    text.save(out)
    return out
