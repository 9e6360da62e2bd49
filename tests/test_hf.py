"""Hugging Face interop: transformers ESM checkpoints in (both layouts), students out as EsmForMaskedLM, round trips."""

import json

import pytest
import torch
from conftest import EXAMPLES, write_fasta
from typer.testing import CliRunner

from distill.cli.app import app
from distill.core import tokens
from distill.core.bundle import load_any, load_bundle, save_bundle
from distill.core.config import ModelConfig
from distill.core.hf import HFError
from distill.core.model import ESM

transformers = pytest.importorskip("transformers", reason="pip install 'esm-distill[hf]'")
runner = CliRunner()
RARE = "MKTXBUZOACDEFGHIKLMNPQRSTVWY"


def tiny_hf(tmp_path, layout: str):
    """A random EsmForMaskedLM written by transformers itself: ESM-1b layout or ESM-2 (rotary) layout."""
    esm1b = layout == "esm1b"
    cfg = transformers.EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1,
        mask_token_id=32, max_position_embeddings=1026, position_embedding_type="absolute" if esm1b else "rotary",
        emb_layer_norm_before=esm1b, token_dropout=True, layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.EsmForMaskedLM(cfg).eval()
    model.save_pretrained(tmp_path / layout)
    return model, tmp_path / layout


def batch_of(seqs):
    toks = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in seqs]))
    toks[:, 3] = tokens.MASK  # the token-dropout path
    return toks


@pytest.mark.parametrize("layout", ["esm1b", "esm2"])
def test_hf_checkpoints_load_with_transformers_outputs(tmp_path, real_sequences, layout):
    hf, path = tiny_hf(tmp_path, layout)
    ours, card = load_any(str(path))
    toks = batch_of(real_sequences + [RARE])
    with torch.no_grad():
        want = hf(input_ids=toks, attention_mask=toks.ne(tokens.PAD), output_hidden_states=True)
        got = ours(toks)
    real = toks.ne(tokens.PAD)
    assert (want.logits - got["logits"])[real].abs().max() <= 1e-5
    assert (want.hidden_states[-1] - got["representations"])[real].abs().max() <= 1e-5
    assert card["model"]["position_embedding"] == ("learned" if layout == "esm1b" else "rotary")


def test_a_bundle_exports_to_hf_with_tokenizer_heads_and_card_and_comes_back(tmp_path, real_sequences):
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "student", ESM(ModelConfig(2, 32, 4, 64)), "custom", {"lam": 0.5, "temperature": 2.0, "val_ppl": 12.5})
    res = runner.invoke(app, ["probe", str(bundle), "--data", str(EXAMPLES / "pfam.fasta"), "--task", "pfam", "--min-per-class", "5"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "hf"
    res = runner.invoke(app, ["export", "hf", str(bundle), "-o", str(out)])
    assert res.exit_code == 0, res.output
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    seqs = real_sequences[:3] + [RARE]
    ids = tokenizer(seqs, padding=True, return_tensors="pt")
    ours = torch.from_numpy(tokens.pad_batch([tokens.encode(s) for s in seqs]))
    assert ids["input_ids"].tolist() == ours.tolist()  # the tokenizer's ids are ours, rare residues and specials included
    student, _ = load_bundle(bundle)
    with torch.no_grad():
        want = student(ours)
        got = model(**ids, output_hidden_states=True)
    real = ours.ne(tokens.PAD)
    assert (got.logits - want["logits"])[real].abs().max() <= 1e-5
    assert (got.hidden_states[-1] - want["representations"])[real].abs().max() <= 1e-5
    assert (out / "heads" / "pfam" / "head.safetensors").is_file() and "load_head('heads/pfam')" in (out / "README.md").read_text()
    assert "lambda = 0.5, temperature T = 2.0" in (out / "README.md").read_text()
    # round trip: the HF directory is a teacher for `fit` and a model for `annotate`
    fasta = write_fasta(tmp_path / "in.fa", [(f"s{i}", s) for i, s in enumerate(real_sequences)])
    res = runner.invoke(app, ["fit", str(fasta), "--teacher", str(out), "--preset", "custom", "--layers", "1", "--dim", "16",
                              "--attention-heads", "2", "--epochs", "1", "--batch-size", "4", "--valid-fraction", "0", "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "student" / "config.json").read_text())["training"]["teacher"] == str(out)
    res = runner.invoke(app, ["annotate", str(fasta), "--model", str(out), "-o", str(tmp_path / "a.tsv"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "a.tsv").read_text().splitlines()) == len(real_sequences) + 1


def test_non_esm_corrupt_and_unsupported_hf_directories_are_refused(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    with pytest.raises(HFError, match="is a 'bert' model, not ESM"):
        load_any(str(bert))
    _, path = tiny_hf(tmp_path, "esm1b")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HFError, match="is corrupt or truncated"):
        load_any(str(path))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 64}))
    with pytest.raises(HFError, match="esm-distill runs the 33-token ESM alphabet"):
        load_any(str(path))
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2050}))
    with pytest.raises(HFError, match="ESM-1b's layout has 1026"):
        load_any(str(path))
    (path / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 1e-12}))
    with pytest.raises(HFError, match="layer_norm_eps 1e-12; ESM checkpoints"):
        load_any(str(path))
    with pytest.raises(HFError, match="not in the local Hugging Face cache"):
        load_any("facebook/esm1b_t33_650M_UR50S_not_cached")
