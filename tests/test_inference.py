"""The inference layer: tokeniser parity with fair-esm, policies, batching, input order, resolve, torch-free ONNX."""

import os
import subprocess
import sys

import esm
import numpy as np
import pytest
import torch
from conftest import REPO, write_fasta

from distill.core import tokens
from distill.core.bundle import save_bundle
from distill.core.config import ModelConfig
from distill.core.model import ESM
from distill.inference import Inference, SequenceError, resolve
from distill.inference.layer import Outputs
from distill.inference.sequences import long_note, prepare, spans


def test_numpy_tokeniser_equals_fair_esm_on_real_sequences(real_sequences):
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    assert list(tokens.TOKENS) == alphabet.all_toks
    assert (tokens.PAD, tokens.CLS, tokens.EOS, tokens.MASK) == (
        alphabet.padding_idx,
        alphabet.cls_idx,
        alphabet.eos_idx,
        alphabet.mask_idx,
    )
    _, _, expected = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(real_sequences)])
    assert tokens.pad_batch([tokens.encode(s) for s in real_sequences]).tolist() == expected.tolist()
    assert tokens.decode(tokens.encode(real_sequences[2])) == real_sequences[2]


class Lengths:
    """A backend whose 'embedding' of a piece is (its length, its first residue id, batch rows) and whose one head
    puts probability 1 on label (length mod 3): every number below is computable by hand."""

    name, dim, provider, metadata = "lengths", 3, "test", {}
    labels, thresholds = {"mod3": ["0", "1", "2"]}, {"mod3": 0.5}

    def __init__(self, max_tokens=None, max_rows=None):
        self.max_tokens, self.max_rows, self.batches = max_tokens, max_rows, []

    def forward(self, batch, sequences, tasks, residues, cls):
        self.batches.append(batch.shape)
        n = (batch != tokens.PAD).sum(1) - 2
        mean = np.stack([n, batch[:, 1], np.full(len(n), len(n))], 1).astype(np.float32)
        probs = {t: np.eye(3, dtype=np.float32)[n % 3] for t in tasks}
        reps = np.repeat(batch[:, :, None].astype(np.float32), 3, 2)  # residue "vector" = its token id, 3 times
        return Outputs(mean, probs, mean * 2 if cls else None, reps if residues else None)


def test_input_order_token_budget_and_row_limits():
    backend = Lengths(max_rows=2)
    inference = Inference(backend, max_tokens=40)
    seqs = ["MKV" * 5, "A", "GG" * 4, "W" * 3]  # 15, 1, 8, 3 residues
    out = inference.embed(seqs, tasks=["mod3"])
    assert [e.sequence[0] for e in out] == [15, 1, 8, 3]  # input order restored
    assert [e.sequence[1] for e in out] == [tokens.TOKENS.index(s[0]) for s in seqs]
    assert [int(e.probabilities["mod3"].argmax()) for e in out] == [0, 1, 2, 0]
    # sorted by length: [A, W3, G8, MKV15]; budget 40 tokens -> rows x (longest + 2) <= 40, at most 2 rows
    assert backend.batches == [(2, 5), (1, 10), (1, 17)]
    assert inference.thresholds == {"mod3": 0.5} and not any(e.cropped for e in out)


def test_windows_average_and_stitch_residues_and_crop():
    seq = "M" + "A" * 1499 + "W" * 500  # 2,000 residues -> windows (0,1022) (511,1533) (978,2000)
    assert spans(2000, "windows") == [(0, 1022), (511, 1533), (978, 2000)]
    e = Inference(Lengths()).embed([seq, "MKV"], long="windows", per_residue=True, tasks=["mod3"], cls=True)
    assert e[0].cropped and not e[1].cropped
    assert e[0].sequence[0] == 1022 and e[0].sequence[1] == pytest.approx((tokens.TOKENS.index("M") + 2 * tokens.TOKENS.index("A")) / 3)
    np.testing.assert_allclose(e[0].probabilities["mod3"], [0, 0, 1])  # 1022 % 3 == 2 in every window
    np.testing.assert_allclose(e[0].cls, 2 * e[0].sequence)
    assert e[0].residues.shape == (2000, 3)  # the whole sequence, overlaps averaged: equal ids stay equal
    np.testing.assert_allclose(e[0].residues[:, 0], tokens.encode(seq).astype(np.float32))
    cropped = Inference(Lengths()).embed([seq], long="crop", per_residue=True)[0]
    assert cropped.residues.shape == (1022, 3) and cropped.sequence[0] == 1022
    assert long_note(2000, "crop") == "cropped: leading 1022 of 2000 residues"
    assert long_note(2000, "windows") == "windows: 3 x 1022 residues (stride 511), averaged"


def test_validation_names_the_sequence_and_the_problem():
    with pytest.raises(SequenceError, match="sequence 2: illegal residue 'J' at position 3"):
        prepare(["MKV", "mkJL"])
    with pytest.raises(SequenceError, match="sequence 1: empty sequence"):
        prepare(["  "])
    with pytest.raises(SequenceError, match="sequence 1: 1023 residues exceed the limit of 1022"):
        prepare(["M" * 1023])
    with pytest.raises(ValueError, match="policy must be one of error, crop, windows"):
        prepare(["M"], "truncate")
    assert prepare([" mkv\n"]).pieces == ["MKV"]


def test_resolve_gives_every_spec_the_same_layer(tmp_path):
    a = resolve("random:small@3").embed(["MKTAYIAKQR"])[0].sequence
    b = resolve("random:small@3").embed(["MKTAYIAKQR"])[0].sequence
    c = resolve("random:small").embed(["MKTAYIAKQR"])[0].sequence
    np.testing.assert_array_equal(a, b)
    assert a.shape == (128,) and not np.allclose(a, c)  # the seed is honoured
    with pytest.raises(ValueError, match="carries its heads in the graph"):
        resolve("x.onnx", heads="h")
    with pytest.raises(ValueError, match="after random: give a preset"):
        resolve("random:huge")


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    from export.onnx import export, source_of

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("torchfree")
    bundle = save_bundle(root / "student", ESM(ModelConfig(layers=2, dim=32, heads=4, ffn=64)), "custom")
    model, card = resolve(bundle).backend.model, {"name": "student"}
    export(model, root / "s.onnx", source_of(str(bundle), card))
    return bundle, root / "s.onnx"


def test_onnx_paths_never_import_torch(tiny_graph, tmp_path, real_sequences):
    """`distill annotate --model X.onnx`, the service module and the student-onnx engine run where torch and fair-esm
    cannot be imported (the Bento image carries neither)."""
    bundle, graph = tiny_graph
    fasta = write_fasta(tmp_path / "in.fa", [(f"s{i}", s) for i, s in enumerate(real_sequences)])
    block = "import sys; sys.modules['torch'] = None; sys.modules['esm'] = None\n"
    annotate = f"from distill.cli.app import main; sys.argv = ['distill', 'annotate', {str(fasta)!r}, '-o', {str(tmp_path / 'o.tsv')!r}, '--model', {str(graph)!r}, '--embeddings', {str(tmp_path / 'e.npy')!r}, '--quiet']; main()"
    engine = f"import serve.service; from serve.store import open_stored; import shutil, pathlib; d = pathlib.Path({str(tmp_path / 'stored')!r}); d.mkdir(); shutil.copy({str(graph)!r}, d / 'model.onnx'); print(open_stored(d).embed(['MKV'])[0].sequence.shape)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for code in (annotate, engine):
        res = subprocess.run([sys.executable, "-c", block + code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
    assert "(32,)" in res.stdout
    torch_side = resolve(bundle).run(real_sequences, [])[0]
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), torch_side, atol=1e-4)
