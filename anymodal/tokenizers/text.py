"""Text tokenizer: a byte-level BPE trained here with `tokenizers`, or any local Hugging Face tokenizer folder.

Every text tokenizer carries the specials `<bos> <eos> <pad> <boi> <eoi>`. A loaded tokenizer keeps its own
bos, eos and pad tokens (a pretrained LM's, whose embedding rows are trained) and gets only what it lacks
added: `<boi>`/`<eoi>`, and `<bos>`/`<eos>`/`<pad>` where it has none (a pad that is also its eos or bos gets
its own `<pad>`: sampling masks the pad out). Saved and loaded as a standard Hugging Face tokenizer folder.
This is the only module that imports Hugging Face `tokenizers`/`transformers` for text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>")


class TextTokenizer:
    """A Hugging Face fast tokenizer plus the ids of the specials the unified model uses."""

    def __init__(self, hf_tokenizer) -> None:
        own = {"<bos>": hf_tokenizer.bos_token, "<eos>": hf_tokenizer.eos_token, "<pad>": hf_tokenizer.pad_token}
        if own["<pad>"] in (own["<eos>"], own["<bos>"]):
            own["<pad>"] = None
        tokens = {s: own.get(s) or s for s in SPECIALS}  # the tokenizer's own token for the role, or ours
        missing = list(dict.fromkeys(t for t in tokens.values() if not _known(hf_tokenizer, t)))
        if missing:
            hf_tokenizer.add_special_tokens({"additional_special_tokens": missing})
        hf_tokenizer.bos_token, hf_tokenizer.eos_token = tokens["<bos>"], tokens["<eos>"]
        hf_tokenizer.pad_token = tokens["<pad>"]
        self.hf = hf_tokenizer
        self.added: tuple[str, ...] = tuple(missing)
        """The specials this tokenizer lacked and got here (new, untrained rows for a pretrained LM)."""
        ids = {s: hf_tokenizer.convert_tokens_to_ids(t) for s, t in tokens.items()}
        self.bos_id, self.eos_id, self.pad_id = ids["<bos>"], ids["<eos>"], ids["<pad>"]
        self.boi_id, self.eoi_id = ids["<boi>"], ids["<eoi>"]

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (image codes go after this in a shared vocabulary)."""
        return len(self.hf)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id)

    @property
    def added_ids(self) -> tuple[int, ...]:
        """Ids of the specials in `added`."""
        return tuple(self.hf.convert_tokens_to_ids(t) for t in self.added)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no specials added."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, specials dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))


def _known(hf_tokenizer, token: str) -> bool:
    """Is `token` in the vocabulary (and not just mapped to the unknown token)?"""
    i = hf_tokenizer.convert_tokens_to_ids(token)
    return i is not None and (i != hf_tokenizer.unk_token_id or token == hf_tokenizer.unk_token)


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2,
                         lowercase: bool = False) -> TextTokenizer:
    """Train a byte-level BPE on `texts`; the specials take the first ids. With `lowercase`, text is lower-cased
    before it is split (a `Lowercase` normalizer, saved with the tokenizer): for a lower-case corpus, so that
    text typed in other casing reads as the words the model learned."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 additional_special_tokens=["<boi>", "<eoi>"])
    return TextTokenizer(hf)


def load_text_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load a local Hugging Face tokenizer folder (never the hub)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"text tokenizer folder {str(path)!r} does not exist; train one or pass a local folder")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a Hugging Face tokenizer folder ({e.__class__.__name__})") from None
    return TextTokenizer(hf)
