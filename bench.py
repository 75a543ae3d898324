"""Speed of one method: training tokens/s and MFU, sampling tokens/s with and without cache.

    python bench.py --algo ar --size 6M --block-size 256 --batch-size 8
    python bench.py --algo mdlm --size 6M --compile --json
    python bench.py --algo mdlm --size small --tokenizer byte --sample-length 256 --steps 2048 --no-train

Timings are noisy on shared machines: compare ratios from one run, not
absolute numbers across runs. On CPU the MFU peak is this machine's measured
matmul FLOP/s in the same dtype (printed beside it).
"""
import argparse
import contextlib
import json
import time

import torch

import data
from model import DiT, flops_per_token, get_config
from train import ALGOS, ON_GPU, compile_model, load_algo, peak_flops


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--algo', default='ar')
    p.add_argument('--size', default='6M')
    p.add_argument('--tokenizer', default='gpt2', help='sets the vocabulary size only (default: gpt2)')
    p.add_argument('--block-size', type=int, default=256)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--iters', type=int, default=10, help='timed training steps')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (compilation happens here)')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--compile', action='store_true')
    p.add_argument('--train', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--sample', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--sample-length', type=int, default=256)
    p.add_argument('--num-samples', type=int, default=1)
    p.add_argument('--steps', type=int, default=None, help='sampling steps (default: sample length)')
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--json', action='store_true', help='print one JSON object')
    for name in ALGOS:
        with contextlib.suppress(SystemExit):
            load_algo(name).add_args(p.add_argument_group(f'{name} options'))
    return p


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def bench_train(model, algo, args, autocast):
    """Tokens/s of full optimizer steps (forward, backward, AdamW)."""
    compiled = compile_model(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(args.device).type == 'cuda')
    K, B, L = args.vocab_size, args.batch_size, args.block_size
    x = torch.randint(0, K, (B, L), device=args.device)
    u = (torch.rand(1) + torch.arange(B)) / B
    times = []
    for i in range(args.warmup + args.iters):
        sync(args.device)
        t0 = time.perf_counter()
        with autocast:
            loss = algo.train_loss(compiled, x, u.to(args.device), args, 0, {})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # the median step: robust to a noisy neighbour
    return B * L / dt


def bench_sample(model, algo, args, autocast, cache):
    args.cache = cache
    torch.manual_seed(0)
    sync(args.device)
    t0 = time.perf_counter()
    with autocast:
        tokens, nfe = algo.sample(model, args, args.num_samples, args.sample_length,
                                  torch.zeros(args.num_samples, 1, dtype=torch.long, device=args.device),
                                  device=args.device)
    sync(args.device)
    seconds = time.perf_counter() - t0
    return {'seconds': seconds, 'nfe': nfe, 'tok_per_s': args.num_samples * (args.sample_length - 1) / seconds}


def main(argv=None):
    args = get_parser().parse_args(argv)
    algo = load_algo(args.algo)
    args.vocab_size = data.get_tokenizer(args.tokenizer).vocab_size
    args.steps = args.steps or args.sample_length
    torch.manual_seed(0)
    cfg = get_config(args.size, algo.vocab_size(args.vocab_size))
    model = DiT(cfg).to(args.device)
    for p in model.parameters():  # random weights, so samplers see varied outputs
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    dtype = getattr(torch, args.dtype)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else \
        torch.autocast(torch.device(args.device).type, dtype=dtype)
    result = {'algo': args.algo, 'size': args.size, 'device': torch.cuda.get_device_name() if
              args.device.startswith('cuda') else 'cpu', 'dtype': args.dtype, 'compile': args.compile,
              'block_size': args.block_size, 'batch_size': args.batch_size, 'vocab_size': args.vocab_size}
    if args.train:
        tok_s = bench_train(model, algo, args, autocast)
        peak = peak_flops(args.device, dtype)
        flops = 3 * flops_per_token(cfg, args.block_size, attention=True) * tok_s
        result.update(train_tok_per_s=tok_s, mfu=flops / peak, peak_flops=peak)
    if args.sample:
        model.eval()
        for cache in (True, False):
            r = bench_sample(model, algo, args, autocast, cache)
            tag = 'cache' if cache else 'nocache'
            result.update({f'sample_{k}_{tag}': v for k, v in r.items()})
        result.update(sample_length=args.sample_length, sample_steps=args.steps)
    if args.json:
        print(json.dumps(result))
        return result
    for k, v in result.items():
        print(f'{k:>28}: {v:.4g}' if isinstance(v, float) else f'{k:>28}: {v}')
    return result


if __name__ == '__main__':
    main()
