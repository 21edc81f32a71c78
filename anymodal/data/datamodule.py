"""Lightning datamodules: batches for the systems in `anymodal.systems`.

`ImageDataModule` feeds image tokenizers: every Image segment's pixels of a source's Documents,
batched as `(B, 3, H, W)` float tensors in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from anymodal.data.sources import Source


class SourceImages(IterableDataset):
    """The pixels (3, H, W) of every Image segment of a Source's Documents, in order.

    Images held only as codes or latents are skipped. `limit` caps the number of images per shard
    (the validation set); `set_epoch` is passed on to the source.
    """

    def __init__(self, source: Source, limit: int | None = None) -> None:
        super().__init__()
        self.source = source
        self.limit = limit

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = 0
        for doc in self.source:
            for image in doc.images:
                if image.pixels is None:
                    continue
                if self.limit is not None and n >= self.limit:
                    return
                yield image.pixels
                n += 1


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """list of (3, H, W) -> (B, 3, H, W); one clear error when the sizes differ."""
    sizes = {tuple(p.shape) for p in images}
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes {sorted(sizes)} in one batch; "
                         f"give the source a single image size")
    return torch.stack(images)


class EpochLoader(DataLoader):
    """A DataLoader that moves its dataset to a fresh epoch (a fresh stream) on every pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        return super().__iter__()


class ImageDataModule(LightningDataModule):
    """Batches of images for tokenizer training: `(B, 3, H, W)` float in [0, 1].

    source:      a Source whose Documents' Image segments carry pixels (training stream)
    batch_size:  images per batch
    num_workers: DataLoader worker processes for training (the source shards itself across them)
    val_source:  a Source for validation (use another seed than `source`); none: no validation
    val_batches: validation batches drawn from `val_source`, the same ones every time
    """

    def __init__(
        self,
        source: Source,
        batch_size: int = 64,
        num_workers: int = 0,
        val_source: Source | None = None,
        val_batches: int = 4,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if val_batches < 1:
            raise ValueError(f"val_batches={val_batches} must be >= 1")
        self.source = source
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_source = val_source
        self.val_batches = val_batches

    def train_dataloader(self) -> DataLoader:
        return EpochLoader(
            SourceImages(self.source),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=stack_images,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        # One process and epoch 0 every time, so every validation sees the same images.
        images = SourceImages(self.val_source, limit=self.val_batches * self.batch_size)
        return DataLoader(images, batch_size=self.batch_size, num_workers=0, collate_fn=stack_images)


def check_image_sizes(sources: list[Source], image_size: int | None) -> None:
    """Refuse, in one sentence, a source whose images are not the `image_size` the model is built for."""
    for source in sources:
        size = getattr(source, "image_size", None)
        if image_size is not None and size is not None and size != image_size:
            raise ValueError(f"{type(source).__name__} yields {size} px images but the model is built for "
                             f"image_size={image_size}; state the size once in the recipe (a YAML anchor, "
                             f"as recipes/models/*.yaml do) so data and model agree")


class UnifiedDataModule(LightningDataModule):
    """Packed Batches of mixed sources for the unified model.

    The sequence encoder (text tokenizer, image path, slots per image) comes from the system being trained
    (`trainer.lightning_module.sequence_encoder`), so a recipe states those once, on the model.
    Resuming from a checkpoint continues the stream where it stopped (with num_workers=0 the resumed run
    sees exactly the batches an uninterrupted run would). When every source is encoded shards
    (`anymodal.data.shards.EncodedShards`), each reader's position is saved and restored directly, exact
    with any number of workers and ranks (`anymodal.data.resumable`).

    sources:     Sources whose Documents are mixed into training rows
    weights:     relative share of each source (default: equal)
    seq_len:     tokens per packed row
    batch_size:  rows per batch
    drop_text:   probability of dropping a t2i caption or an edit instruction (classifier-free guidance)
    drop_image:  probability of dropping an edit's source image (image guidance)
    seed:        seed of the mixing and dropout
    val_sources: Sources for validation (another seed than training); none: no validation
    val_batches: validation batches, the same ones every time
    num_workers: DataLoader worker processes (the sources shard themselves across them)
    pack_pool:   documents held back to fill rows best-fit (`anymodal.data.packing.pack_rows`); 0 packs them in
                 stream order. On the shapes mix, 32 cuts padding from 12.6% to 2.1% of tokens (16 x 256) and from
                 15.7% to 4.6% (8 x 384): 1.09-1.11x the document tokens per second (benchmarks/README.md).
                 A document waits at most `pack_pool` rows (a `TaskMixSwitch` takes hold that much later).
                 Encoded shards, whose readers' positions are saved, always pack in stream order.
    """

    def __init__(
        self,
        sources: list[Source],
        weights: list[float] | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        drop_text: float = 0.1,
        drop_image: float = 0.1,
        seed: int = 0,
        val_sources: list[Source] | None = None,
        val_batches: int = 2,
        num_workers: int = 0,
        pack_pool: int = 32,
    ) -> None:
        super().__init__()
        if pack_pool < 0:
            raise ValueError(f"pack_pool={pack_pool} must be >= 0 (0: pack in stream order)")
        for name, p in (("drop_text", drop_text), ("drop_image", drop_image)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p} must be a probability in [0, 1]")
        if seq_len < 8 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} are too small")
        self.sources, self.weights, self.seq_len, self.batch_size = sources, weights, seq_len, batch_size
        self.drop_text, self.drop_image, self.seed = drop_text, drop_image, seed
        self.val_sources, self.val_batches, self.num_workers = val_sources, val_batches, num_workers
        self.pack_pool = pack_pool
        self.encoder = None
        self.start = 0
        self.positions: dict | None = None  # the readers' saved positions (encoded shards), from load_state_dict
        self.loader = None

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "sequence_encoder"):
                raise ValueError("UnifiedDataModule needs a system with a `sequence_encoder` (UnifiedSystem)")
            self.encoder = module.sequence_encoder
            check_image_sizes(self.sources + list(self.val_sources or []), getattr(module, "image_size", None))
            from anymodal.data.shards import check_encoded_sources

            hp = getattr(module, "hparams", {})
            check_encoded_sources(self.sources + list(self.val_sources or []),
                                  getattr(module, "text_tokenizer_dir", None), hp.get("image_tokenizer"),
                                  hp.get("pre_encoded", False))

    def stream(self, sources: list[Source], weights: list[float] | None, seed: int, start: int = 0,
               drop: bool = True):
        from anymodal.data.stream import PackedBatches

        return PackedBatches(sources, self.encoder, self.seq_len, self.batch_size, weights,
                             self.drop_text if drop else 0.0, self.drop_image if drop else 0.0, seed, start,
                             self.pack_pool)

    def train_dataloader(self) -> DataLoader:
        from anymodal.data.resumable import ResumableLoader, SeekableBatches, seekable

        if seekable(self.sources):
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            batches = SeekableBatches(self.sources, self.encoder, self.seq_len, self.batch_size, self.weights,
                                      self.drop_text, self.drop_image, self.seed, rank, world)
            self.loader = ResumableLoader(batches, self.num_workers, self.start, self._saved_positions(world))
            return self.loader
        return DataLoader(self.stream(self.sources, self.weights, self.seed, self.start), batch_size=None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        import itertools

        batches = list(itertools.islice(iter(self.stream(self.val_sources, None, self.seed + 1, drop=False)),
                                        self.val_batches))
        return DataLoader(batches, batch_size=None)

    def state_dict(self) -> dict:
        trainer = self.trainer
        served = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else self.start
        if self.loader is None:
            return {"batches": served}
        from anymodal.data.resumable import gather_states

        world = trainer.world_size if trainer is not None else 1
        return {"batches": served, "readers": world * max(1, self.num_workers),
                "positions": gather_states(self.loader.state_at(served))}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state.get("batches", 0))
        self.positions = state if "positions" in state else None

    def _saved_positions(self, world: int) -> dict:
        """The readers' saved positions, when the run resumes with as many readers as it saved them with."""
        if self.positions is None:
            if self.start > 0:
                rank_zero_warn("the checkpoint holds no data positions (it was trained on other sources); the "
                               "shards start over")
            return {}
        readers = world * max(1, self.num_workers)
        if self.positions["readers"] != readers:
            rank_zero_warn(f"the checkpoint's data positions are for {self.positions['readers']} readers (ranks x "
                           f"workers) but this run has {readers}; each reader starts its shards over")
            return {}
        return self.positions["positions"]
