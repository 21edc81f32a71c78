"""One decoding engine for every task and both image paths.

The engine holds a batch of sequences, left-padded to a shared end, as rows `branches x B` (branch-major:
the conditional rows first, then one block of rows per guidance branch). The prompt is prefilled once into
a KV cache; after that:

- text: one token per forward (greedy, temperature, top-k, top-p, stop strings); all branches receive
  the conditional branch's token;
- discrete image: `<boi>`, then exactly N codes (logits restricted to the codebook, guided across branches),
  then `<eoi>`;
- continuous image: `<boi>`, then K denoising steps that each run only the image's N patch slots against
  the cache (peek: the cache is not written), bidirectional within the image; the final clean latents are
  run once more to enter the cache, then `<eoi>`, so text can follow.

With `use_cache=False` every forward recomputes the whole sequence: the reference the tests hold the
cached path to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from anymodal.batch import CONTINUOUS_IMAGE
from anymodal.data.packing import collate_rows
from anymodal.data.sequence import EncodedDocument
from anymodal.generate.settings import (
    KEEP_RADIUS,
    SCORE_LEVELS,
    TEXT_GUIDANCE_FLOOR,
    ImageSampling,
    StepCallback,
    TextSampling,
    resolved,
)
from anymodal.layout import build_layout, slot_indices
from anymodal.masks import AttentionMask, build_attention_mask
from anymodal.model.unified import ContinuousInput, UnifiedModel
from anymodal.parallel import bidirectional, known_after
from anymodal.tokenizers.text import TextTokenizer


@dataclass
class EngineStats:
    """Positions processed by each forward pass, and which of them were denoising steps."""

    forwards: list[int] = field(default_factory=list)
    denoise_forwards: list[int] = field(default_factory=list)


@dataclass
class _Continuous:
    row: int
    start: int
    latents: torch.Tensor  # (C, h, w)
    timestep: float


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """(R, ...) ids drawn from (R, ..., V) logits (greedy when temperature is 0); one generator per row R."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    rows = probs.reshape(probs.shape[0], -1, probs.shape[-1])  # (R, n, V): n draws per row (a parallel step's slots)
    if generators is None:
        return torch.multinomial(rows.reshape(-1, rows.shape[-1]), 1).view(probs.shape[:-1]).to(logits.device)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    ids = [torch.multinomial(rows[i], 1, generator=g).view(probs.shape[1:-1]) for i, g in enumerate(generators)]
    return torch.stack(ids).to(logits.device)


def guide(pred: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """Classifier-free guidance over branches: pred (branches, B, ...) -> (B, ...).

    cond + sum_i (w_i - 1) * (cond - branch_i): two branches give uncond + w (cond - uncond); every
    scale 1 gives the conditional branch exactly.
    """
    cond = pred[0]
    out = cond
    for i, w in enumerate(scales, start=1):
        if w != 1.0:
            out = out + (w - 1.0) * (cond - pred[i])
    return out


def guide_text(logp: torch.Tensor, scale: float) -> torch.Tensor:
    """Log-probabilities (2, B, V) of the next token with and without the image -> guided scores (B, V).

    `guide`'s cond + (scale - 1)(cond - uncond), among the tokens the image-conditioned model finds plausible
    (probability at least TEXT_GUIDANCE_FLOOR of its likeliest token's; the rest never picked): the words the
    image makes likelier than the text alone would gain, and no word the model finds unlikely is pushed in."""
    cond = logp[0]
    out = guide(logp, [scale])
    return out.masked_fill(cond < cond.max(-1, keepdim=True).values + math.log(TEXT_GUIDANCE_FLOOR), float("-inf"))


def keep_near_source(objective, x: torch.Tensor, pred: torch.Tensor, t, source: torch.Tensor,
                     weight: float) -> torch.Tensor:
    """The prediction `pred` at latents x (B, C, h, w), with the clean latents it implies moved `weight` of the
    way to `source`'s at each position where they lie near them already (settings.KEEP_RADIUS)."""
    x0 = objective.clean(x, pred, t)
    d = (x0 - source).pow(2).mean(1, keepdim=True).sqrt()  # (B, 1, h, w)
    pull = weight * torch.exp(-(d / KEEP_RADIUS) ** 2)
    return objective.prediction_for(x, x0 + pull * (source - x0), t)


class Engine:
    """A batch of sequences being generated, with its KV cache."""

    def __init__(self, model: UnifiedModel, text: TextTokenizer, objective=None, use_cache: bool = True) -> None:
        self.model, self.text, self.objective, self.use_cache = model, text, objective, use_cache
        self.config = model.config
        self.device = next(model.parameters()).device
        self.stats = EngineStats()

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def start(self, prompts: list[EncodedDocument], branches: int = 1) -> torch.Tensor:
        """Prefill `prompts` (R = branches * B of them, branch-major), left-padded to one length T.

        Returns the prefill's hidden states (R, T, D): what the training forward gives each prompt, at the
        prompt's own columns (a test pins the two equal).
        """
        if len(prompts) % branches:
            raise ValueError(f"{len(prompts)} prompts do not split into {branches} guidance branches")
        self.branches, self.B = branches, len(prompts) // branches
        limit = self.config.arch.max_seq_len
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise ValueError(f"the prompt is {longest} tokens long but the model's context is {limit}; "
                             f"shorten the prompt")
        T = longest
        discrete = self.config.image_path == "discrete"
        kind = "codes" if discrete else "latents"
        encoded = [getattr(image, kind) for p in prompts for image in p.images]  # in image-index order
        if any(x is None for x in encoded):
            raise ValueError(f"a prompt image must be encoded to {kind} before sampling")
        batch = collate_rows([[p] for p in prompts], T, self.text.pad_id, left_pad=True)
        if discrete and encoded:
            batch = batch.fill_codes(torch.stack(encoded).cpu(), self.config.code_offset)
        layout = build_layout(batch)
        self.ids, self.positions, self.document_ids, self.continuous_ids = (
            t.to(self.device) for t in (layout.tokens, layout.positions, layout.document_ids, layout.continuous_ids))
        # the prompt's continuous images, kept to place them in every later window that still holds them
        self.images: list[_Continuous] = [_Continuous(r, off, encoded[i].to(self.device), 0.0)
                                          for r, off, _, i in batch.image_slots(CONTINUOUS_IMAGE)]
        self.next_image = len(self.images)
        self.cache = self.model.decoder.new_cache() if self.use_cache else None
        self.length = 0
        hidden = self._run(T, write=True)  # (R, T, D)
        self.last_hidden = hidden[:, -1]  # (R, D)
        return hidden

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def _append(self, ids: torch.Tensor, image: int = -1) -> int:
        """Append columns ids (R, n); returns the index of the first new column."""
        R, n = ids.shape
        start = self.seq_len
        if start + n > self.config.arch.max_seq_len:
            raise ValueError(f"generation reached the model's context of {self.config.arch.max_seq_len} tokens")
        last = self.positions[:, -1:]
        self.ids = torch.cat([self.ids, ids.to(self.device)], 1)
        self.document_ids = torch.cat([self.document_ids, torch.zeros_like(ids, device=self.device)], 1)
        self.continuous_ids = torch.cat([self.continuous_ids, torch.full_like(ids, image, device=self.device)], 1)
        self.positions = torch.cat([self.positions, last + torch.arange(1, n + 1, device=self.device)], 1)
        return start

    def _mask(self) -> AttentionMask:
        """The mask of the next forward: its queries are the columns not in the cache (all without a cache)."""
        lo = self.length if self.use_cache else 0
        return build_attention_mask(self.document_ids, self.continuous_ids, self.config.arch.attention,
                                    q_offset=lo, q_len=self.seq_len - lo)

    def _run(self, n_new: int, write: bool, extra: list[_Continuous] | None = None,
             mask: AttentionMask | None = None) -> torch.Tensor:
        """Forward the last `n_new` columns (all columns without a cache); returns their hidden (R, n_new, D).

        `mask` may be passed when it is known to be `self._mask()` (the denoising steps of one image share it).
        """
        T = self.seq_len
        lo = self.length if self.use_cache else 0
        if T - self.length != n_new:
            raise RuntimeError(f"{T - self.length} pending columns but {n_new} to run")
        window = T - lo
        R = self.ids.shape[0]
        images = [im for im in self.images + (extra or []) if im.start >= lo]
        continuous = None
        if images:
            rows = torch.tensor([im.row for im in images], device=self.device)  # (N,)
            starts = torch.tensor([im.start - lo for im in images], device=self.device)  # (N,) within the window
            continuous = ContinuousInput(
                slots=slot_indices(rows, starts, window, self.config.slots),  # (N, L)
                latents=torch.stack([im.latents for im in images]),
                timesteps=torch.tensor([im.timestep for im in images], device=self.device, dtype=torch.float),
                references=self._references(images) if self.config.reference_input else None,
            )
        mask = self._mask() if mask is None else mask
        slots = self.model.code_slots(self.ids, self.text.boi_id)  # over the whole history: a window is a slice
        h = self.model.embed(self.ids[:, lo:], continuous, None if slots is None else slots[:, lo:])  # (R, window, D)
        hidden = self.model(h, self.positions[:, lo:], mask, cache=self.cache, write_cache=write)
        self.stats.forwards.append(R * window)
        if write:
            self.length = T
        return hidden[:, -n_new:]

    def _references(self, images: list[_Continuous]) -> torch.Tensor:
        """(N, C, h, w): the clean latents of the image before each of `images` in its row (the prompt's images
        and those generated so far, in or out of the window), zeros where there is none, as training gives."""
        out = []
        for im in images:
            before = [p for p in self.images if p.row == im.row and p.start < im.start]
            out.append(max(before, key=lambda p: p.start).latents if before else torch.zeros_like(im.latents))
        return torch.stack(out)

    def _feed(self, ids: torch.Tensor) -> None:
        """Append ids (R, n) and run them into the cache."""
        self._append(ids)
        self.last_hidden = self._run(ids.shape[1], write=True)[:, -1]

    def _branch_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) -> (R, 1): the same token for every branch."""
        return ids.repeat(self.branches)[:, None]

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def generate_text(self, sampling: TextSampling, generators: list[torch.Generator] | None = None,
                      stop_at_boi: bool = False, guide_from: int | None = None,
                      trace: list[torch.Tensor] | None = None) -> list[list[int]]:
        """Generated ids of each of the B conditional rows (terminator included: `<eos>`, or `<boi>`).

        With `guide_from`, the engine holds two branches (the prompts, then the same prompts without their
        images) and every token from that one on is picked by `guide_text` with `sampling.image_guidance`;
        without, tokens come from the first branch alone. `trace` receives, per step, the (B, V) log-probabilities of
        the next token given the prompts (before guidance)."""
        B = self.B
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        code_start = self.config.code_offset
        if guide_from is not None and self.branches != 2:
            raise ValueError(f"guided text needs two branches (with and without the images), got {self.branches}")
        for i in range(sampling.max_new_tokens):
            guided = guide_from is not None and i >= guide_from and sampling.image_guidance != 1.0
            logits = self.model.logits(self.last_hidden[:2 * B if guided else B]).float()  # (2B or B, V)
            logits[:, code_start:] = float("-inf")  # no image codes in text mode
            logits[:, self.text.pad_id] = float("-inf")
            if not stop_at_boi:
                logits[:, self.text.boi_id] = float("-inf")
            if guided or trace is not None:
                logp = logits.log_softmax(-1)  # (2B or B, V)
                if trace is not None:
                    trace.append(logp[:B])
                if guided:
                    logits = guide_text(logp.view(2, B, -1), sampling.image_guidance)
            tok = sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, generators)
            for b in range(B):
                if done[b]:
                    tok[b] = self.text.pad_id
                    continue
                t = int(tok[b])
                out[b].append(t)
                if t in (self.text.eos_id, self.text.boi_id) or (
                        sampling.stop and self.text.decode(out[b]).endswith(tuple(sampling.stop))):
                    done[b] = True
            if all(done):
                break
            self._feed(self._branch_tokens(tok))
        return out

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def image_scores(self, images: torch.Tensor, generators: list[torch.Generator] | None = None,
                     levels: int = SCORE_LEVELS) -> torch.Tensor:
        """(B,) how badly each started prompt explains its image (lower: better), read as `<boi>` and the image
        after the prompt, the way training reads a text-to-image document. Leaves the engine spent.

        images: codes (B, h, w) or latents (B, C, h, w). Discrete: the codes' mean negative log-likelihood (one
        forward). Continuous: the mean denoising loss at `levels` noise levels spread evenly over (0, 1), each
        row's noise drawn from its generator, so rows seeded alike (candidates of one image) meet the same noise.
        """
        if self.branches != 1:
            raise ValueError(f"scoring reads one branch, got {self.branches}")
        R, config = self.ids.shape[0], self.config
        if images.shape[0] != R:
            raise ValueError(f"{images.shape[0]} images for {R} prompts; give one per prompt")
        self._feed(torch.full((R, 1), self.text.boi_id, dtype=torch.long))
        if config.image_path == "discrete":
            codes = images.reshape(R, -1).to(self.device)  # (R, N)
            first = self.last_hidden[:, None]  # <boi> predicts the first code
            self._append(codes + config.code_offset)
            hidden = torch.cat([first, self._run(codes.shape[1], write=True)[:, :-1]], 1)  # (R, N, D)
            K = config.codebook_size
            logp = self.model.logits(hidden).float()[..., config.code_offset:config.code_offset + K].log_softmax(-1)
            return -logp.gather(-1, codes[..., None])[..., 0].mean(1)
        if self.objective is None:
            raise ValueError("the continuous path needs the bundle's diffusion objective")
        L = config.slots
        x0 = images.to(self.device).float()
        start = self._append(torch.full((R, L), self.text.pad_id, dtype=torch.long), image=self.next_image)
        self.next_image += 1
        rows = torch.arange(R, device=self.device)
        slots = slot_indices(rows, torch.zeros_like(rows), L, L)
        mask = self._mask()
        total = torch.zeros(R, device=self.device)
        for k in range(levels):
            noise = (torch.randn(x0.shape) if generators is None else
                     torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])).to(self.device)
            noised = self.objective.noise_at(x0, noise, (k + 0.5) / levels)
            extra = [_Continuous(r, start, noised.x_t[r], float(noised.timesteps[r])) for r in range(R)]
            pred = self.model.image_prediction(self._run(L, write=False, extra=extra, mask=mask), slots).float()
            total += ((pred - noised.target) ** 2).mean(dim=(1, 2, 3))
        return total / levels

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def generate_image(self, sampling: ImageSampling, scales: list[float],
                       generators: list[torch.Generator] | None = None, on_step: StepCallback = None,
                       source: torch.Tensor | None = None) -> torch.Tensor:
        """`<boi>` + one image per conditional row + `<eoi>`: codes (B, h, w) or latents (B, C, h, w).

        `on_step(done, total)` is called after every denoising step (continuous) or code (discrete). `source`:
        the codes (B, h, w) or latents (B, C, h, w) of the image an edit changes, kept where the instruction
        does not name it by `sampling.keep_source` (settings.resolved)."""
        if len(scales) != self.branches - 1:
            raise ValueError(f"{self.branches} branches need {self.branches - 1} guidance scales, got {scales}")
        R = self.ids.shape[0]
        self._feed(torch.full((R, 1), self.text.boi_id, dtype=torch.long))
        sampling = resolved(sampling, self.config)
        strength = sampling.keep_source if source is not None else 0.0
        if self.config.image_path == "discrete":
            prior = None
            if strength:
                K = self.config.codebook_size
                prior = strength * F.one_hot(source.reshape(self.B, -1).to(self.device), K).float()
            if sampling.parallel_steps:
                return self._codes_parallel(sampling, scales, generators, on_step, prior)
            return self._codes(sampling, scales, generators, on_step, prior)
        keep = (source.to(self.device).float(), strength) if strength else None
        return self._latents(sampling, scales, generators, on_step, keep)

    def _in_interval(self, i: int, n: int, sampling: ImageSampling) -> bool:
        lo, hi = sampling.guidance_interval
        return lo <= i / n < hi  # step i of n (i < n) sits at fraction i / n of the trajectory

    def _codes(self, sampling: ImageSampling, scales: list[float], generators, on_step: StepCallback,
               prior: torch.Tensor | None = None) -> torch.Tensor:
        """One code per forward; `prior` (B, slots, K): log-probability added to each slot's codes."""
        config, N, K = self.config, self.config.slots, self.config.codebook_size
        codes = []
        for i in range(N):
            logits = self.model.logits(self.last_hidden).float()[:, config.code_offset:config.code_offset + K]  # (R, K)
            logp = logits.log_softmax(-1).view(self.branches, self.B, -1)
            guided = guide(logp, scales if self._in_interval(i, N, sampling) else [1.0] * len(scales))
            if prior is not None:
                guided = guided + prior[:, i]
            code = sample_logits(guided, sampling.temperature, sampling.top_k, 1.0, generators)  # (B,)
            codes.append(code)
            ids = self._branch_tokens(code + config.code_offset)
            if i < N - 1:
                self._feed(ids)
            else:  # the last code and <eoi> enter together
                self._feed(torch.cat([ids, torch.full_like(ids, self.text.eoi_id)], 1))
            if on_step:
                on_step(i + 1, N)
        g = config.grid
        return torch.stack(codes, 1).view(self.B, g, g)

    def _codes_parallel(self, sampling: ImageSampling, scales: list[float], generators,
                        on_step: StepCallback, prior: torch.Tensor | None = None) -> torch.Tensor:
        """All code slots at once, masked, then `parallel_steps` forwards that each fix the most confident of
        their sampled codes (anymodal.parallel.known_after); the slots attend to each other both ways, as the
        bundle's parallel training saw them. `prior` as in `_codes`."""
        config, R, L, K = self.config, self.ids.shape[0], self.config.slots, self.config.codebook_size
        steps = sampling.parallel_steps
        if steps > L:
            raise ValueError(f"parallel_steps={steps} exceeds the {L} codes of an image; use at most {L}")
        mask_id = config.mask_id  # refuses a bundle trained without parallel images, in one sentence
        start = self._append(torch.full((R, L), mask_id, dtype=torch.long))
        self.continuous_ids = bidirectional(self.continuous_ids, [(r, start, L) for r in range(R)])  # as in training
        codes = torch.zeros(self.B, L, dtype=torch.long, device=self.device)
        known = torch.zeros(self.B, L, dtype=torch.bool, device=self.device)
        mask = self._mask()  # the same for every step and for the final write
        for i in range(steps):
            ids = torch.where(known, codes + config.code_offset, torch.full_like(codes, mask_id))
            self.ids[:, start:] = ids.repeat(self.branches, 1)
            hidden = self._run(L, write=False, mask=mask)  # (R, L, D)
            logits = self.model.logits(hidden).float()[..., config.code_offset:config.code_offset + K]  # (R, L, K)
            logp = logits.log_softmax(-1).view(self.branches, self.B, L, K)
            guided = guide(logp, scales if self._in_interval(i, steps, sampling) else [1.0] * len(scales))
            if prior is not None:
                guided = guided + prior
            drawn = sample_logits(guided, sampling.temperature, sampling.top_k, 1.0, generators)  # (B, L)
            confidence = guided.log_softmax(-1).gather(2, drawn[..., None])[..., 0]  # (B, L)
            confidence = confidence.masked_fill(known, float("inf"))  # fixed codes stay fixed
            keep = confidence.topk(known_after(i, steps, L), dim=1).indices  # (B, n)
            new = torch.zeros_like(known).scatter(1, keep, True) & ~known
            codes = torch.where(new, drawn, codes)
            known |= new
            if on_step:
                on_step(i + 1, steps)
        self.ids[:, start:] = (codes + config.code_offset).repeat(self.branches, 1)
        self._run(L, write=True, mask=mask)
        self._feed(torch.full((R, 1), self.text.eoi_id, dtype=torch.long))
        g = config.grid
        return codes.view(self.B, g, g)

    def _latents(self, sampling: ImageSampling, scales: list[float], generators, on_step: StepCallback,
                 keep: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """Denoised latents; `keep`: (source latents, weight) of `keep_near_source`."""
        config, R, L = self.config, self.ids.shape[0], self.config.slots
        if self.objective is None:
            raise ValueError("the continuous path needs the bundle's diffusion objective")
        image = self.next_image
        self.next_image += 1
        start = self._append(torch.full((R, L), self.text.pad_id, dtype=torch.long), image=image)
        shape = (self.B, config.latent_channels, config.grid, config.grid)
        if generators is None:
            x = torch.randn(shape)
        else:
            x = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
        x = x.to(self.device)  # (B, C, h, w)
        sampler = self.objective.make_sampler(sampling.steps, sampling.sampler)
        timesteps = sampler.timesteps
        rows = torch.arange(R, device=self.device)
        slots = slot_indices(rows, torch.zeros_like(rows), L, L)  # (R, L) of the (R, L) hidden of each step
        mask = self._mask()  # the same for every step and for the final write: built once
        for i, t in enumerate(timesteps):
            xr = x.repeat(self.branches, 1, 1, 1)
            extra = [_Continuous(r, start, xr[r], float(t)) for r in range(R)]
            hidden = self._run(L, write=False, extra=extra, mask=mask)  # (R, L, D)
            self.stats.denoise_forwards.append(self.stats.forwards[-1])
            pred = self.model.image_prediction(hidden, slots).float()  # (R, C, h, w)
            pred = pred.view(self.branches, *shape)
            pred = guide(pred, scales if self._in_interval(i, len(timesteps), sampling) else [1.0] * len(scales))
            # Heun's second evaluation of a step (at the step's end, averaged over the whole step) is left as the
            # model draws it: at the last step's end (sigma 0.001) the pulled latents' velocity is ~1000x too big
            if keep is not None and getattr(sampler, "state_in_first_order", True):
                pred = keep_near_source(self.objective, x, pred, t, *keep)
            x = self.objective.step(sampler, pred, t, x, generator=generators)
            if on_step:
                on_step(i + 1, len(timesteps))
        xr = x.repeat(self.branches, 1, 1, 1)
        self.images += [_Continuous(r, start, xr[r], 0.0) for r in range(R)]
        self._run(L, write=True, mask=mask)
        self._feed(torch.full((R, 1), self.text.eoi_id, dtype=torch.long))
        return x
