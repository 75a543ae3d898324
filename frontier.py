"""The speed-quality frontier: sampling throughput against generative perplexity, for several
checkpoints (any mix of the four methods) at several step counts, in one command (README,
"The speed-quality frontier").

    python frontier.py out/ar/ckpt.pt out/mdlm/ckpt.pt:steps=8,32,128 \\
        out/duo/ckpt.pt:steps=8,32 out/duo-dcd/ckpt.pt:steps=4,8,greedy_tail=True \\
        out/esolm/ckpt.pt:steps=16,64 --judge out/ar-judge/ckpt.pt --out out/frontier

Each CHECKPOINT[:steps=S1,S2,...,option=value,...] is one line of the picture: its method and
method options come from the checkpoint, an option given here overrides one (any flag of
train.py's method groups, or a sampler flag: greedy_tail=True, alpha0=0.25, cache=False). Every
point samples --num-samples sequences of --length tokens, each starting with the end-of-text
token (sample.py's start), after one short warm-up call per checkpoint; throughput is generated
tokens / wall seconds of that one call, on one device and dtype. One judge (an AR checkpoint or a
Hugging Face causal LM, as sample.py --judge) gives every point's gen PPL and unigram entropy.
A point whose entropy is below LOW_ENTROPY x the reference entropy (the judge's own samples of the
same size, or --ref-entropy) is flagged degenerate (repetitive text has a deceptively low gen
PPL) and left out of the Pareto front: the points no other point beats on both axes.

Writes DIR/frontier.csv (rewritten after every point) and DIR/frontier.png (needs matplotlib).
"""
import argparse
import ast
import contextlib
import csv
import os
import sys
import time

import torch
from tqdm import tqdm

import data
from checkpoint import atomic, load_model
from config import DTYPE, ON_GPU, add_method_args, add_sampling_args, load_algo
from eval import load_judge, score
from model import sample_categorical
from sample import parse_steps
from scaling import pyplot

LOW_ENTROPY = 0.9   # flagged: entropy below this fraction of the reference
COLUMNS = ['method', 'checkpoint', 'options', 'steps', 'nfe', 'num_samples', 'length', 'seconds',
           'tokens_per_s', 'gen_ppl', 'entropy', 'low_entropy', 'pareto', 'judge', 'device',
           'dtype']


def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoints', nargs='+', metavar='CKPT[:steps=8,32,...,option=value]',
                   help='checkpoints written by train.py, each with its step counts '
                        '(default: --length) and options')
    p.add_argument('--judge', required=True,
                   help='an AR checkpoint or a Hugging Face causal LM name (pip install '
                        'transformers)')
    p.add_argument('--out', required=True, help='folder for frontier.csv and frontier.png')
    p.add_argument('--num-samples', type=int, default=32, help='sequences per point')
    p.add_argument('--length', type=int, default=1024,
                   help='tokens per sequence, the start token included (default: 1024)')
    p.add_argument('--ref-entropy', type=float,
                   help="the reference entropy in nats (default: the judge's own samples)")
    add_sampling_args(p)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default=DTYPE, choices=['bfloat16', 'float16', 'float32'])
    return p


def method_options():
    """Every method flag's name and default (train.py's method groups)."""
    p = argparse.ArgumentParser(add_help=False)
    names = add_method_args(p)
    defaults = vars(p.parse_args([]))
    return {k: defaults[k] for k in names}


def parse_spec(spec, known):
    """'path:steps=8,32,greedy_tail=True' -> (path, steps or None, {option: value}). A piece
    without '=' continues the option before it (a list of steps)."""
    path, _, tail = spec.rpartition(':')
    if '=' not in tail:  # no options (the path may hold ':', as in hf:NAME)
        return spec, None, {}
    options = {}
    key = None
    for piece in tail.split(','):
        if '=' in piece:
            key, _, value = piece.partition('=')
            key = key.strip().replace('-', '_')
            options[key] = value
        elif key is None:
            raise SystemExit(f"'{spec}': write options as key=value, e.g. "
                             f"{path}:steps=8,32,greedy_tail=True")
        else:
            options[key] += ',' + piece
    steps = parse_steps(options.pop('steps'), None) if 'steps' in options else None
    for k, value in options.items():
        if k not in known:
            raise SystemExit(f"'{spec}': unknown option '{k}': use steps or a method or sampler "
                             f"flag, e.g. greedy_tail=True, alpha0=0.25, cache=False")
        with contextlib.suppress(ValueError, SyntaxError):
            options[k] = ast.literal_eval(value)
    return path, steps, options


def check_args(args):
    rules = [('--num-samples', args.num_samples >= 1, '>= 1'),
             ('--length', args.length >= 2, '>= 2'),
             ('--top-p', 0 < args.top_p <= 1, 'in (0, 1]'),
             ('--temperature', args.temperature > 0, '> 0'),
             ('--ref-entropy', args.ref_entropy is None or args.ref_entropy > 0, '> 0')]
    for flag, ok, rule in rules:
        if not ok:
            value = getattr(args, flag[2:].replace('-', '_'))
            raise SystemExit(f'{flag} must be {rule}, got {value}')
    if args.device.startswith('cuda') and not ON_GPU:
        raise SystemExit(f'--device {args.device}: no CUDA device here: use --device cpu')


# ---- measuring -------------------------------------------------------------------------------

def synchronize(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def run_args(args, ckpt, defaults, options):
    """The sampler's args for one checkpoint: the sampler flags given here, the method's options
    from the checkpoint (defaults where it has none), then the spec's options."""
    trained = {k: v for k, v in ckpt['args'].items() if k in defaults}
    return argparse.Namespace(**{**vars(args), **defaults, **trained, **options,
                                 'vocab_size': ckpt['meta']['vocab_size'],
                                 'block_size': ckpt['args']['block_size']})


def timed_sample(algo, model, args, n, length, prompt):
    """(tokens, NFE, wall seconds) of one sampling call, the device's queue drained."""
    synchronize(args.device)
    t0 = time.perf_counter()
    tokens, nfe = algo.sample(model, args, n, length, prompt, args.device)
    synchronize(args.device)
    return tokens, nfe, time.perf_counter() - t0


@torch.no_grad()
def judge_samples(judge, n, length, device):
    """n sequences of `length` tokens drawn from the judge itself (temperature 1), each starting
    with its end-of-text token: text as the judge expects it, for the reference entropy."""
    ids = torch.full((n, 1), judge.tokenizer.eot, dtype=torch.long, device=device)
    while ids.shape[1] < length:
        logits = judge.logits(ids[:, -judge.context:])[:, -1, :judge.tokenizer.vocab_size]
        ids = torch.cat([ids, sample_categorical(logits.double().softmax(-1))[:, None]], 1)
    return ids


def pareto(rows):
    """Flag the points that no other unflagged point beats on both axes (faster and lower gen
    PPL, one of them strictly); degenerate points are neither on the front nor beat anyone."""
    fair = [r for r in rows if not r['low_entropy']]
    for r in rows:
        r['pareto'] = not r['low_entropy'] and not any(
            o['tokens_per_s'] >= r['tokens_per_s'] and o['gen_ppl'] <= r['gen_ppl']
            and (o['tokens_per_s'] > r['tokens_per_s'] or o['gen_ppl'] < r['gen_ppl'])
            for o in fair)


def write_csv(rows, path):
    with atomic(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)


def line_label(r, rows):
    """One line per (method, options), and per checkpoint where several share them."""
    def name(o):
        return o['method'] + (f" {o['options']}" if o['options'] else '')
    if len({o['checkpoint'] for o in rows if name(o) == name(r)}) > 1:
        return f"{name(r)} ({r['checkpoint']})"
    return name(r)


def plot(rows, ref, path):
    """Throughput (log x) against gen PPL, a line per method, the front dashed, the degenerate
    points crossed out; None without matplotlib."""
    plt = pyplot('frontier.py', 'frontier.csv is')
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    lines = {}
    for r in rows:
        lines.setdefault(line_label(r, rows), []).append(r)
    for label, points in lines.items():
        points = sorted(points, key=lambda r: r['tokens_per_s'])
        ax.plot([r['tokens_per_s'] for r in points], [r['gen_ppl'] for r in points], 'o-',
                label=label)
        for r in points:
            ax.annotate(f"{r['steps']}", (r['tokens_per_s'], r['gen_ppl']), fontsize=7,
                        xytext=(4, 4), textcoords='offset points')
    front = sorted((r for r in rows if r['pareto']), key=lambda r: r['tokens_per_s'])
    ax.plot([r['tokens_per_s'] for r in front], [r['gen_ppl'] for r in front], 'k--', lw=1,
            marker='o', mfc='none', ms=11, label='Pareto front')
    low = [r for r in rows if r['low_entropy']]
    if low:
        ax.plot([r['tokens_per_s'] for r in low], [r['gen_ppl'] for r in low], 'rx', ms=12,
                mew=2, label=f'degenerate: entropy < {LOW_ENTROPY} x {ref:.2f} nats')
    first = rows[0]
    judge = first['judge'].rstrip('/')
    judge = os.path.join(os.path.basename(os.path.dirname(judge)), os.path.basename(judge))
    ax.set(xscale='log', xlabel='throughput (generated tokens / s, log scale)',
           ylabel=f'gen PPL (judge: {judge})',
           title=f"{first['num_samples']} x {first['length']} tokens, {first['device']}, "
                 f"{first['dtype']}; labels: steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)
    return path


def markdown(rows):
    lines = ['| checkpoint | method | options | steps | NFE | tokens/s | gen PPL | entropy | |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        mark = 'degenerate' if r['low_entropy'] else ('front' if r['pareto'] else '')
        lines.append(f"| {r['checkpoint']} | {r['method']} | {r['options']} | {r['steps']} | "
                     f"{r['nfe']} | {r['tokens_per_s']:.4g} | {r['gen_ppl']:.4g} | "
                     f"{r['entropy']:.3f} | {mark} |")
    return '\n'.join(lines)


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    defaults = method_options()
    known = set(defaults) | {'top_p', 'temperature', 'stride', 'cache', 'float64'}
    specs = [parse_spec(s, known) for s in args.checkpoints]   # every spec before any work
    with contextlib.suppress(OSError):
        os.makedirs(args.out, exist_ok=True)
    if not os.path.isdir(args.out) or not os.access(args.out, os.W_OK):
        raise SystemExit(f'cannot write to --out {args.out}: pass another folder')
    judge = load_judge(args.judge, args.device)
    autocast = contextlib.nullcontext()
    if args.dtype != 'float32':
        autocast = torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    n = args.num_samples
    length = args.length
    ref = args.ref_entropy
    if ref is None:
        torch.manual_seed(args.seed)
        with autocast:
            ids = judge_samples(judge, n, length, args.device)
        ref = score(judge, ids, 1, judge.tokenizer)[1]
    print(f'reference entropy {ref:.3f} nats; degenerate below {LOW_ENTROPY * ref:.3f}',
          file=sys.stderr)
    rows = []
    csv_path = os.path.join(args.out, 'frontier.csv')
    bar = tqdm(total=sum(len(steps or [None]) for _, steps, _ in specs), desc='frontier')
    for path, steps_list, options in specs:
        model, ckpt = load_model(path, args.device)
        algo = load_algo(ckpt['algo'])
        run = run_args(args, ckpt, defaults, options)
        try:
            algo.check_args(run, training=False)
        except ValueError as e:
            raise SystemExit(f'{path}: {e}') from None
        tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
        prompt = torch.full((n, 1), tok.eot, dtype=torch.long, device=args.device)
        steps_list = steps_list or [min(length, run.block_size)]
        with autocast, torch.no_grad():   # warm-up: a short call, untimed
            warm = argparse.Namespace(**{**vars(run), 'steps': 2})
            algo.sample(model, warm, n, min(length, 16), prompt, args.device)
        for steps in steps_list:
            bar.set_description(f"{ckpt['algo']} steps {steps}")
            point = argparse.Namespace(**{**vars(run), 'steps': steps})
            torch.manual_seed(args.seed)
            with autocast:
                try:
                    tokens, nfe, seconds = timed_sample(algo, model, point, n, length, prompt)
                except ValueError as e:  # a sampler refusing its options: one line
                    raise SystemExit(f'{path}: {e}') from None
                gen_ppl, entropy, _ = score(judge, tokens, 1, tok)
            rows.append(dict(method=ckpt['algo'], checkpoint=path,
                             options=','.join(f'{k}={v}' for k, v in options.items()),
                             steps=steps, nfe=nfe, num_samples=n, length=length,
                             seconds=seconds, tokens_per_s=n * (length - 1) / seconds,
                             gen_ppl=gen_ppl, entropy=entropy,
                             low_entropy=entropy < LOW_ENTROPY * ref, judge=args.judge,
                             device=args.device, dtype=args.dtype))
            pareto(rows)
            write_csv(rows, csv_path)   # a killed run keeps the points done
            bar.set_postfix(tok_s=f'{rows[-1]["tokens_per_s"]:.3g}', gen_ppl=f'{gen_ppl:.3g}')
            bar.update()
        del model
    bar.close()
    plot(rows, ref, os.path.join(args.out, 'frontier.png'))
    print(markdown(rows))
    print(f'reference entropy {ref:.3f} nats (degenerate below {LOW_ENTROPY * ref:.3f}); '
          f'wrote {csv_path}')
    return rows


if __name__ == '__main__':
    main(sys.argv[1:])
