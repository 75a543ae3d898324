"""scaling.py: the fits recover known exponents; the grid runs, resumes and
collects through train.py; the optional figure fails with one clear line."""
import csv
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import scaling
from model import flops_per_token, get_config, seed_flops_per_token

BUDGETS = [1e15, 1e16, 1e17, 1e18]


def rows_from(loss, budgets, spread=1.0, points=5, algo='x'):
    """Synthetic runs: at each budget, `points` sizes evenly spaced in log N
    within +-spread of the true optimum's log N, with loss(N, C)."""
    rows = []
    for c in budgets:
        n_opt = loss.n_opt(c)
        for x in np.linspace(-spread, spread, points):
            n = n_opt * math.exp(x)
            rows.append(dict(algo=algo, size=f'{n:.3g}', flops_budget=c, params=n,
                             val_loss=loss(n, c)))
    return rows


class Parabola:
    """L = c C^b + h (log N - log(k C^a))^2: exactly the model scaling.py fits."""
    a, k, b, c, h = 0.45, 0.3, -0.05, 9.0, 0.2

    def n_opt(self, c):
        return self.k * c ** self.a

    def __call__(self, n, c):
        return self.c * c ** self.b + self.h * math.log(n / self.n_opt(c)) ** 2


class Chinchilla:
    """L = E + A / N^alpha + B / D^beta with D = C / 6N (Hoffmann et al. 2022 fit):
    N* = G (C/6)^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta))."""
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28

    def n_opt(self, c):
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return G * (c / 6) ** (self.beta / (self.alpha + self.beta))

    def __call__(self, n, c):
        return self.E + self.A / n ** self.alpha + self.B / (c / (6 * n)) ** self.beta


def test_fit_recovers_the_exponents_of_exact_parabolas():
    law = Parabola()
    fits = scaling.fit(rows_from(law, BUDGETS, spread=1.5))
    got = fits['x']['laws']
    assert got['a'] == pytest.approx(law.a, abs=1e-9) and got['b'] == pytest.approx(law.b, abs=1e-9)
    assert got['k'] == pytest.approx(law.k, rel=1e-7) and got['c'] == pytest.approx(law.c, rel=1e-7)
    for o in fits['x']['optima']:
        assert o['n_opt'] == pytest.approx(law.n_opt(o['flops']), rel=1e-9) and o['inside']
        assert o['d_opt'] == pytest.approx(o['flops'] / (6 * o['n_opt']))
    # off-centre sampling changes nothing for an exact parabola
    shifted = [dict(r, params=r['params'] * 1.5, val_loss=law(r['params'] * 1.5, r['flops_budget']))
               for r in rows_from(law, BUDGETS)]
    assert scaling.fit(shifted)['x']['laws']['a'] == pytest.approx(law.a, abs=1e-9)


def test_fit_recovers_the_chinchilla_exponent():
    """A fixed ladder of sizes 2x apart, as in practice; at each budget the
    sizes within a decade of the optimum, so the optimum is rarely a size."""
    law = Chinchilla()
    budgets = [1e18, 1e19, 1e20, 1e21]
    true_a = law.beta / (law.alpha + law.beta)
    ladder = 1e7 * 2.0 ** np.arange(14)
    rows = [dict(algo='x', size=f'{n:.3g}', flops_budget=c, params=n, val_loss=law(n, c))
            for c in budgets for n in ladder if abs(math.log10(n / law.n_opt(c))) <= 1]
    fits = scaling.fit(rows)['x']
    assert fits['laws']['a'] == pytest.approx(true_a, abs=0.003)
    for o in fits['optima']:
        assert o['n_opt'] == pytest.approx(law.n_opt(o['flops']), rel=0.05)
    # the naive alternative, the best size of each budget, misses
    best = []
    for c in budgets:
        best_run = min((r for r in rows if r['flops_budget'] == c), key=lambda r: r['val_loss'])
        best.append(best_run['params'])
    assert abs(scaling.fit_power_law(budgets, best)[0] - true_a) > 0.02


def test_optima_outside_the_sizes_are_flagged_and_not_fitted():
    losses = {
        1e15: [3.0, 2.9, 2.85],  # still falling: vertex above
        1e16: [3.0, 2.0, 2.9],   # a minimum inside
        1e17: [2.0, 2.6, 2.7],   # concave: no minimum
        1e18: [1.5, 2.0, 2.6],   # rising: vertex below
    }
    rows = [dict(algo='x', size=s, flops_budget=c, params=n, val_loss=v)
            for c, vs in losses.items() for s, n, v in zip('abc', [1e5, 1e6, 1e7], vs)]
    fits = scaling.fit(rows)['x']
    by_c = {o['flops']: o for o in fits['optima']}
    assert not by_c[1e15]['inside'] and not by_c[1e15]['below'] and by_c[1e15]['n_opt'] > 1e7
    assert by_c[1e16]['inside'] and 1e17 not in by_c and by_c[1e18]['below']
    assert fits['fitted'] == 1 and fits['laws'] is None  # one bracketed budget: no power law
    text = scaling.table(scaling.fit(rows), rows)
    assert 'no minimum' in text
    assert 'above the sizes tried' in text and 'below the sizes tried' in text
    assert '| x | 1e+16 | 1.06e+06 |' in text
    # extrapolated vertices do not enter the power law: adding one changes nothing
    law = Parabola()
    good = rows_from(law, BUDGETS[:3])
    far = [dict(r, flops_budget=1e18, params=r['params'] * 1e4) for r in rows_from(law, [1e18])]
    got = scaling.fit(good + [dict(r, val_loss=law(r['params'], 1e18)) for r in far])['x']
    assert got['fitted'] == 3 and got['laws']['a'] == pytest.approx(law.a, abs=1e-9)


def test_missing_matplotlib_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as where it is not installed
    rows = rows_from(Parabola(), BUDGETS[:2], points=3)
    assert scaling.plot(scaling.fit(rows), rows, str(tmp_path / 'f.png')) is None
    err = capsys.readouterr().err.strip()
    assert 'pip install matplotlib' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'f.png').exists()


# ----------------------------------------------------------------------------
# the grid: running, resuming, collecting

TRAIN = ['--tokenizer', 'byte', '--block-size', '16', '--batch-size', '2', '--eval-iters', '1',
         '--dtype', 'float32', '--no-compile']


def fake_train(calls, law):
    """Stands in for one train.py run: writes the checkpoint and log train.py
    would (steps from the budget as train.py computes them), with val loss law(N, C)."""
    def run(argv, log_file):
        calls.append(argv)
        opt = dict(zip(argv[::2], argv[1::2]))
        algo = opt['--algo']
        size = opt['--size']
        flops = float(opt['--flops'])
        out = opt['--out-dir']
        cfg = get_config(size, 258 if algo == 'mdlm' else 257)
        fpt = flops_per_token(cfg, 16)
        steps = max(1, int(flops / (3 * seed_flops_per_token(cfg, 16) * 16 * 2)))
        args = dict(size=size, flops=flops, max_iters=steps, block_size=16, batch_size=2)
        ckpt = dict(algo=algo, step=steps, args=args, config=vars(cfg), model={}, meta={})
        torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
        with open(os.path.join(out, 'log.jsonl'), 'w') as f:
            f.write(json.dumps(dict(step=steps, val_loss=law(fpt / 2, flops))) + '\n')
        return 0
    return run


def test_grid_runs_resumes_and_writes_csv_and_table(tmp_path, monkeypatch, capsys):
    calls = []
    law = Parabola()
    law.k = 3e5 / 1e10 ** law.a  # optimum between the sizes tiny, mini, small at both budgets
    monkeypatch.setattr(scaling, 'run_train', fake_train(calls, law))
    argv = ['--algos', 'ar,mdlm', '--sizes', 'tiny,mini,small', '--flops', '1e10,1e11',
            '--out-dir', str(tmp_path), '--no-plot', *TRAIN]
    fits = scaling.main(argv)
    assert len(calls) == 12 and all(c[c.index('--resume') + 1] == 'auto' for c in calls)
    assert all(c[-len(TRAIN):] == TRAIN for c in calls)  # unknown flags go to train.py
    with open(tmp_path / 'runs.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    for r in rows:
        cfg = get_config(r['size'], 258 if r['algo'] == 'mdlm' else 257)
        n = flops_per_token(cfg, 16) / 2
        assert float(r['params']) == pytest.approx(n)
        assert float(r['val_loss']) == pytest.approx(law(n, float(r['flops_budget'])))
        assert float(r['flops_used']) <= float(r['flops_budget'])
        assert int(r['tokens']) == int(r['steps']) * 32
    assert fits['ar']['laws']['a'] == pytest.approx(law.a, abs=1e-6)
    assert 'a = 0.450' in (tmp_path / 'scaling.md').read_text()
    assert len(list(csv.DictReader(open(tmp_path / 'optima.csv')))) == 4
    # a second call finds everything done; an unfinished run is redone
    calls.clear()
    scaling.main(argv)
    assert calls == []
    os.remove(tmp_path / 'mdlm-mini-1e11' / 'log.jsonl')
    ckpt = torch.load(tmp_path / 'ar-tiny-1e10' / 'ckpt.pt')
    # preempted before the end
    torch.save(dict(ckpt, step=ckpt['step'] - 1), tmp_path / 'ar-tiny-1e10' / 'ckpt.pt')
    capsys.readouterr()
    scaling.main(argv[:-len(TRAIN)] + ['--print-commands'] + TRAIN)
    printed = capsys.readouterr().out.strip().splitlines()
    assert calls == [] and len(printed) == 2
    assert all(p.startswith('python train.py --algo') for p in printed)
    assert '--out-dir ' + str(tmp_path / 'ar-tiny-1e10') in printed[0]
    assert '--resume auto' in printed[0]
    scaling.main(argv)
    assert sorted(c[c.index('--out-dir') + 1] for c in calls) == [str(tmp_path / 'ar-tiny-1e10'),
                                                                   str(tmp_path / 'mdlm-mini-1e11')]


def test_bad_input_is_one_clear_line(tmp_path):
    base = ['--sizes', 'tiny,mini,small', '--out-dir', str(tmp_path)]
    cases = [
        (base + ['--flops', 'lots'], 'comma-separated list'),
        (base + ['--flops', '1e9', '--size', 'mini'], 'pass --algos, --sizes and --flops'),
        (base + ['--flops', '1e9', '--fit-only'], 'no finished runs'),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            scaling.main(argv)
        assert says in str(e.value) and '\n' not in str(e.value)


def test_real_grid_through_train_py(tmp_path, monkeypatch):
    """Three real (tiny) runs through train.py: what read_result collects is what train.py did."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    argv = ['--algos', 'ar', '--sizes', 'tiny,mini,small', '--flops', '1e9',
            '--out-dir', str(tmp_path), '--no-plot',
            *TRAIN, '--micro-batch-size', '2', '--eval-interval', '1000']
    scaling.main(argv)
    with open(tmp_path / 'runs.csv') as f:
        rows = {r['size']: r for r in csv.DictReader(f)}
    for size, r in rows.items():
        fpt = seed_flops_per_token(get_config(size, 257), 16)   # what --flops budgets
        steps = int(1e9 / (3 * fpt * 16 * 2))
        assert int(r['steps']) == steps and int(r['tokens']) == steps * 32
        with open(os.path.join(scaling.run_dir(str(tmp_path), 'ar', size, 1e9), 'log.jsonl')) as f:
            final = [json.loads(line) for line in f if '"val_loss"' in line][-1]
        assert final['step'] == steps and float(r['val_loss']) == final['val_loss']
        assert int(r['params_total']) > int(r['params_non_embedding']) > 0

    def run_train(*a):
        pytest.fail('a finished run was run again')
    monkeypatch.setattr(scaling, 'run_train', run_train)
    scaling.main(argv)
