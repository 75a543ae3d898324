"""The train/val split: each document goes where its own coin in_val(index, seed, val_frac)
sends it, the coins fall with probability val_frac, and they depend on all of the index."""
import numpy as np

import data
from test_data import read, split_docs


def test_held_out_fraction_is_val_frac():
    n = 20000
    for frac in (0.01, 0.1, 0.5):
        held = sum(data.in_val(i, 1337, frac) for i in range(n)) / n
        assert abs(held - frac) < 5 * (frac * (1 - frac) / n) ** 0.5, frac
    assert not any(data.in_val(i, 0, 0.0) for i in range(1000))
    assert all(data.in_val(i, 0, 1.0) for i in range(1000))


def test_coins_depend_on_every_part_of_the_index():
    """A hash of part of the index (low digits, low bits, all but the last digit...) makes
    documents a shift apart share their coin: at val_frac 0.5 they agree half the time."""
    idx = np.arange(4000) + 10 ** 9 + 12345

    def coin(i):
        return data.in_val(int(i), 1337, 0.5)
    shifts = [1, 2, 3, 7, 10, 100, 1000, 10 ** 4, 10 ** 5, 10 ** 6, 10 ** 8, 10 ** 9]
    shifts += [2 ** k for k in range(2, 34, 3)]
    for shift in shifts:
        agree = np.mean([coin(i) == coin(i + shift) for i in idx])
        assert abs(agree - 0.5) < 5 * 0.5 / len(idx) ** 0.5, shift
    agree = np.mean([data.in_val(int(i), 1, 0.5) == data.in_val(int(i), 2, 0.5) for i in idx])
    assert abs(agree - 0.5) < 5 * 0.5 / len(idx) ** 0.5  # and on the seed


def test_each_document_lands_where_its_coin_says(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    n, frac, seed = 300, 0.25, 2
    src = tmp_path / 'corpus'
    src.mkdir()
    for i in range(n):  # documents are read in file-name order: index i
        (src / f'{i:04d}.txt').write_text(f'doc {i}.')
    out = data.prepare(str(src), 'byte', val_frac=frac, seed=seed, num_proc=1)
    meta = data.load_meta(out)
    val = split_docs(read(out, 'val', meta), meta['eot'])
    expected = [f'doc {i}.' for i in range(n) if data.in_val(i, seed, frac)]
    assert not data.in_val(n - 1, seed, frac)  # the last document belongs to train
    assert sorted(val) == sorted(expected) and meta['val_docs'] == len(expected)
    train = split_docs(read(out, 'train', meta), meta['eot'])
    assert len(train) == meta['train_docs'] == n - len(expected)
