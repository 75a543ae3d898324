"""frontier.py: one CSV row per (checkpoint, steps) point with finite throughput, gen PPL and
entropy, a real PNG, the Pareto front and the degenerate points, the specs, and the CSV alone
without matplotlib."""
import csv
import math
import sys
from dataclasses import asdict

import pytest
import torch

import ar
import data
import duo
import esolm
import frontier
import mdlm
from model import DiT, get_config

METHODS = {'ar': ar, 'mdlm': mdlm, 'duo': duo, 'esolm': esolm}
PNG = b'\x89PNG\r\n\x1a\n'


def save(path, name, std, seed=0):
    """A random tiny network of method `name` in a checkpoint as train.py writes it."""
    K = data.get_tokenizer('byte').vocab_size
    torch.manual_seed(seed)
    model = DiT(get_config('tiny', METHODS[name].vocab_size(K)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    torch.save({'model': model.state_dict(), 'config': asdict(model.cfg), 'algo': name,
                'step': 0, 'args': {'block_size': 32, 'alpha0': 0.5},
                'meta': {'tokenizer': 'byte', 'vocab_size': K}}, path)
    return str(path)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('frontier')
    paths = {name: save(tmp / f'{name}.pt', name, 0.1) for name in METHODS}
    paths['judge'] = save(tmp / 'judge.pt', 'ar', 0.1, seed=1)
    paths['degenerate'] = save(tmp / 'degenerate.pt', 'mdlm', 0.5)  # one token, over and over
    return paths


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_frontier_writes_a_row_per_point_and_a_png(ckpts, tmp_path):
    c = ckpts
    specs = [c['ar'], f"{c['mdlm']}:steps=4,8", f"{c['duo']}:steps=4",
             f"{c['duo']}:steps=4,greedy_tail=True", f"{c['esolm']}:steps=4,8"]
    rows = frontier.main(specs + ['--judge', c['judge'], '--out', str(tmp_path),
                                  '--num-samples', '3', '--length', '16', '--dtype', 'float32'])
    saved = read(tmp_path / 'frontier.csv')
    assert [(r['method'], r['steps'], r['options']) for r in saved] == [
        ('ar', '16', ''), ('mdlm', '4', ''), ('mdlm', '8', ''), ('duo', '4', ''),
        ('duo', '4', 'greedy_tail=True'), ('esolm', '4', ''), ('esolm', '8', '')]
    assert set(frontier.COLUMNS) <= set(saved[0])
    for r in saved:
        assert r['num_samples'] == '3' and r['length'] == '16' and int(r['nfe']) >= 1
        for k in ('tokens_per_s', 'gen_ppl', 'entropy'):
            assert math.isfinite(float(r[k])) and float(r[k]) > 0
        assert float(r['gen_ppl']) >= 1
    assert saved[0]['nfe'] == '15' and saved[3]['nfe'] == '5'    # AR: 15 tokens; Duo: T + 1
    assert float(saved[0]['tokens_per_s']) == pytest.approx(3 * 15 / float(saved[0]['seconds']))
    png = (tmp_path / 'frontier.png').read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ['frontier.csv', 'frontier.png']
    front = [r for r in rows if r['pareto']]
    assert front
    for r in rows:   # the front: the unflagged points that no unflagged point beats on both axes
        beaten = any(o['tokens_per_s'] >= r['tokens_per_s'] and o['gen_ppl'] <= r['gen_ppl']
                     and o is not r and (o['tokens_per_s'], o['gen_ppl']) != (
                         r['tokens_per_s'], r['gen_ppl']) for o in rows if not o['low_entropy'])
        assert r['pareto'] == (not beaten and not r['low_entropy'])


def test_degenerate_points_are_flagged_and_left_off_the_front(ckpts, tmp_path, monkeypatch):
    """A network that repeats one token has entropy ~0 and a gen PPL that looks good: flagged
    below LOW_ENTROPY x the reference, and not on the front. One warm-up call per checkpoint
    comes before its timed calls."""
    calls = []
    load = frontier.load_algo

    def recording(name):
        algo = load(name)

        def sample(model, args, n, length, prompt, device):
            calls.append((name, args.steps, length))
            assert prompt.tolist() == [[256]] * n                  # the end-of-text token
            return algo.sample(model, args, n, length, prompt, device)
        return type('algo', (), {'sample': staticmethod(sample), 'check_args': algo.check_args})
    monkeypatch.setattr(frontier, 'load_algo', recording)
    rows = frontier.main([ckpts['degenerate'] + ':steps=4', ckpts['mdlm'] + ':steps=4,8',
                          '--judge', ckpts['judge'], '--out', str(tmp_path), '--ref-entropy',
                          '2.0', '--num-samples', '3', '--length', '16', '--dtype', 'float32'])
    assert calls == [('mdlm', 2, 16), ('mdlm', 4, 16), ('mdlm', 2, 16), ('mdlm', 4, 16),
                     ('mdlm', 8, 16)]
    degenerate = rows[0]
    assert degenerate['entropy'] < 0.5 and degenerate['low_entropy']
    assert not degenerate['pareto']
    assert not any(r['low_entropy'] for r in rows[1:])             # random weights: varied
    assert any(r['pareto'] for r in rows[1:])
    assert read(tmp_path / 'frontier.csv')[0]['low_entropy'] == 'True'


def test_pareto_front_leaves_out_the_degenerate_points():
    def point(tok_s, ppl, low=False):
        return dict(tokens_per_s=tok_s, gen_ppl=ppl, low_entropy=low)
    rows = [point(100, 50), point(10, 20), point(50, 60), point(10, 30), point(1000, 5, True),
            point(5, 20)]
    frontier.pareto(rows)
    # (50, 60) is beaten by (100, 50), (10, 30) by (10, 20), (5, 20) by (10, 20); the
    # degenerate (1000, 5) would beat them all, but is neither on the front nor beats anyone
    assert [r['pareto'] for r in rows] == [True, True, False, False, False, False]


def test_without_matplotlib_the_csv_is_still_written(ckpts, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.split('.')[0] == 'matplotlib'] + ['matplotlib']:
        monkeypatch.setitem(sys.modules, name, None)
    frontier.main([ckpts['ar'], '--judge', ckpts['judge'], '--out', str(tmp_path),
                   '--ref-entropy', '1', '--num-samples', '2', '--length', '8',
                   '--dtype', 'float32'])
    assert len(read(tmp_path / 'frontier.csv')) == 1
    assert not (tmp_path / 'frontier.png').exists()
    err = [line for line in capsys.readouterr().err.splitlines() if 'matplotlib' in line]
    assert len(err) == 1 and 'pip install matplotlib' in err[0]


def test_specs():
    known = set(frontier.method_options()) | {'top_p', 'cache'}
    assert frontier.parse_spec('out/d/ckpt.pt:steps=8,32,greedy_tail=True', known) == (
        'out/d/ckpt.pt', [8, 32], {'greedy_tail': True})
    assert frontier.parse_spec('hf:org/name', known) == ('hf:org/name', None, {})
    assert frontier.parse_spec('hf:org/name:steps=4', known) == ('hf:org/name', [4], {})
    assert frontier.parse_spec('e.pt:alpha0=0.25,cache=False,top_p=0.9', known) == (
        'e.pt', None, {'alpha0': 0.25, 'cache': False, 'top_p': 0.9})
    with pytest.raises(SystemExit, match="unknown option 'stepz'"):
        frontier.parse_spec('x.pt:stepz=8', known)
    with pytest.raises(SystemExit, match='positive integer'):
        frontier.parse_spec('x.pt:steps=0,8', known)
    with pytest.raises(SystemExit, match='--num-samples must be >= 1'):
        frontier.main(['x.pt', '--judge', 'j.pt', '--out', 'o', '--num-samples', '0'])
