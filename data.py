"""Dataset preparation and batches (the tokenizers: tokenizer.py). Knows no model.

    python data.py shakespeare --tokenizer byte  # 42 shipped works (default), 257 ids: fast on CPU
    python data.py ~/texts/ --text-column text   # a folder, glob or file: .txt, .jsonl or .parquet
    python data.py openwebtext --max-tokens 1e9  # any Hugging Face dataset (streamed)
    python data.py openwebtext --tokenizer hf:TinyLlama/TinyLlama_v1.1  # a Hugging Face tokenizer

writes data/<name>-<tokenizer>/{train.bin, val.bin, meta.json}: one token stream per split,
documents separated by the end-of-text id, as a uint16 memmap (uint32 if the vocabulary needs
it); val: whole documents.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import re
import tarfile
import tempfile
import time
from multiprocessing import Pool

import numpy as np
import torch

from tokenizer import ASSETS, Tokenizer, get_tokenizer  # noqa: F401 (data.Tokenizer, ...)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data')
SHAKESPEARE = os.path.join(ASSETS, 'shakespeare.tar.xz')
EXTENSIONS = ('.txt', '.jsonl', '.json', '.parquet')


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


# ---- sources: each yields documents (strings) ------------------------------

def source_files(name):
    """A local source's files, sorted (the shipped archive for 'shakespeare'); [] for a Hub name."""
    if name == 'shakespeare':
        return [SHAKESPEARE]
    spec = os.path.expanduser(name)
    pattern = os.path.join(spec, '**', '*') if os.path.isdir(spec) else spec
    found = glob.glob(pattern, recursive=True)
    files = sorted(f for f in found if os.path.isfile(f) and f.endswith(EXTENSIONS))
    if not files and (os.path.exists(spec) or any(c in name for c in '*?[') or
                      name.startswith(('/', './', '../', '~')) or name.endswith(EXTENSIONS)):
        raise SystemExit(f"no .txt/.jsonl/.json/.parquet files at '{name}' "
                         "(Hub datasets are named like owner/name)")
    return files


def utf8(raw, where):
    """Bytes -> text; each byte that is not UTF-8 becomes U+FFFD, and we say how many."""
    text, bad = re.subn('[\udc80-\udcff]', '\ufffd', raw.decode('utf-8', 'surrogateescape'))
    if bad:
        print(f'{where}: not UTF-8, {bad} bytes replaced by U+FFFD')
    return text


def documents(name, args):
    """A dataset's documents: one per .txt file or shipped work, .jsonl/.parquet row or Hub row."""
    if name == 'shakespeare':
        with tarfile.open(SHAKESPEARE) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                yield utf8(tar.extractfile(m).read(), m.name)
        return
    files = source_files(name)
    for f in (f for f in files if f.endswith('.txt')):
        with open(f, 'rb') as fh:
            yield utf8(fh.read(), f)
    tables = [f for f in files if not f.endswith('.txt')]
    if tables:
        kind = 'parquet' if tables[0].endswith('.parquet') else 'json'
        yield from hub_documents(kind, args, data_files=tables)
    elif not files:
        yield from hub_documents(name, args)


def hub_documents(path, args, **kw):
    """Stream a dataset with datasets.load_dataset (Hub name, or 'json'/'parquet' + files)."""
    import datasets
    try:
        for row in datasets.load_dataset(path, args.config, split=args.split, streaming=True, **kw):
            if args.text_column not in row:
                raise SystemExit(f"dataset has no column '{args.text_column}' (columns: "
                                 f"{', '.join(row)}): pass --text-column")
            yield row[args.text_column]
    except Exception as e:  # not SystemExit
        raise SystemExit(f"cannot load dataset '{path}' "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                         "check the name, or pass a local folder/file") from None


# ---- preparation -----------------------------------------------------------

def slug(name):
    """A folder-name-safe key; a local path: its base name and a hash of where it is."""
    path = os.path.expanduser(name.removeprefix('hf:'))
    if os.path.exists(path) or any(c in path for c in '*?['):
        digest = hashlib.blake2b(os.path.abspath(path).encode(), digest_size=4).hexdigest()
        base = os.path.basename(os.path.normpath(path))
        name = ('hf_' if name.startswith('hf:') else '') + f'{base}-{digest}'
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name)


def dataset_dir(name, tokenizer, config=None):
    """data/<dataset>[-<config>]-<tokenizer>/ (two sources, or two configurations of one Hub
    dataset, never share one), or `name` itself if it is a prepared folder."""
    if os.path.isfile(os.path.join(os.path.expanduser(name), 'meta.json')):
        return os.path.expanduser(name)
    key = slug(name) if config is None else f'{slug(name)}-{slug(config)}'
    return os.path.join(DATA_DIR, f'{key}-{slug(tokenizer)}')


def no_room(path, error, needed=None):
    """One line for a write that failed (a full disk, a quota, a size limit): the path, the
    reason, the free space there and, if known, the space needed."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free / 2 ** 20
    need = f', about {needed / 2 ** 20:.0f} MiB needed' if needed else ''
    reason = error.strerror if isinstance(error, OSError) else 'the write failed'
    return (f'cannot write {path} ({reason}): {free:.0f} MiB free in {folder}{need}; free some '
            f'space or write elsewhere')


def in_val(index, seed, val_frac):
    """Deterministic per-document coin: is document `index` held out?"""
    h = hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') / 2 ** 64 < val_frac


def temp_file(out, what, mode='wb'):  # unique per call; its name's pid tells sweep() whose it is
    prefix = f'.{what}.{os.getpid()}.'
    return tempfile.NamedTemporaryFile(mode, dir=out, prefix=prefix, suffix='.tmp', delete=False)


def sweep():
    """Remove what killed preparations left: dead processes' temp files, folders empty for 60 s."""
    for f in glob.glob(os.path.join(DATA_DIR, '*', '.*.tmp')):
        try:
            os.kill(int(os.path.basename(f).split('.')[2]), 0)  # signal 0: is that process alive?
        except PermissionError:  # yes, another user's
            pass
        except (ProcessLookupError, ValueError, OverflowError):  # no (or no pid in the name)
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
    for d in glob.glob(os.path.join(DATA_DIR, '*', '')):
        with contextlib.suppress(OSError):
            if not os.listdir(d) and time.time() - os.path.getmtime(d) > 60:
                os.rmdir(d)


def _encode(tokenizer_and_text):  # in a worker process, or this one (get_tokenizer caches)
    return get_tokenizer(tokenizer_and_text[0]).encode(tokenizer_and_text[1])


def prepare(name, tokenizer='gpt2', force=False, **kw):
    """Tokenise once into dataset_dir() (again if its files changed, or force); two at once work."""
    defaults = vars(get_parser().parse_args([name]))
    args = argparse.Namespace(**{**defaults, **kw, 'tokenizer': tokenizer})
    out = dataset_dir(name, tokenizer, args.config)
    meta = load_meta(out) if os.path.exists(os.path.join(out, 'meta.json')) else None
    if meta and meta['tokenizer'] != tokenizer:
        raise SystemExit(f"'{name}' holds tokens of --tokenizer {meta['tokenizer']}, "
                         f"not {tokenizer}: pass its source '{meta['source']}' instead, "
                         f"to prepare it with {tokenizer}")
    files = source_files(name)
    source_hash = None  # a Hub dataset
    if files:
        stats = repr([(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files])
        source_hash = hashlib.blake2b(stats.encode(), digest_size=8).hexdigest()
    if meta and (out == os.path.expanduser(name)
                 or meta.get('source_hash') == source_hash and not force):
        return out  # already prepared: a no-op
    if meta and not force:
        print(f'{name}: its files changed since it was prepared: preparing it again')
    sweep()
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(out, exist_ok=True)
    tmp = {s: temp_file(out, s) for s in ('train', 'val')}
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0}
    from tqdm import tqdm

    def write(split, ids):
        tmp[split].write(np.asarray(ids + [tok.eot], dtype=dtype).tobytes())
        counts[f'{split}_tokens'] += len(ids) + 1
        counts[f'{split}_docs'] += 1
    pool = Pool(args.num_proc) if args.num_proc > 1 else None
    pairs = ((tokenizer, d) for d in documents(name, args))
    encoded = pool.imap(_encode, pairs, chunksize=16) if pool else map(_encode, pairs)
    held = None  # the last document is written only once we know another follows (val never empty)
    try:
        progress = tqdm(encoded, desc=f'tokenising {name}', unit=' docs', disable=None)
        for i, ids in enumerate(progress):
            if held is not None:
                write(*held)
            held = ('val' if in_val(i, args.seed, args.val_frac) else 'train', ids)
            tokens = counts['train_tokens'] + counts['val_tokens']
            if (args.max_docs and i + 1 >= args.max_docs
                    or args.max_tokens and tokens >= args.max_tokens):
                break
        if held is None:
            raise SystemExit(f"dataset '{name}' has no documents")
        write('val' if counts['val_docs'] == 0 else held[0], held[1])
        if counts['train_docs'] == 0:
            raise SystemExit(f"dataset '{name}' has a single document: "
                             "the split needs at least two")
    except BaseException as e:
        for f in tmp.values():  # leave nothing half-written behind, nor an empty folder
            with contextlib.suppress(OSError):
                f.close()
            os.unlink(f.name)
        with contextlib.suppress(OSError):
            os.rmdir(out)
        if isinstance(e, OSError):  # a full disk: one line, the free space there
            raise SystemExit(no_room(out, e)) from None
        raise
    finally:
        if pool:
            pool.terminate()
        for f in tmp.values():
            f.close()
    meta = dict(tokenizer=tokenizer, vocab_size=tok.vocab_size, eot=tok.eot,
                dtype=np.dtype(dtype).name, source=name, seed=args.seed, val_frac=args.val_frac,
                source_hash=source_hash, **counts)
    with temp_file(out, 'meta', 'w') as f:
        json.dump(meta, f, indent=1)
    for what, f in {**tmp, 'meta': f}.items():  # meta.json last: it marks the folder complete
        os.chmod(f.name, 0o644)
        final = 'meta.json' if what == 'meta' else f'{what}.bin'
        os.replace(f.name, os.path.join(out, final))  # atomic
    return out


def load_meta(data_dir):
    with open(os.path.join(data_dir, 'meta.json')) as f:
        return json.load(f)


# ---- batches ---------------------------------------------------------------

def get_batch(data_dir, split, starts, block_size, device, dtype):
    """Windows of block_size tokens at `starts` (a LongTensor), (B, L) int64; dtype: meta.json's."""
    # a fresh memmap per batch avoids numpy's memmap leak (as nanoGPT does)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=dtype, mode='r')
    windows = np.stack([data[s:s + block_size] for s in starts.tolist()])
    x = torch.from_numpy(windows.astype(np.int64))
    cuda = torch.device(device).type == 'cuda'  # then pinned memory, copied asynchronously
    return (x.pin_memory() if cuda else x).to(device, non_blocking=cuda)


def num_tokens(data_dir, split):
    itemsize = np.dtype(load_meta(data_dir)['dtype']).itemsize
    return os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // itemsize


def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dataset', help="'shakespeare', a local folder/glob/file, or a Hub dataset name")
    p.add_argument('--tokenizer', default='gpt2',
                   help='gpt2 | byte | hf:NAME_OR_PATH | a tiktoken encoding name')
    p.add_argument('--config', default=None, help='Hub dataset configuration (e.g. sample-10BT)')
    p.add_argument('--split', default='train', help='Hub split to read')
    p.add_argument('--text-column', default='text')
    p.add_argument('--max-docs', type=int, default=0,
                   help='stop after this many documents (0 = all)')
    p.add_argument('--max-tokens', type=float, default=0,
                   help='stop after about this many tokens (0 = all)')
    p.add_argument('--val-frac', type=float, default=0.05, help='fraction of documents held out')
    p.add_argument('--seed', type=int, default=1337, help='seed of the document-level split')
    p.add_argument('--num-proc', type=int, default=max(1, min(8, (os.cpu_count() or 1) - 1)))
    p.add_argument('--force', action='store_true', help='prepare again even if done')
    return p


def parse_args(argv=None):
    a = get_parser().parse_args(argv)
    if not 0 < a.val_frac < 1:
        raise SystemExit(f'--val-frac {a.val_frac}: must be in (0, 1)')
    if a.num_proc < 1:
        raise SystemExit(f'--num-proc {a.num_proc}: must be at least 1')
    if a.max_docs < 0 or a.max_tokens < 0:
        raise SystemExit('--max-docs and --max-tokens must be >= 0 (0 = all)')
    return a


if __name__ == '__main__':
    kw = vars(parse_args())
    out = prepare(kw.pop('dataset'), **kw)
    print(f'{out}: ' + ', '.join(f'{k} {v}' for k, v in load_meta(out).items()))
