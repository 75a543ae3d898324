"""Dataset preparation: document-level split, idempotence, atomic files, counts,
concurrent runs, leftovers, source keys, bad input, Hugging Face tokenizers."""
import json
import os
import subprocess
import sys
import time

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
    # no half-written files, no empty folder
    assert not os.path.exists(data.dataset_dir(src, 'byte'))


def test_jsonl_and_parquet_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    rows = [{'text': f'row {i} ' * 3, 'id': i} for i in range(12)]
    jl = tmp_path / 'corpus.jsonl'
    jl.write_text('\n'.join(json.dumps(r) for r in rows))
    meta = data.load_meta(data.prepare(str(jl), 'byte', num_proc=1))
    assert meta['train_docs'] + meta['val_docs'] == 12
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist([{'content': r['text']} for r in rows])
    pq.write_table(table, tmp_path / 'corpus.parquet')
    meta = data.load_meta(data.prepare(str(tmp_path / 'corpus.parquet'), 'byte', num_proc=1,
                                       text_column='content', max_docs=5))
    assert meta['train_docs'] + meta['val_docs'] == 5


def test_token_dtype():
    assert data.token_dtype(50257) == np.uint16  # gpt2
    assert data.token_dtype(100277) == np.uint32  # cl100k_base needs 32 bits


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='unknown tokenizer'):
        data.get_tokenizer('not_an_encoding')
    import tiktoken

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    data.get_tokenizer.cache_clear()
    with pytest.raises(SystemExit, match='TIKTOKEN_CACHE_DIR'):
        data.get_tokenizer('cl100k_base')
    with pytest.raises(SystemExit, match='no .txt/.jsonl/.json/.parquet files'):
        list(data.documents(str(tmp_path), data.get_parser().parse_args(['x'])))


PREPARE_MEETING = '''
import json, os, sys, time, types
# data.py needs torch only for batches: skip its slow import
sys.modules['torch'] = types.ModuleType('torch')
import data
data.DATA_DIR, source, meeting = sys.argv[1:]
dump = json.dump


# both processes hold their meta.json temporary file open before either renames it
def meet(*a, **k):
    open(os.path.join(meeting, str(os.getpid())), 'w').close()
    start = time.time()
    while len(os.listdir(meeting)) < 2 and time.time() - start < 60:
        time.sleep(0.01)
    dump(*a, **k)


json.dump = meet
data.prepare(source, 'byte', num_proc=1)
'''


def test_two_preparations_at_once(tmp_data):
    tmp, src, docs = tmp_data
    (tmp / 'meeting').mkdir()
    cmd = [sys.executable, '-c', PREPARE_MEETING, str(tmp / 'data'), src, str(tmp / 'meeting')]
    cwd = os.path.dirname(data.__file__)
    procs = [subprocess.Popen(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert len(os.listdir(tmp / 'meeting')) == 2  # they did overlap
    out = data.dataset_dir(src, 'byte')
    # no temporary file left
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'val.bin']
    alone = data.prepare(src, 'byte', force=True, num_proc=1)  # the same as one preparation alone
    for f in ('train.bin', 'val.bin'):
        with open(os.path.join(out, f), 'rb') as a, open(os.path.join(alone, f), 'rb') as b:
            assert a.read() == b.read()


def dead_pid():
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def test_leftovers_of_killed_preparations_are_removed(tmp_data):
    tmp, src, docs = tmp_data
    other = tmp / 'data' / 'other-byte'
    other.mkdir(parents=True)
    dead, live = f'.train.{dead_pid()}.x1.tmp', f'.val.{os.getpid()}.x2.tmp'
    for name in (dead, '.meta.json.tmp', live):
        (other / name).write_bytes(b'half')
    (tmp / 'data' / 'failed-load').mkdir()
    os.utime(tmp / 'data' / 'failed-load', (time.time() - 120,) * 2)
    (tmp / 'data' / 'being-made').mkdir()  # a concurrent process just made it: kept
    data.prepare(src, 'byte', num_proc=1)
    assert os.listdir(other) == [live]  # a live process's file is kept
    prepared = os.path.basename(data.dataset_dir(src, 'byte'))
    assert sorted(os.listdir(tmp / 'data')) == sorted(['being-made', 'other-byte', prepared])


def test_two_sources_never_share_a_folder_and_changes_are_noticed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    texts = {
        'x': ['alpha ' * 5, 'beta ' * 5, 'gamma ' * 5],
        'y': ['one ' * 4, 'two ' * 4, 'six ' * 4],
    }
    for name, docs in texts.items():
        (tmp_path / name / 'corpus').mkdir(parents=True)
        for i, d in enumerate(docs):
            (tmp_path / name / 'corpus' / f'{i}.txt').write_text(d)
    outs = {}
    for name in texts:
        outs[name] = data.prepare(str(tmp_path / name / 'corpus'), 'byte', num_proc=1)
    assert outs['x'] != outs['y'] and os.path.basename(outs['x']).startswith('corpus-')
    for name, out in outs.items():
        meta = data.load_meta(out)
        tokens = np.concatenate([read(out, 'train', meta), read(out, 'val', meta)])
        assert sorted(split_docs(tokens, 256)) == sorted(texts[name])
    (tmp_path / 'x' / 'corpus' / '1.txt').write_text('delta ' * 5)  # the source changes
    capsys.readouterr()
    out = data.prepare(str(tmp_path / 'x' / 'corpus'), 'byte', num_proc=1)
    assert 'changed since it was prepared' in capsys.readouterr().out
    meta = data.load_meta(out)
    tokens = np.concatenate([read(out, 'train', meta), read(out, 'val', meta)])
    assert 'delta ' * 5 in split_docs(tokens, 256)


def test_non_utf8_bytes_are_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    (tmp_path / 'corpus').mkdir()
    # Latin-1, strays, a cut euro
    (tmp_path / 'corpus' / 'a.txt').write_bytes(b'caf\xe9 au lait \xff\xfe! \xe2\x82')
    (tmp_path / 'corpus' / 'b.txt').write_text('plain text, caf\u00e9')
    out = data.prepare(str(tmp_path / 'corpus'), 'byte', num_proc=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if 'UTF-8' in line]
    assert len(lines) == 1 and 'a.txt' in lines[0] and ' 5 bytes replaced' in lines[0]
    meta = data.load_meta(out)
    tokens = np.concatenate([read(out, 'train', meta), read(out, 'val', meta)])
    assert sorted(split_docs(tokens, 256)) == [
        'caf\ufffd au lait \ufffd\ufffd! \ufffd\ufffd',
        'plain text, caf\u00e9',
    ]


def test_a_missing_local_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    hub_calls = []

    def hub(path, args, **kw):
        hub_calls.append(path)
        yield from ['first document', 'second document', 'third one']
    monkeypatch.setattr(data, 'hub_documents', hub)
    missing = ['/no/such/folder', './missing', '../missing', '~/missing_corpus', 'texts.txt',
               'rows.jsonl', 'rows.json', 'table.parquet', str(tmp_path / 'nothing*.txt')]
    for name in missing:
        with pytest.raises(SystemExit, match='no .txt/.jsonl/.json/.parquet files'):
            data.prepare(name, 'byte', num_proc=1)
    assert hub_calls == [] and not os.path.exists(tmp_path / 'data')
    out = data.prepare('cerebras/SlimPajama-627B', 'byte', num_proc=1)  # a Hub name goes to the Hub
    assert hub_calls == ['cerebras/SlimPajama-627B']
    assert os.path.basename(out) == 'cerebras_SlimPajama-627B-byte'


@pytest.mark.parametrize('flags, message', [
    (['--val-frac', '0'], '--val-frac'),
    (['--val-frac', '1'], '--val-frac'),
    (['--val-frac', '-0.1'], '--val-frac'),
    (['--num-proc', '0'], '--num-proc'),
    (['--max-docs', '-1'], '--max-docs'),
    (['--max-tokens', '-5'], '--max-tokens'),
])
def test_bad_flags_fail_at_parse_time(flags, message):
    with pytest.raises(SystemExit, match=message):
        data.parse_args(['shakespeare'] + flags)
    assert data.parse_args(['shakespeare', '--val-frac', '0.5', '--num-proc', '1']).val_frac == 0.5


def test_a_folder_prepared_with_another_tokenizer_is_refused(tmp_data):
    tmp, src, docs = tmp_data
    out = data.prepare(src, 'byte', num_proc=1)
    assert data.prepare(out, 'byte') == out  # a prepared folder is used as it is
    with pytest.raises(SystemExit, match="tokens of --tokenizer byte, not gpt2: pass its source"):
        data.prepare(out, 'gpt2')


def tiny_hf_tokenizer(path):
    """A WordLevel tokenizer trained on a few sentences, saved as tokenizer.json."""
    tokenizers = pytest.importorskip('tokenizers')
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token='<unk>'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=['<unk>', '<s>', '</s>'])
    sentences = ['the cat sat on the mat', 'a dog ate the cat', 'document number']
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(path))
    return tok


def test_hugging_face_tokenizer(tmp_data):
    tmp, src, docs = tmp_data
    ref = tiny_hf_tokenizer(tmp / 'tokenizer.json')
    for spec in (f'hf:{tmp / "tokenizer.json"}', f'hf:{tmp}'):  # the file, or the folder holding it
        tok = data.get_tokenizer(spec)
        assert tok.eot == ref.token_to_id('</s>') and tok.vocab_size == ref.get_vocab_size()
        assert tok.encode('the cat sat') == ref.encode('the cat sat').ids
        assert tok.decode(tok.encode('a dog ate the cat')) == 'a dog ate the cat'
    out = data.prepare(src, f'hf:{tmp / "tokenizer.json"}', num_proc=2)
    name = os.path.basename(out)
    assert name.startswith('corpus-') and '-hf_tokenizer.json-' in name and os.sep not in name
    meta = data.load_meta(out)
    tokens = np.concatenate([read(out, 'train', meta), read(out, 'val', meta)])
    assert meta['eot'] == ref.token_to_id('</s>') and (tokens == meta['eot']).sum() == len(docs)


def test_hugging_face_tokenizer_needs_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tokenizers', None)  # as if not installed
    with pytest.raises(SystemExit, match='pip install tokenizers'):
        data.get_tokenizer('hf:TinyLlama/TinyLlama_v1.1')
