"""The GPU suite (gpu_suite.py): its CPU dry run end to end, its one-line refusal without CUDA,
and a part that fails or hangs leaving the others' figures."""
import argparse
import json
import math
import os
import sys

import pytest
import torch

import ar
import bench
import gpu_suite
from args import make_args
from model import get_config

LABELS = ['AR', 'MDLM', 'Duo', 'Eso-LM alpha_0 = 1', 'Eso-LM alpha_0 = 0.25, split 0.5']


@pytest.fixture(scope='module')
def dry(tmp_path_factory):
    """The dry run, every part, once for this file: (suite.json, suite.md)."""
    out = tmp_path_factory.mktemp('suite')
    gpu_suite.main(['--out', str(out), '--dry-run'])
    with open(out / 'suite.json') as f:
        return json.load(f), (out / 'suite.md').read_text()


def numbers(obj):
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return [x for item in obj for x in numbers(item)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def rows(suite, part):
    return suite['parts'][part]['rows']


def test_the_dry_run_completes_every_part(dry):
    suite, _ = dry
    assert list(suite['parts']) == list('abcde')
    for name, part in suite['parts'].items():
        assert part['status'] == 'ok', (name, part.get('error'))
        assert part['seconds'] <= part['timeout_s']
    assert all(math.isfinite(x) for x in numbers(suite))
    assert suite['dry_run'] and suite['machine']['gpu'] is None
    assert suite['wall_s'] <= suite['budget_s']


def test_dry_run_training_figures(dry):
    suite, _ = dry
    cfg = suite['config']
    got = [(r['label'], r['path']) for r in rows(suite, 'a')]
    assert got == [(label, path) for path in ('fused', 'plain') for label in LABELS]
    for r in rows(suite, 'a'):
        tokens = cfg['batch_size'] * cfg['block_size']
        assert r['train_tok_per_s'] == pytest.approx(tokens / r['step_s'])
        assert r['mfu'] is None or 0 < r['mfu'] <= 1
        assert ('fused=False' in r['spec']) == (r['path'] == 'plain')


def test_dry_run_attention_modes(dry):
    """Each mode calls attention as its method does; the profiler names a kernel; math runs
    every call; a CPU has no efficient or cuDNN kernel; flex beside each 2-D training mask."""
    suite, _ = dry
    got = {r['label']: r for r in rows(suite, 'b')}
    assert list(got) == [label for label, _, _ in gpu_suite.MODES]
    calls = ['sdpa, is_causal', 'sdpa, no mask', 'sdpa, no mask', 'sdpa, is_causal',
             'sdpa, boolean mask', 'sdpa, boolean mask', 'sdpa, lower-right causal bias',
             'sdpa, lower-right causal bias']
    assert [r['calls'] for r in got.values()] == calls
    for r in got.values():
        assert r['kernels'] and set(r['kernels']) <= {'cpu flash', 'math'}
        assert r['as_run_ms'] > 0 and r['forced']['math'] > 0
        assert r['forced']['efficient'].startswith('no:') and r['forced']['cudnn'].startswith('no:')
        assert ('flex' in r['forced']) == (r['calls'] == 'sdpa, boolean mask')
    decode = got['KV-cache decode: 16 new queries (Eso-LM steps)']
    assert decode['shape'][2] == 16 and decode['keys'] == suite['config']['block_size']


def test_dry_run_memory_sampling_and_torchrun(dry):
    suite, _ = dry
    L = suite['config']['sample_length']
    assert len(rows(suite, 'c')) == 10
    for r in rows(suite, 'c'):
        assert r['peak_mib'] >= r['before_mib'] > 0
    samples = {(r['label'], r['batch']): r for r in rows(suite, 'd')}
    assert sorted(samples) == sorted((label, n) for label, _ in gpu_suite.samplers(L)
                                     for n in (1, 16))
    for (label, n), r in samples.items():
        assert r['tok_per_s'] == pytest.approx(n * (L - 1) / r['seconds'])
        assert 1 <= r['nfe'] <= L  # MDLM: at most T = L calls
    assert samples['AR, KV cache', 1]['nfe'] == L - 1  # one call per new token
    e = suite['parts']['e']
    assert (e['backend'], e['resumed_at'], e['final_step']) == ('gloo', 3, 6)
    assert e['logged_steps'] == [1, 2, 3, 4, 5, 6]


def test_dry_run_markdown_tables(dry):
    suite, md = dry
    assert md.startswith('## GPU suite: dry run on the CPU')
    for heading in ('### (a) Training', '### (b) Attention', '### (c) Peak memory',
                    '### (d) Sampling', '### (e) torchrun'):
        assert md.count(heading) == 1, heading
    lines = md.splitlines()
    for label in LABELS:
        for path in ('fused', 'plain'):
            assert sum(line.startswith(f'| {label} | {path} | ') for line in lines) == 2
    for label, _, _ in gpu_suite.MODES:
        assert sum(line.startswith(f'| {label} | sdpa, ') for line in lines) == 1
    for label, _ in gpu_suite.samplers(suite['config']['sample_length']):
        for n in (1, 16):
            assert sum(line.startswith(f'| {label} | {n} | ') for line in lines) == 1
    assert '| resumed at step | 3 |' in md and 'nan' not in md.lower()
    assert 'AR MFU >= 0.45: **' in md and 'MDLM s / Eso-LM s >= 10: **' in md


def test_without_cuda_the_suite_refuses_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match='no CUDA device here.*--dry-run') as e:
        gpu_suite.main(['--out', str(tmp_path / 'suite')])
    assert '\n' not in str(e.value) and not (tmp_path / 'suite').exists()
    for argv, says in ((['--parts', 'a,f'], "--parts 'a,f'"), (['--budget-s', '0'], '> 0')):
        with pytest.raises(SystemExit, match=says):
            gpu_suite.main(['--out', str(tmp_path / 'suite'), '--dry-run'] + argv)


def test_a_part_that_fails_or_hangs_leaves_the_others(tmp_path, monkeypatch):
    """Part c hangs after saving some figures, part a saves some and exits as an out-of-memory
    would; part b runs for real between them. Each keeps what it saved, with its status."""
    real = gpu_suite.part_command
    save = ('import json, sys, time; '
            'json.dump({"rows": [], "peak_flops": 1.0}, open(sys.argv[1], "w"))')
    fakes = dict(a=save + '; sys.exit("RuntimeError: CUDA out of memory")',
                 c=save + '; time.sleep(600)')

    def part_command(name, args):
        if name not in fakes:
            return real(name, args)
        return [sys.executable, '-c', fakes[name], os.path.join(args.out, f'part_{name}.json')]
    monkeypatch.setattr(gpu_suite, 'part_command', part_command)
    monkeypatch.setattr(gpu_suite, 'SHARES', dict(a=0.05, b=0.9, c=0.05, d=0.1, e=0.1))
    # c's timeout: (budget - grace) x its share = (50 - 10) x 0.05 / (0.05 + 0.9 + 0.05) = 2 s
    gpu_suite.main(['--out', str(tmp_path), '--dry-run', '--parts', 'c,b,a', '--budget-s', '50'])
    with open(tmp_path / 'suite.json') as f:
        parts = json.load(f)['parts']
    assert [parts[x]['status'] for x in 'cba'] == ['timeout', 'ok', 'failed']
    assert parts['c']['timeout_s'] == pytest.approx(2, abs=0.5) and parts['c']['rows'] == []
    assert parts['a']['error'] == 'RuntimeError: CUDA out of memory'
    assert parts['a']['peak_flops'] == 1.0
    assert len(parts['b']['rows']) == len(gpu_suite.MODES)
    md = (tmp_path / 'suite.md').read_text()
    assert '**timeout** after' in md and '**failed** after' in md and '| AR: causal | sdpa' in md


def test_mfu_is_never_above_one():
    cfg = get_config('tiny', 257)
    r = dict(algo=ar, cfg=cfg, args=make_args(block_size=32))
    args = argparse.Namespace(batch_size=4, block_size=32)
    flops = 3 * ar.mfu_flops(cfg, r['args']) * 4 * 32  # FLOPs of one step of 4 x 32 tokens
    assert bench.throughput(r, args, 1.0, 2 * flops)['mfu'] == pytest.approx(0.5)
    assert bench.throughput(r, args, 1.0, flops / 2)['mfu'] is None


def test_an_entry_that_raises_leaves_the_others_measured():
    saved = []

    def measure(label, n):
        if n == 2:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return [dict(value=n), dict(value=10 * n)] if n == 3 else dict(value=n)
    entries = [dict(label=f'entry {n}', n=n) for n in (1, 2, 3)]
    with pytest.raises(SystemExit, match=r'^1 of 4 entries failed; the first \(entry 2\): '
                                         r'OutOfMemoryError: CUDA out of memory\.'):
        gpu_suite.each(entries, measure, lambda rows: saved.append(list(rows)))
    assert [len(rows) for rows in saved] == [1, 2, 4]  # saved after each entry
    assert saved[-1][1] == dict(label='entry 2', n=2, error='OutOfMemoryError: CUDA out of '
                                'memory. Tried to allocate 2.00 GiB')
    assert [r.get('value') for r in saved[-1]] == [1, None, 3, 30]


def test_the_tables_hold_an_entry_that_failed(dry):
    """An entry with an error in every part: each table keeps its shape, the error shown."""
    suite = json.loads(json.dumps(dry[0]))
    for part in suite['parts'].values():
        if 'rows' in part:
            part['rows'].append({**part['rows'][0], 'error': 'RuntimeError: boom'})
            part.update(status='failed', error='1 of 11 entries failed')
    md = gpu_suite.markdown(suite)
    assert md.count('RuntimeError: boom') == 4 and md.count('**failed** after') == 4
    for block in md.split('\n\n'):
        widths = {line.count('|') for line in block.splitlines() if line.startswith('|')}
        assert len(widths) <= 1, block
