"""Key/value cache for decoding: one growable buffer per layer, shared length.

A forward pass uses the cache in one of two ways:

- write (prefill, text and discrete-code decoding): the new keys/values are appended and `length` grows;
- peek (`write=False`, each denoising step of a continuous image): the new queries attend to the cached
  prefix plus the new keys, and the cache is left as it was.

Both write the new keys/values into the buffer just past `length` (no concatenation); only a write commits
them by advancing `length`, so a peek leaves `keys(i)`/`values(i)` unchanged. Meant for inference
(`torch.no_grad()`); training never uses a cache.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values, each (B, H_kv, T, Dh), of the first `length` positions."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.length = 0
        self._k: list[torch.Tensor | None] = [None] * n_layers  # each (B, H_kv, capacity, Dh)
        self._v: list[torch.Tensor | None] = [None] * n_layers

    def keys(self, layer: int) -> torch.Tensor:
        """(B, H_kv, length, Dh) keys of `layer`."""
        return self._buffer(self._k, layer)[:, :, : self.length]

    def values(self, layer: int) -> torch.Tensor:
        """(B, H_kv, length, Dh) values of `layer`."""
        return self._buffer(self._v, layer)[:, :, : self.length]

    @property
    def batch_size(self) -> int:
        return 0 if self._k[0] is None else self._k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Places new k, v: (B, H_kv, T, Dh) after the cached positions of `layer`.

        Returns keys and values of the cached prefix plus the new tokens, each (B, H_kv, length + T, Dh).
        `length` does not move until `advance` is called (the decoder does so after a writing pass).
        """
        end = self.length + k.shape[2]
        B, H, _, Dh = k.shape
        for buffers, new in ((self._k, k), (self._v, v)):
            buf = buffers[layer]
            if buf is not None and (buf.shape[0], buf.shape[1], buf.shape[3]) != (B, H, Dh):
                raise ValueError(
                    f"new keys {tuple(new.shape)} do not fit the cache of layer {layer} {tuple(buf.shape)}; "
                    "batch and heads must match the prefill (use repeat_batch/index_select to change the batch)"
                )
            if buf is None or buf.shape[2] < end:
                capacity = max(end, 2 * (0 if buf is None else buf.shape[2]))
                grown = new.new_empty(B, H, capacity, Dh)  # (B, H_kv, capacity, Dh)
                if buf is not None:
                    grown[:, :, : self.length] = buf[:, :, : self.length]
                buffers[layer] = buf = grown
            buf[:, :, self.length : end] = new
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Commits the `n` positions last passed to `update` in every layer."""
        self.length += n

    def crop(self, length: int) -> None:
        """Forgets every position from `length` on (e.g. to drop a rejected continuation)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def index_select(self, index: torch.Tensor) -> KVCache:
        """A new cache holding the batch rows `index` (e.g. to keep only the conditional branch)."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_batch(self, n: int) -> KVCache:
        """A new cache with the batch tiled n times: rows [b0, b1, b0, b1, ...] (like `Tensor.repeat`),
        e.g. to share one prefix between the conditional and unconditional branches of guidance."""
        return self._map(lambda t: t.repeat(n, 1, 1, 1))

    def clone(self) -> KVCache:
        return self._map(lambda t: t.clone())

    def _map(self, fn) -> KVCache:
        out = KVCache(self.n_layers)
        out.length = self.length
        out._k = [None if t is None else fn(t[:, :, : self.length]) for t in self._k]
        out._v = [None if t is None else fn(t[:, :, : self.length]) for t in self._v]
        return out

    def _buffer(self, buffers: list[torch.Tensor | None], layer: int) -> torch.Tensor:
        buf = buffers[layer]
        if buf is None:
            raise ValueError(f"layer {layer} of the cache is empty; run a prefill first")
        return buf

    def __repr__(self) -> str:
        return f"KVCache(n_layers={self.n_layers}, length={self.length}, batch_size={self.batch_size})"
