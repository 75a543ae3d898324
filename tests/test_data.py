"""Dataset preparation: document-level split, idempotence, atomic files, counts."""
import json
import os

import numpy as np
import pytest

import data


@pytest.fixture
def tmp_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    docs = [f'document {i} ' + 'abc' * (i + 1) for i in range(30)]
    src = tmp_path / 'corpus'
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f'{i:02d}.txt').write_text(d)
    return tmp_path, str(src), docs


def read(out, split, meta):
    return np.fromfile(os.path.join(out, f'{split}.bin'), dtype=meta['dtype'])


def split_docs(tokens, eot):
    """Token stream -> list of documents (each ends with eot)."""
    ends = np.flatnonzero(tokens == eot)
    return [bytes(tokens[a + 1 if i else 0:b].astype(np.uint8)).decode()
            for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def test_document_level_split_and_counts(tmp_data):
    tmp, src, docs = tmp_data
    out = data.prepare(src, 'byte', val_frac=0.2, num_proc=1)
    meta = data.load_meta(out)
    train, val = read(out, 'train', meta), read(out, 'val', meta)
    assert meta['vocab_size'] == 257 and meta['eot'] == 256 and meta['dtype'] == 'uint16'
    assert meta['train_tokens'] == len(train) and meta['val_tokens'] == len(val)
    train_docs, val_docs = split_docs(train, 256), split_docs(val, 256)
    assert meta['train_docs'] == len(train_docs) and meta['val_docs'] == len(val_docs) >= 1
    # every document lands whole in exactly one split
    assert sorted(train_docs + val_docs) == sorted(docs)
    # deterministic from the seed, different for another seed
    again = data.prepare(src, 'byte', force=True, val_frac=0.2, num_proc=2)
    assert split_docs(read(again, 'val', meta), 256) == val_docs
    other = data.prepare(src, 'byte', force=True, val_frac=0.2, seed=7, num_proc=1)
    assert split_docs(read(other, 'val', meta), 256) != val_docs


def test_val_is_never_empty(tmp_data):
    tmp, src, docs = tmp_data
    out = data.prepare(src, 'byte', val_frac=0.0, num_proc=1)
    assert data.load_meta(out)['val_docs'] == 1


def test_rerun_is_a_noop_unless_forced(tmp_data):
    tmp, src, docs = tmp_data
    out = data.prepare(src, 'byte', num_proc=1)
    stamp = os.path.getmtime(os.path.join(out, 'train.bin'))
    os.utime(os.path.join(out, 'train.bin'), (stamp - 100, stamp - 100))
    data.prepare(src, 'byte', num_proc=1)
    assert os.path.getmtime(os.path.join(out, 'train.bin')) == stamp - 100
    data.prepare(src, 'byte', force=True, num_proc=1)
    assert os.path.getmtime(os.path.join(out, 'train.bin')) > stamp - 100


def test_a_failure_leaves_no_partial_files(tmp_data, monkeypatch):
    tmp, src, docs = tmp_data

    def broken(name, args):
        yield 'one document'
        yield 'another'
        raise RuntimeError('disk on fire')
    monkeypatch.setattr(data, 'documents', broken)
    with pytest.raises(RuntimeError):
        data.prepare(src, 'byte', num_proc=1)
    out = data.dataset_dir(src, 'byte')
    assert os.listdir(out) == []


def test_jsonl_and_parquet_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    rows = [{'text': f'row {i} ' * 3, 'id': i} for i in range(12)]
    jl = tmp_path / 'corpus.jsonl'
    jl.write_text('\n'.join(json.dumps(r) for r in rows))
    meta = data.load_meta(data.prepare(str(jl), 'byte', num_proc=1))
    assert meta['train_docs'] + meta['val_docs'] == 12
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{'content': r['text']} for r in rows]), tmp_path / 'corpus.parquet')
    meta = data.load_meta(data.prepare(str(tmp_path / 'corpus.parquet'), 'byte', num_proc=1,
                                       text_column='content', max_docs=5))
    assert meta['train_docs'] + meta['val_docs'] == 5


def test_gpt2_tokenizer_offline():
    tok = data.get_tokenizer('gpt2')
    assert tok.encode('Hello world') == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot == 50256
    assert data.token_dtype(tok.vocab_size) == np.uint16
    assert data.token_dtype(100277) == np.uint32  # cl100k_base needs 32 bits


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='unknown tokenizer'):
        data.get_tokenizer('not_an_encoding')
    import tiktoken

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(SystemExit, match='TIKTOKEN_CACHE_DIR'):
        data.get_tokenizer('cl100k_base')
    with pytest.raises(SystemExit, match='no .txt/.jsonl/.parquet files'):
        list(data.documents(str(tmp_path), data.get_parser().parse_args(['x'])))
