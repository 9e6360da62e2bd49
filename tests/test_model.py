import pytest
import torch

from distill.core import tokens
from distill.core.config import ModelConfig
from distill.core.model import ESM
from distill.core.pretrained import from_fair_esm, load_fair_esm


@pytest.mark.parametrize("preset, millions", [("small", 1.2), ("medium", 5.6), ("large", 33.7)])
def test_preset_parameter_counts_match_the_study(preset, millions):
    cfg = ModelConfig.preset(preset)
    assert cfg.ffn == 2 * cfg.dim
    n = ESM(cfg).num_parameters()
    assert abs(n / 1e6 - millions) / millions < 0.05


def test_lm_head_is_tied_to_token_embedding():
    m = ESM(ModelConfig(layers=1, dim=16, heads=2, ffn=32))
    assert m.lm_head.weight is m.embed_tokens.weight


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(layers=2, dim=30, heads=4, ffn=60)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")


def test_padding_never_changes_a_real_position(real_sequences):
    torch.manual_seed(0)
    model = ESM(ModelConfig(layers=2, dim=32, heads=4, ffn=64)).eval()
    batch = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in real_sequences]))
    with torch.no_grad():
        together = model(batch)
        for row, seq in enumerate(real_sequences):
            alone = model(torch.from_numpy(tokens.pad_batch([tokens.encode(seq)])))
            n = len(seq) + 2
            torch.testing.assert_close(together["representations"][row, :n], alone["representations"][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(together["logits"][row, :n], alone["logits"][0], atol=1e-5, rtol=0)


def test_mask_row_stays_zero_during_training():
    model = ESM(ModelConfig(layers=1, dim=16, heads=2, ffn=32))
    toks = torch.from_numpy(tokens.pad_batch([tokens.encode("MKVLAAG")]))
    toks[0, 2] = tokens.MASK
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(toks)["logits"].logsumexp(-1).sum().backward()
    assert model.embed_tokens.weight.grad[tokens.MASK].abs().sum() == 0
    assert model.embed_tokens.weight.grad[tokens.MASK - 1].abs().sum() > 0
    opt.step()
    assert model.embed_tokens.weight[tokens.MASK].abs().sum() == 0


@pytest.mark.parametrize("fixture", ["tiny_esm1b", "tiny_esm2"])
def test_same_logits_and_representations_as_fair_esm(fixture, request, real_sequences):
    """Published-layout checkpoints give fair-esm's outputs to <= 1e-5 (fp32), padding and <mask> included."""
    fair = load_fair_esm(str(request.getfixturevalue(fixture))).eval()
    ours = from_fair_esm(fair).eval()
    batch = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in real_sequences]))
    batch[:, 3] = tokens.MASK  # token-dropout rescaling path
    assert batch.eq(tokens.PAD).any()
    with torch.no_grad():
        expected = fair(batch, repr_layers=[len(fair.layers)])
        got = ours(batch)
    real = batch.ne(tokens.PAD)
    assert (expected["logits"] - got["logits"])[real].abs().max() <= 1e-5
    assert (expected["representations"][len(fair.layers)] - got["representations"])[real].abs().max() <= 1e-5
