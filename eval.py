"""Validation likelihood of any checkpoint, with a confidence interval (README, "Likelihood").

    python eval.py --ckpt out/mdlm-6M/ckpt.pt                       # the held-out split of its dataset
    python eval.py --ckpt out/mdlm-6M/ckpt.pt --dataset ~/texts/    # zero-shot: another dataset, same command
    python eval.py --ckpt out/esolm-6M/ckpt.pt --max-batches 200 --repeats 4 --json

Consecutive windows of the split (up to --max-batches batches, spread over it) are scored with the
method's eval_nll: AR's exact NLL, or for MDLM, Duo and Eso-LM a Monte Carlo draw of the NELBO, an
upper bound (printed "PPL <="); the 95% interval is mean +- 1.96 SE over batches (too narrow under ~30).
"""
import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np
import torch

import data
from sample import add_method_args, load_model, parse_with_checkpoint
from train import ON_GPU, load_algo


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='a checkpoint written by train.py')
    p.add_argument('--dataset', help="any dataset data.py prepares (default: the checkpoint's)")
    p.add_argument('--split', default='val', choices=['val', 'train'])
    p.add_argument('--block-size', type=int, help="window length (default: the checkpoint's context)")
    p.add_argument('--batch-size', type=int, help="windows per batch (default: the checkpoint's micro-batch)")
    p.add_argument('--max-batches', type=int, default=100, help='at most this many, spread over the split')
    p.add_argument('--repeats', type=int, default=1, help='Monte Carlo draws per window (diffusion methods)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print the result as one JSON line')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default='bfloat16' if ON_GPU else 'float32', choices=['bfloat16', 'float16', 'float32'])
    return p, add_method_args(p)


def windows(tokens, block_size, batch_size, max_batches):
    """Batches (B, block_size) of consecutive non-overlapping windows of a token stream,
    at most max_batches of them spread evenly over it (a partial last batch is dropped)."""
    n_windows = (len(tokens) // block_size) // batch_size * batch_size
    if n_windows == 0:
        raise SystemExit(f'the split has {len(tokens)} tokens, fewer than one batch of {batch_size} x '
                         f'{block_size}: lower --batch-size or --block-size')
    n_batches = min(max_batches, n_windows // batch_size)
    picked = np.linspace(0, n_windows - 1, n_batches * batch_size).round().astype(np.int64)
    x = np.stack([tokens[s:s + block_size] for s in picked * block_size]).astype(np.int64)
    return torch.from_numpy(x).view(n_batches, batch_size, block_size)


@torch.no_grad()
def evaluate(model, algo, args, batches, repeats=1, seed=0, autocast=contextlib.nullcontext()):
    """Per-batch NLL (NELBO) per token, averaged over `repeats` Monte Carlo draws."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = []
    for x in batches:
        x, B = x.to(args.device), x.shape[0]
        total = 0.0
        for _ in range(repeats):
            u = ((torch.rand(1, generator=g) + torch.arange(B)) / B).to(args.device)  # antithetic, GUIDE §1
            with autocast:
                nll, tokens = algo.eval_nll(model, x, u, args)
            total += nll.double().sum().item() / (B * tokens)
        out.append(total / repeats)
    return out


def summarize(per_batch):
    """Mean, standard error and 95% confidence interval of per-batch values."""
    v = np.asarray(per_batch, dtype=np.float64)
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float('nan')
    return mean, se, (mean - 1.96 * se, mean + 1.96 * se)


def main(argv=None):
    parser, method_flags = get_parser()
    pre = parser.parse_known_args(argv)[0]  # bad values get one line before the checkpoint loads
    for k, lo in dict(block_size=2, batch_size=1, max_batches=1, repeats=1).items():
        if getattr(pre, k) is not None and getattr(pre, k) < lo:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(pre, k)}")
    if pre.device.startswith('cuda') and not ON_GPU:
        raise SystemExit(f'--device {pre.device}: no CUDA device here: use --device cpu')
    args, ckpt = parse_with_checkpoint(parser, method_flags, argv)
    algo = load_algo(ckpt['algo'])
    model, _ = load_model(args.ckpt, args.device)
    tokenizer = ckpt['meta']['tokenizer']
    args.dataset = args.dataset or ckpt['args']['dataset']
    data_dir = data.prepare(args.dataset, tokenizer)  # with the checkpoint's tokenizer; a no-op once done
    args.vocab_size = ckpt['meta']['vocab_size']
    args.block_size = args.block_size or ckpt['args']['block_size']
    args.batch_size = args.batch_size or ckpt['args']['micro_batch_size']
    dtype = data.load_meta(data_dir)['dtype']
    tokens = np.memmap(os.path.join(data_dir, f'{args.split}.bin'), dtype=dtype, mode='r')
    batches = windows(tokens, args.block_size, args.batch_size, args.max_batches)
    autocast = contextlib.nullcontext() if args.dtype == 'float32' else \
        torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    try:
        per_batch = evaluate(model, algo, args, batches, args.repeats, args.seed, autocast)
    except ValueError as e:  # a method refusing its options: one line
        raise SystemExit(f'--algo {ckpt["algo"]}: {e}') from None
    mean, se, (lo, hi) = summarize(per_batch)
    n = len(per_batch)
    what, bound = ('NLL', '') if algo.EXACT else ('NELBO', '<= ')
    result = dict(algo=ckpt['algo'], ckpt=args.ckpt, dataset=args.dataset, split=args.split, exact=algo.EXACT,
                  nll=mean, se=se, ci95=[lo, hi], ppl=math.exp(mean), ppl_ci95=[math.exp(lo), math.exp(hi)],
                  bits_per_token=mean / math.log(2), batches=n, windows=n * args.batch_size,
                  block_size=args.block_size, repeats=args.repeats, tokenizer=tokenizer)
    print(f'{ckpt["algo"]} on {args.dataset} ({args.split}, {result["windows"]} windows x {args.block_size} '
          f'tokens, {n} batches, {args.repeats} draw(s) each): {what} {mean:.4f} +- {1.96 * se:.4f} '
          f'nats/token (95% CI), PPL {bound}{math.exp(mean):.3f} [{math.exp(lo):.3f}, {math.exp(hi):.3f}]'
          + (' (under 30 batches: the normal interval is too narrow)' if n < 30 else ''))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
