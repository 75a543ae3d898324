"""Speed: training tokens/s and MFU, sampling seconds with and without cache.

    python bench.py --algo ar --size 6M --block-size 256 --batch-size 8
    python bench.py --algo ar mdlm duo esolm esolm:alpha0=0.5,batch_split=0.5 --no-sample
    python bench.py --algo esolm:steps=16384 mdlm ar --size mini --tokenizer byte --sample-length 1024 --no-train
    python bench.py --algo ar --size 113M --block-size 1024 --batch-size 16 --compile --json

Several --algo entries (NAME or NAME:option=value,...) run in one process,
interleaved over --rounds, each figure the best round: the machines are shared
and noisy, so compare the ratios of one run, not numbers across runs. On CPU
the MFU peak is this machine's measured matmul FLOP/s in the same dtype.
"""
import argparse
import ast
import contextlib
import copy
import json
import time

import torch

import data
from model import DiT, flops_per_token, get_config
from train import ALGOS, ON_GPU, compile_model, load_algo, peak_flops


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--algo', nargs='+', default=['ar'], help='NAME or NAME:option=value,... (several: compared)')
    p.add_argument('--size', default='6M')
    p.add_argument('--tokenizer', default='gpt2', help='sets the vocabulary size only (default: gpt2)')
    p.add_argument('--block-size', type=int, default=256)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--iters', type=int, default=5, help='timed training steps per round (the median counts)')
    p.add_argument('--rounds', type=int, default=2, help='interleaved rounds; each figure is the best')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--compile', action='store_true')
    p.add_argument('--train', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--sample', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--sample-length', type=int, default=256)
    p.add_argument('--num-samples', type=int, default=1)
    p.add_argument('--steps', type=int, default=None, help='sampling steps (default: the sample length)')
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--json', action='store_true', help='one JSON object per --algo entry')
    for name in ALGOS:
        with contextlib.suppress(SystemExit):
            load_algo(name).add_args(p.add_argument_group(f'{name} options'))
    return p


def variant(spec, args):
    """'esolm:alpha0=0.5,batch_split=0.5' -> (module, args with those options)."""
    name, _, options = spec.partition(':')
    v = copy.copy(args)
    v.algo, v.label = name, spec
    for item in filter(None, options.split(',')):
        key, _, value = item.partition('=')
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
        setattr(v, key.replace('-', '_'), value)
    return load_algo(name), v


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def train_seconds(model, opt, algo, args, x, u, autocast):
    """Median seconds of one optimizer step (forward, backward, AdamW)."""
    def step():
        with autocast:
            loss = algo.train_loss(model, x, u, args, 0, {})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sorted(timed(step, args.device)[0] for _ in range(args.iters))[args.iters // 2]


def sample_once(model, algo, args, autocast, cache):
    args.cache = cache
    args.block_size = max(args.block_size, args.sample_length)  # one window: no semi-AR strides
    torch.manual_seed(0)
    prompt = torch.zeros(args.num_samples, 1, dtype=torch.long, device=args.device)  # one start token
    with autocast, torch.no_grad():
        seconds, (_, nfe) = timed(lambda: algo.sample(model, args, args.num_samples, args.sample_length,
                                                      prompt, device=args.device), args.device)
    return seconds, nfe


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.vocab_size = data.get_tokenizer(args.tokenizer).vocab_size
    args.steps = args.steps or args.sample_length
    dtype = getattr(torch, args.dtype)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else \
        torch.autocast(torch.device(args.device).type, dtype=dtype)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'cpu'
    runs = []
    for spec in args.algo:
        algo, v = variant(spec, args)
        torch.manual_seed(0)
        cfg = get_config(args.size, algo.vocab_size(args.vocab_size))
        model = DiT(cfg).to(args.device)
        for p in model.parameters():  # random weights (not the zero init), so samplers see varied outputs
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=args.device)
        u = ((torch.rand(1) + torch.arange(args.batch_size)) / args.batch_size).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith('cuda'))
        runs.append(dict(algo=algo, args=v, model=model, cfg=cfg, x=x, u=u, opt=opt,
                         compiled=compile_model(model) if args.compile else model,
                         result={'algo': spec, 'size': args.size, 'device': device_name, 'dtype': args.dtype,
                                 'compile': args.compile, 'block_size': args.block_size,
                                 'batch_size': args.batch_size, 'vocab_size': args.vocab_size}))
    if args.train:
        peak = peak_flops(args.device, dtype)
        for r in runs:  # warm-up (compilation happens here)
            r['model'].train()
            train_seconds(r['compiled'], r['opt'], r['algo'], r['args'], r['x'], r['u'], autocast)
        for _ in range(args.rounds):
            for r in runs:
                s = train_seconds(r['compiled'], r['opt'], r['algo'], r['args'], r['x'], r['u'], autocast)
                r['train_s'] = min(r.get('train_s', float('inf')), s)
        for r in runs:
            tok_s = args.batch_size * args.block_size / r['train_s']
            mfu = 3 * flops_per_token(r['cfg'], args.block_size, attention=True) * tok_s / peak
            r['result'].update(train_tok_per_s=tok_s, mfu=mfu, peak_flops=peak)
    if args.sample:
        for r in runs:
            r['model'].eval()
        for _ in range(args.rounds):
            for r in runs:
                for cache in (True, False):
                    tag = 'cache' if cache else 'nocache'
                    s, nfe = sample_once(r['model'], r['algo'], r['args'], autocast, cache)
                    if s < r['result'].get(f'sample_seconds_{tag}', float('inf')):
                        r['result'].update({f'sample_seconds_{tag}': s, f'sample_nfe_{tag}': nfe,
                                            f'sample_tok_per_s_{tag}': args.num_samples *
                                            (args.sample_length - 1) / s})
        for r in runs:
            r['result'].update(sample_length=args.sample_length, sample_steps=r['args'].steps)
    first = runs[0]['result']
    for r in runs:
        res = r['result']
        if len(runs) > 1:  # ratios to the first entry, the point of one shared run
            for k in ('train_tok_per_s', 'sample_seconds_cache', 'sample_seconds_nocache'):
                if k in res:
                    res[f'{k}_vs_{runs[0]["args"].label}'] = res[k] / first[k]
        if args.json:
            print(json.dumps(res))
        else:
            print('\n'.join(f'{k:>40}: {v:.4g}' if isinstance(v, float) else f'{k:>40}: {v}'
                            for k, v in res.items()) + '\n')
    return [r['result'] for r in runs]


if __name__ == '__main__':
    main()
