import pytest

from anymodal.tokenizers.text import SPECIALS, load_text_tokenizer, train_text_tokenizer

TEXTS = [
    "a red circle at the top left and a blue square at the center",
    "move the red circle to the bottom right",
    "what color is the triangle? yellow",
    "a handwritten seven",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(TEXTS, vocab_size=400)


def test_specials_have_distinct_ids(tok):
    ids = tok.special_ids
    assert len(set(ids)) == len(SPECIALS)
    assert tok.boi_id == tok.hf.convert_tokens_to_ids("<boi>")


def test_round_trip_and_compression(tok):
    text = "a red circle at the top left and a blue square at the center"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE merged words
    assert not set(ids) & set(tok.special_ids)


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path / "tok")
    again = load_text_tokenizer(tmp_path / "tok")
    for t in TEXTS[:4]:
        assert again.encode(t) == tok.encode(t)
    assert again.special_ids == tok.special_ids and len(again) == len(tok)


def test_loading_a_folder_without_specials_adds_them(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path / "plain")
    tok = load_text_tokenizer(tmp_path / "plain")
    assert len(set(tok.special_ids)) == 5 and min(tok.special_ids) >= raw.get_vocab_size()
    assert tok.decode(tok.encode("a red circle")).replace(" ", "") == "aredcircle"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_tokenizer(tmp_path / "nope")
