"""Iso-FLOP scaling laws: which model size is compute-optimal, for each method.

    python scaling.py --algos ar,mdlm,duo,esolm --sizes 6M,19M,34M --flops 1e18,3e18,1e19
    python scaling.py ... --print-commands  # one train.py command per pending run, for a cluster
    python scaling.py ... --tokenizer byte --block-size 64  # unknown flags go to train.py

Chinchilla's "approach 2", as the seed uses it (README, "Scaling laws"): at every budget C each
size N trains with train.py --flops C (so D = C / 6N tokens) in OUT_DIR/<algo>-<size>-<C>/; a
parabola of the final validation loss in log N has its vertex at (N*(C), L*(C)), and across
budgets N* = k C^a, L* = c C^b. Rerunning resumes (finished runs are skipped). Writes runs.csv,
optima.csv, scaling.md, scaling.png.
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

import train
from checkpoint import atomic, load_checkpoint
from model import DiT, Config, flops_per_token, seed_flops_per_token


def get_parser():
    # allow_abbrev=False: --size must not pass for --sizes, it belongs to train.py
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--algos', default='ar,mdlm,duo,esolm', help='comma-separated methods')
    p.add_argument('--sizes', required=True,
                   help='comma-separated model sizes (model.SIZES), at least 3')
    p.add_argument('--flops', required=True,
                   help='comma-separated training FLOPs budgets, e.g. 1e18,3e18')
    p.add_argument('--out-dir', default=os.path.join('out', 'scaling'))
    p.add_argument('--print-commands', action='store_true',
                   help='print the train.py command of every pending run and exit')
    p.add_argument('--fit-only', action='store_true',
                   help='run nothing: fit and plot the runs that are done')
    p.add_argument('--no-plot', action='store_true', help='skip the figure')
    return p


def parse_list(text, kind, flag):
    try:
        items = [kind(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: cannot read '{text}': "
                         f"give a comma-separated list, e.g. {flag} 1e18,3e18") from None
    if not items:
        raise SystemExit(f'{flag} is empty: give a comma-separated list')
    return items


def budget_str(flops):
    short = re.sub(r'e\+?0*(?=\d)', 'e', f'{flops:g}')  # 3e+18 -> 3e18, 1e+09 -> 1e9
    return short if float(short) == flops else repr(flops)


def run_dir(out_dir, algo, size, flops):
    return os.path.join(out_dir, f'{algo}-{size}-{budget_str(flops)}')


def train_argv(algo, size, flops, out_dir, extra):
    return ['--algo', algo, '--size', size, '--flops', budget_str(flops), '--out-dir', out_dir,
            '--resume', 'auto', *extra]


# ---- running the grid and collecting its results ---------------------------

def read_result(path):
    """The finished run in `path` as a row of runs.csv;
    None before its last step's validation loss."""
    ckpt_path = os.path.join(path, 'ckpt.pt')
    log_path = os.path.join(path, 'log.jsonl')
    if not (os.path.exists(ckpt_path) and os.path.exists(log_path)):
        return None
    ckpt = load_checkpoint(ckpt_path)  # a truncated or foreign file: one line naming it
    a = ckpt['args']
    step = ckpt['step']
    with open(log_path) as f:
        val = [r['val_loss'] for r in map(json.loads, f)
               if r.get('step') == step and 'val_loss' in r]
    if step < a['max_iters'] or not val:
        return None
    cfg = Config(**ckpt['config'])
    fpt = flops_per_token(cfg, a['block_size'])            # matmuls: 2 x the weights a token uses
    budgeted = seed_flops_per_token(cfg, a['block_size'])  # what train.py's --flops counts
    tokens = step * a['batch_size'] * a['block_size']
    with torch.device('meta'):
        net = DiT(cfg)
    return dict(
        algo=ckpt['algo'],
        size=a['size'],
        flops_budget=a['flops'],
        params=fpt / 2,
        params_total=net.num_params(),
        params_non_embedding=net.num_params(embeddings=False),
        tokens=tokens,
        steps=step,
        flops_used=3 * budgeted * tokens,
        val_loss=val[-1],
        run_dir=path,
    )


def run_train(argv, log_file):
    """One training run in a fresh process (a crash or leak stays in it)."""
    with open(log_file, 'a') as f:
        return subprocess.run([sys.executable, train.__file__, *argv], stdout=f,
                              stderr=subprocess.STDOUT).returncode


def run_grid(args, extra):
    """Train every (algo, size, budget) not done yet, one after another."""
    grid = [(a, s, c) for c in args.flops for a in args.algos for s in args.sizes]
    pending = [g for g in grid if read_result(run_dir(args.out_dir, *g)) is None]
    if args.print_commands:
        for g in pending:
            argv = train_argv(*g, run_dir(args.out_dir, *g), extra)
            print(shlex.join(['python', 'train.py', *argv]))
        return
    done = len(grid) - len(pending)
    print(f'{done} of {len(grid)} runs done; running {len(pending)}', flush=True)
    for i, (algo, size, flops) in enumerate(pending):
        d = run_dir(args.out_dir, algo, size, flops)
        os.makedirs(d, exist_ok=True)
        t0 = time.perf_counter()
        rc = run_train(train_argv(algo, size, flops, d, extra), os.path.join(d, 'train.out'))
        if rc != 0 or (r := read_result(d)) is None:
            raise SystemExit(f'run {d} failed (exit code {rc}): '
                             f'see {os.path.join(d, "train.out")}; '
                             'rerun this command to retry it and continue the grid')
        print(f'[{i + 1}/{len(pending)}] {algo} {size} C={flops:.3g}: val loss {r["val_loss"]:.4f} '
              f'({r["steps"]} steps, {time.perf_counter() - t0:.0f} s)', flush=True)


def write_csv(path, rows):
    with atomic(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---- the fits --------------------------------------------------------------

def fit_parabola(log_n, loss):
    """The vertex (log N*, L*) of the least-squares L = p2 x^2 + p1 x + p0 in x = log N;
    None with fewer than 3 sizes or no minimum (p2 <= 0)."""
    if len(set(log_n)) < 3:
        return None
    p2, p1, p0 = np.polyfit(log_n, loss, 2)
    if p2 <= 0:
        return None
    return -p1 / (2 * p2), p0 - p1 ** 2 / (4 * p2)


def fit_power_law(c, y):
    """y = k C^e as a line in log-log: returns (e, k)."""
    e, log_k = np.polyfit(np.log(c), np.log(y), 1)
    return float(e), float(math.exp(log_k))


def fit(rows):
    """Per method: every budget's vertex, then N* = k C^a and L* = c C^b through the vertices
    within the sizes trained (a vertex outside them is an extrapolation, not a measurement)."""
    out = {}
    for algo in dict.fromkeys(r['algo'] for r in rows):
        optima = []
        for c in sorted({r['flops_budget'] for r in rows if r['algo'] == algo}):
            runs = [r for r in rows if r['algo'] == algo and r['flops_budget'] == c]
            log_n = np.log([r['params'] for r in runs])
            vertex = fit_parabola(log_n, [r['val_loss'] for r in runs])
            if vertex is None:
                continue
            n_opt = math.exp(vertex[0])
            optima.append(dict(
                algo=algo,
                flops=c,
                n_opt=n_opt,
                d_opt=c / (6 * n_opt),
                l_opt=vertex[1],
                inside=bool(log_n.min() <= vertex[0] <= log_n.max()),
                below=bool(vertex[0] < log_n.min()),
            ))
        bracketed = [o for o in optima if o['inside']]
        laws = None
        if len(bracketed) >= 2:
            cs = [o['flops'] for o in bracketed]
            a, k = fit_power_law(cs, [o['n_opt'] for o in bracketed])
            b, c0 = fit_power_law(cs, [o['l_opt'] for o in bracketed])
            laws = dict(a=a, k=k, b=b, c=c0)
        out[algo] = dict(optima=optima, laws=laws, fitted=len(bracketed))
    return out


def table(fits, rows):
    """The results as markdown: optima per budget, then the power laws."""
    lines = [
        '| method | budget C | N* (params) | D* (tokens) | L* (val loss) | best run (size: loss) |',
        '|---|---|---|---|---|---|',
    ]
    for algo, f in fits.items():
        bound = '' if algo == 'ar' else '<= '
        for c in sorted({r['flops_budget'] for r in rows if r['algo'] == algo}):
            runs = [r for r in rows if r['algo'] == algo and r['flops_budget'] == c]
            best = min(runs, key=lambda r: r['val_loss'])
            o = next((o for o in f['optima'] if o['flops'] == c), None)
            if o is None:
                cells = ['no minimum in the sizes tried', '', '']
            elif not o['inside']:
                cells = [('below' if o['below'] else 'above') + ' the sizes tried', '', '']
            else:
                cells = [f"{o['n_opt']:.3g}", f"{o['d_opt']:.3g}", f"{bound}{o['l_opt']:.4f}"]
            best_cell = f"{best['size']}: {bound}{best['val_loss']:.4f}"
            lines.append(f"| {algo} | {c:.3g} | {' | '.join(cells)} | {best_cell} |")
    lines += ['', '| method | N* = k C^a | L* = c C^b | budgets fitted |', '|---|---|---|---|']
    for algo, f in fits.items():
        law = f['laws']
        if law is None:
            cells = ['needs optima inside the sizes at 2 budgets', '']
        else:
            cells = [f"a = {law['a']:.3f} (k = {law['k']:.3g})",
                     f"b = {law['b']:.4f} (c = {law['c']:.3g})"]
        lines.append(f"| {algo} | {' | '.join(cells)} | {f['fitted']} |")
    lines += ['', 'N: forward FLOPs per token / 2, so C = 6 N D. '
              'AR: exact NLL; the others: NELBO bounds (<=). '
              'N*, L*: the vertex of the parabola in log N, '
              'kept only within the sizes trained at that budget.']
    return '\n'.join(lines)


def pyplot(tool, written):
    """matplotlib's pyplot on its file-only backend, or None and one stderr line: matplotlib is
    optional (scaling.py's and frontier.py's figures)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'{tool}: no figure: matplotlib is not installed (pip install matplotlib); '
              f'{written} written', file=sys.stderr)
        return None
    return plt


def plot(fits, rows, path):
    """Iso-FLOP curves and parabolas per method, and every method's N*(C), L*(C);
    None without matplotlib."""
    plt = pyplot('scaling.py', 'the tables and CSV files are')
    if plt is None:
        return None
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    algos = list(fits)
    budgets = sorted({r['flops_budget'] for r in rows})
    n_rows = math.ceil((len(algos) + 2) / 3)
    fig, axes = plt.subplots(n_rows, 3, figsize=(13, 3.8 * n_rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[len(algos):-2]:
        ax.axis('off')
    for ax, algo in zip(axes, algos):
        for c, color in zip(budgets, plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))):
            runs = sorted((r for r in rows if r['algo'] == algo and r['flops_budget'] == c),
                          key=lambda r: r['params'])
            n = np.array([r['params'] for r in runs])
            loss = [r['val_loss'] for r in runs]
            if len(n):
                ax.plot(n, loss, 'o', color=color, label=f'C={c:.2g}')
            if len(n) >= 3:
                x = np.linspace(np.log(n).min() - 0.3, np.log(n).max() + 0.3, 100)
                parabola = np.polyval(np.polyfit(np.log(n), loss, 2), x)
                ax.plot(np.exp(x), parabola, '-', color=color, lw=1)
            for o in (o for o in fits[algo]['optima'] if o['flops'] == c and o['inside']):
                ax.plot(o['n_opt'], o['l_opt'], '*', color=color, ms=12, mec='k')
        ylabel = 'val loss'
        if algo != 'ar':
            ylabel += ' (NELBO bound)'
        ax.set(xscale='log', xlabel='parameters N', ylabel=ylabel, title=f'{algo}: iso-FLOP curves')
        ax.legend(fontsize=7)
    for algo in algos:  # the frontier: one color per method in both panels
        opt = [o for o in fits[algo]['optima'] if o['inside']]
        law = fits[algo]['laws']
        cs = np.array([o['flops'] for o in opt])
        for ax, key, e, k in ((axes[-2], 'n_opt', 'a', 'k'), (axes[-1], 'l_opt', 'b', 'c')):
            if opt:
                label = algo
                if law:
                    label += f', {e}={law[e]:.3g}'
                line, = ax.plot(cs, [o[key] for o in opt], 'o', label=label)
            if opt and law:
                ax.plot(cs, law[k] * cs ** law[e], '-', color=line.get_color())
    for ax, y, what in ((axes[-2], 'N*(C)', 'size'), (axes[-1], 'L*(C)', 'loss')):
        ax.set(xscale='log', yscale='log', xlabel='FLOPs C', ylabel=y,
               title=f'compute-optimal {what}')
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: budgets' minor labels collide
        ax.yaxis.set_major_formatter(FormatStrFormatter('%.3g'))
        ax.yaxis.set_minor_formatter(FormatStrFormatter('%.3g'))
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)
    return path


def main(argv=None):
    args, extra = get_parser().parse_known_args(argv)
    for flag, kind in (('algos', str), ('sizes', str), ('flops', float)):
        setattr(args, flag, parse_list(getattr(args, flag), kind, f'--{flag}'))
    if len(set(args.sizes)) < 3:
        raise SystemExit('--sizes: give at least 3 sizes (a parabola needs them), '
                         f'got {len(set(args.sizes))}')
    if not all(c > 0 for c in args.flops):
        raise SystemExit(f'--flops: budgets must be > 0, got {args.flops}')
    if any(e.split('=')[0] in ('--algo', '--size', '--max-iters') for e in extra):
        raise SystemExit('scaling.py sets --algo, --size and the steps of each run: '
                         'pass --algos, --sizes and --flops')
    for algo in args.algos:  # train.py's checks, before any run
        for size in args.sizes:
            train.parse_args(train_argv(algo, size, args.flops[0], args.out_dir, extra))
    if not args.fit_only:
        run_grid(args, extra)
        if args.print_commands:
            return None
    grid = [(a, s, c) for c in args.flops for a in args.algos for s in args.sizes]
    found = (read_result(run_dir(args.out_dir, *g)) for g in grid)
    rows = [r for r in found if r is not None]
    if not rows:
        raise SystemExit(f'no finished runs in {args.out_dir}: '
                         'run the grid first (without --fit-only)')
    os.makedirs(args.out_dir, exist_ok=True)
    fits = fit(rows)
    write_csv(os.path.join(args.out_dir, 'runs.csv'), rows)
    optima = [o for f in fits.values() for o in f['optima']]
    if optima:
        write_csv(os.path.join(args.out_dir, 'optima.csv'), optima)
    text = table(fits, rows)
    with atomic(os.path.join(args.out_dir, 'scaling.md')) as tmp, open(tmp, 'w') as f:
        f.write(text + '\n')
    print(text)
    figure = None
    if not args.no_plot:
        figure = plot(fits, rows, os.path.join(args.out_dir, 'scaling.png'))
    wrote = f"wrote {os.path.join(args.out_dir, 'runs.csv')}, scaling.md"
    if figure:
        wrote += f', {figure}'
    print(wrote)
    return fits


if __name__ == '__main__':
    main(sys.argv[1:])
