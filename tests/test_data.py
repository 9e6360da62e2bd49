import esm
import numpy as np
import pytest

from distill.core import data, tokens


def test_encode_uses_esm1b_alphabet_and_pad_batch_adds_bos_eos():
    a = esm.Alphabet.from_architecture("ESM-1b")
    ids = tokens.encode("MKV")
    assert ids.tolist() == [a.get_idx("M"), a.get_idx("K"), a.get_idx("V")]
    batch = tokens.pad_batch([ids, tokens.encode("A")])
    # Same layout as fair-esm's own batch converter.
    _, _, expected = a.get_batch_converter()([("x", "MKV"), ("y", "A")])
    assert batch.tolist() == expected.tolist()


def test_mask_count_targets_and_80_10_10():
    seq = np.random.default_rng(0).choice(tokens.AMINO_ACID_IDS, size=1000).astype(np.uint8)
    inp, labels = data.mask(seq, np.random.default_rng(1), 0.15)
    targets = labels != data.IGNORE
    assert targets.sum() == 150
    assert (labels[targets] == seq[targets]).all() and (inp[~targets] == seq[~targets]).all()
    # Over many draws the replacement split is 80 / 10 / 10.
    counts = np.zeros(3)
    for s in range(200):
        inp, labels = data.mask(seq, np.random.default_rng(s), 0.15)
        t = labels != data.IGNORE
        is_mask = inp[t] == tokens.MASK
        same = inp[t] == seq[t]
        counts += [is_mask.sum(), (~is_mask & ~same).sum(), same.sum()]
    frac = counts / counts.sum()
    assert abs(frac[0] - 0.8) < 0.01 and abs(frac[2] - 0.1 - 0.1 / 20) < 0.01  # random draw hits the original 1/20


def test_short_sequence_gets_at_least_one_target_and_bos_eos_pad_never_masked():
    ex = [data.masked_example(tokens.encode(s), 0, 0, k, 0.15, True) for k, s in enumerate(["MK", "MKVLAAGHW"])]
    batch = data.collate(ex, [0, 1])
    assert (batch.labels[:, 0] == data.IGNORE).all()  # BOS
    assert batch.labels[0, 3:].eq(data.IGNORE).all()  # EOS and pad of the short row
    assert [(row != data.IGNORE).sum().item() for row in batch.labels] == [1, 1]


def test_crop_random_in_training_leading_in_evaluation():
    seq = np.arange(2000)  # value = position, so a window tells where it starts
    assert (data.crop(seq, None) == seq[:1022]).all()
    starts = set()
    for s in range(20):
        window = data.crop(seq, np.random.default_rng(s))
        start = int(window[0])
        assert (window == seq[start : start + 1022]).all()
        starts.add(start)
    assert len(starts) > 10
    short = seq[:100]
    assert data.crop(short, np.random.default_rng(0)) is short


def test_masking_is_keyed_not_streamed():
    seq = tokens.encode("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ")
    a = data.masked_example(seq, 3, 1, 42, 0.15, True)
    b = data.masked_example(seq, 3, 1, 42, 0.15, True)
    c = data.masked_example(seq, 3, 2, 42, 0.15, True)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not ((a[1] == c[1]).all())


def test_token_budget_groups_respect_budget_and_keep_every_sequence():
    lengths = np.array([10, 300, 50, 52, 299, 11, 1022, 5])
    groups = tokens.token_budget_groups(lengths, np.arange(8), max_tokens=1100)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for g in groups:
        assert len(g) * (max(lengths[g]) + 2) <= 1100
    with pytest.raises(ValueError, match="raise it to at least 1024"):
        tokens.token_budget_groups(lengths, np.arange(8), max_tokens=1000)


def test_plan_epoch_covers_each_sequence_once_and_buckets_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 1000, size=1000)
    plan = data.plan_epoch(lengths, batch_size=64, seed=0, epoch=0)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(1000))
    assert plan[0].tolist() != data.plan_epoch(lengths, 64, 0, 1)[0].tolist()
    # Bucketing: within a step the length spread is far below the data's spread.
    spread = np.mean([lengths[s].max() - lengths[s].min() for s in plan if len(s) == 64])
    assert spread < 0.2 * (lengths.max() - lengths.min())


def test_validation_split_is_stable_and_near_fraction():
    ids = [f"protein_{i}" for i in range(5000)]
    chosen = [i for i in ids if data.in_validation(i, 0.1)]
    assert 400 < len(chosen) < 600
    assert chosen == [i for i in reversed(ids) if data.in_validation(i, 0.1)][::-1]  # order-independent


def test_padding_fraction():
    b = data.collate([(np.array([5, 5]), np.array([5, data.IGNORE])), (np.array([5] * 6), np.full(6, data.IGNORE))], [0, 1])
    # rows are 8 wide: 4 real + 4 pad, 8 real + 0 pad
    assert data.padding_fraction([b]) == pytest.approx(4 / 16)
