"""The native decoder equals transformers' LlamaForCausalLM on shared weights, in both directions."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from anymodal.config import ArchConfig
from anymodal.masks import build_attention_mask
from anymodal.model.convert import from_llama_state_dict, llama_config, to_llama_state_dict
from anymodal.model.decoder import Decoder

VOCAB = 101


class TextModel(nn.Module):
    """The trio the unified model holds: embed_tokens, decoder, lm_head."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, arch.dim)
        self.decoder = Decoder(arch)
        self.lm_head = nn.Linear(arch.dim, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        document_ids = torch.zeros(B, T, dtype=torch.long)  # one document: plain causal attention
        continuous_ids = torch.full((B, T), -1, dtype=torch.long)
        positions = torch.arange(T).expand(B, T)
        mask = build_attention_mask(document_ids, continuous_ids, "sdpa")
        return self.lm_head(self.decoder(self.embed_tokens(tokens), positions, mask))  # (B, T, V)


@pytest.fixture
def arch():
    return ArchConfig.from_name("debug", rope_theta=500.0)  # a non-default theta must carry over too


@torch.no_grad()
def test_llama_weights_into_native_give_the_same_logits(arch):
    llama = LlamaForCausalLM(llama_config(arch, VOCAB)).eval()
    native = TextModel(arch).eval()
    native.load_state_dict(from_llama_state_dict(llama.state_dict()), strict=True)
    tokens = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(native(tokens), llama(tokens).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_native_weights_into_llama_give_the_same_logits(arch):
    native = TextModel(arch).eval()
    for p in native.parameters():  # move the norms off 1 so a dropped or swapped norm would show
        p.add_(0.05 * torch.randn_like(p))
    llama = LlamaForCausalLM(llama_config(arch, VOCAB)).eval()
    llama.load_state_dict(to_llama_state_dict(native.state_dict()), strict=True)
    tokens = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(llama(tokens).logits, native(tokens), atol=1e-4, rtol=1e-4)
    round_trip = from_llama_state_dict(to_llama_state_dict(native.state_dict()))
    assert round_trip.keys() == native.state_dict().keys()


def test_conversion_refuses_what_llama_cannot_hold():
    arch = ArchConfig.from_name("debug", qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        llama_config(arch, VOCAB)
    with pytest.raises(ValueError, match="qk_norm"):
        to_llama_state_dict(TextModel(arch).state_dict())
    sd = TextModel(ArchConfig.from_name("debug")).state_dict()
    sd["patch_in.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="patch_in.weight"):
        to_llama_state_dict(sd)
    assert "patch_in.weight" not in to_llama_state_dict(sd, strict=False)


def test_tied_llama_checkpoint_gets_its_embedding_as_head():
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, 64), "model.norm.weight": torch.ones(64)}
    out = from_llama_state_dict(sd)
    assert out["lm_head.weight"] is out["embed_tokens.weight"]
