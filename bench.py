"""Speed: training tokens/s and MFU, sampling seconds with and without cache.

    python bench.py --algo ar mdlm duo esolm esolm:alpha0=0.5,batch_split=0.5 --no-sample
    python bench.py --algo esolm:steps=16384 mdlm ar --size mini --tokenizer byte \\
        --sample-length 1024 --no-train
    python bench.py --algo ar --size 113M --block-size 1024 --batch-size 16 --compile --json
    python bench.py --algo ar ar:fused=False mdlm --profile --mem --mem-steps 1 --no-sample

Several --algo entries run in one process, interleaved over --rounds, each figure the best round:
compare the ratios of one run (the machines are shared and noisy), not numbers across runs.
"""
import argparse
import ast
import contextlib
import copy
import ctypes
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from resource import getpagesize

import torch

import data
from config import DTYPE, ON_GPU, add_method_args, add_sampling_args, load_algo
from model import SIZES, DiT, get_config, peak_flops
from train import compile_model


def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--algo', nargs='+', default=['ar'],
                   help='NAME[:option=value,...] (several: compared)')
    p.add_argument('--size', default='6M')
    p.add_argument('--tokenizer', default='gpt2',
                   help='sets the vocabulary size only (default: gpt2)')
    p.add_argument('--block-size', type=int, default=256)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--iters', type=int, default=5,
                   help='timed training steps per round (the median counts)')
    p.add_argument('--rounds', type=int, default=2,
                   help='interleaved rounds; each figure is the best')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default=DTYPE, choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--compile', action='store_true')
    p.add_argument('--dropout', type=float, default=0.0)
    p.add_argument('--fused', action=argparse.BooleanOptionalAction, default=True,
                   help='output layer + loss without all the logits '
                        '(default: on; per entry: fused=False)')
    p.add_argument('--profile', action='store_true',
                   help='shares: blocks, output layer + loss, optimizer')
    p.add_argument('--mem', action='store_true',
                   help='peak memory of a step, and resident after --mem-steps')
    p.add_argument('--mem-steps', type=int, default=300,
                   help='steps of --mem\'s second run (default: 300; 1: none)')
    p.add_argument('--train', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--sample', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--sample-length', type=int, default=256)
    p.add_argument('--num-samples', type=int, default=1)
    p.add_argument('--steps', type=int, default=None,
                   help='sampling steps (default: the sample length)')
    add_sampling_args(p)
    p.add_argument('--json', action='store_true', help='one JSON object per --algo entry')
    add_method_args(p)
    return p


def check_args(args):  # every flag at parse time: one line naming the fix
    least = dict(block_size=2, sample_length=2, batch_size=1, iters=1, rounds=1, num_samples=1,
                 mem_steps=1, steps=1)
    for k, v in least.items():
        if getattr(args, k) is not None and getattr(args, k) < v:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= {v}, got {getattr(args, k)}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f'--top-p must be in (0, 1], got {args.top_p}')
    if not 0 <= args.dropout < 1:
        raise SystemExit(f'--dropout must be in [0, 1), got {args.dropout}')
    if args.size not in SIZES:
        raise SystemExit(f"unknown size '{args.size}': choose one of {', '.join(SIZES)}")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('no CUDA device here: use --device cpu')
    for spec in args.algo:
        load_algo(spec.partition(':')[0])


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


def timed(fn, device):  # (seconds, fn()), the GPU's queue drained before and after
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else lambda: None
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def setup(spec, args):
    algo, v = variant(spec, args)
    torch.manual_seed(0)
    cfg = get_config(args.size, algo.vocab_size(args.vocab_size), dropout=args.dropout)
    model = DiT(cfg).to(args.device)
    # random weights (not the zero init), so samplers see varied outputs
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=args.device)
    u = ((torch.rand(1) + torch.arange(args.batch_size)) / args.batch_size).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith('cuda'))
    autocast = contextlib.nullcontext() if args.dtype == 'float32' else \
        torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    return dict(algo=algo, args=v, model=model, cfg=cfg, x=x, u=u, opt=opt, autocast=autocast,
                compiled=compile_model(model) if args.compile else model)


def train_step(r, model=None):
    with r['autocast']:
        loss = r['algo'].train_loss(model or r['compiled'], r['x'], r['u'], r['args'], 0, {})
    loss.backward()
    r['opt'].step()
    r['opt'].zero_grad(set_to_none=True)


def train_seconds(r, args):  # median seconds of one optimizer step (forward, backward, AdamW)
    seconds = sorted(timed(lambda: train_step(r), args.device)[0] for _ in range(args.iters))
    return seconds[args.iters // 2]


def throughput(r, args, seconds, peak):
    """Training tokens/s of a step of `seconds`, and its MFU against `peak` FLOP/s: the FLOPs the
    method does, MATH (38); None where it would exceed 100% (the peak is wrong)."""
    tok_s = args.batch_size * args.block_size / seconds
    mfu = 3 * r['algo'].mfu_flops(r['cfg'], r['args']) * tok_s / peak
    return dict(train_tok_per_s=tok_s, mfu=mfu if mfu <= 1 else None, peak_flops=peak)


def profile(r, args):
    """Shares of a step: the blocks (a step with a free stand-in for output layer + loss, less the
    optimizer), output layer + loss (forward and backward again on the inputs it had), the
    optimizer. Fused entries only: on the plain path the loss follows the logits outside the
    network, where a stand-in cannot isolate it."""
    if not r['args'].fused:
        return {}
    heads = []

    def stand_in(x, head=None, **kw):
        def capture(h, W, b):  # a free output layer + loss: records what the real one gets
            heads.append((head, h.detach().requires_grad_(), W, b.detach().requires_grad_()))
            return (h * 0).float().sum()  # the blocks still run backward
        return r['compiled'](x, head=capture, **kw)
    step, _ = timed(lambda: train_step(r, stand_in), args.device)
    with r['autocast']:
        head, out = timed(lambda: sum(loss(h, W, b) for loss, h, W, b in heads), args.device)
    head += timed(out.backward, args.device)[0]
    for p in r['model'].parameters():  # every parameter has a gradient, as in a real step
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    opt, _ = timed(r['opt'].step, args.device)
    r['opt'].zero_grad(set_to_none=True)
    return {'share_blocks': (step - opt) / (step + head),
            'share_output_layer_loss': head / (step + head),
            'share_optimizer': opt / (step + head)}


def resident_bytes():  # this process's resident set size (RSS)
    return int(open('/proc/self/statm').read().split()[1]) * getpagesize()


# in a fresh process (bytes): the peak of one step, what was resident before it
def peak_memory(spec, args):
    r, cuda = setup(spec, args), args.device.startswith('cuda')
    if not cuda:
        # glibc now unmaps every freed block >= 128 KiB: RSS follows the live tensors, as on a GPU
        ctypes.CDLL(None).mallopt(-3, 2 ** 17)  # M_MMAP_THRESHOLD
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # the peak RSS (VmHWM) restarts here: model and optimizer included
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the peak of this step, in any process
    before = torch.cuda.memory_allocated() if cuda else resident_bytes()
    train_step(r)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
    return dict(mem_before_step=before, peak_mem_step=peak)


# in a fresh process, the default allocator: does the heap grow over steps?
def resident_memory(spec, args):
    """Resident set after 20 steps and after --mem-steps, and the growth per step between (bytes;
    the default allocator, a fresh process: does memory creep as the steps go by?)."""
    r = setup(spec, args)
    out = {}
    for step in range(1, args.mem_steps + 1):
        train_step(r)
        if step in (20, args.mem_steps):
            out[f'rss_after_{step}_steps'] = resident_bytes()
    if args.mem_steps > 20:
        growth = out[f'rss_after_{args.mem_steps}_steps'] - out['rss_after_20_steps']
        out['rss_growth_per_step'] = growth / (args.mem_steps - 20)
    return out


def sample_once(r, cache):
    """Seconds and NFE of one sampling run: a start token, then sample_length - 1 new tokens."""
    args, algo, model = r['args'], r['algo'], r['model'].eval()
    args.cache = cache
    args.block_size = max(args.block_size, args.sample_length)  # one window: no strides
    torch.manual_seed(0)
    prompt = torch.zeros(args.num_samples, 1, dtype=torch.long, device=args.device)

    def draw():
        return algo.sample(model, args, args.num_samples, args.sample_length, prompt,
                           device=args.device)

    with r['autocast'], torch.no_grad():
        seconds, (_, nfe) = timed(draw, args.device)
    return seconds, nfe


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    args.vocab_size = data.get_tokenizer(args.tokenizer).vocab_size
    args.steps = args.steps or args.sample_length
    device_name = 'cpu'
    if args.device.startswith('cuda'):
        device_name = torch.cuda.get_device_name(args.device)
    runs = [setup(spec, args) for spec in args.algo]
    for r in runs:
        r['result'] = dict(algo=r['args'].label, size=args.size, device=device_name,
                           dtype=args.dtype, compile=args.compile, fused=r['args'].fused,
                           block_size=args.block_size, batch_size=args.batch_size,
                           vocab_size=args.vocab_size)
    if args.mem:
        measures = [peak_memory]
        if args.mem_steps > 1:
            measures.append(resident_memory)
        spawn = multiprocessing.get_context('spawn')
        for r in runs:
            for measure in measures:
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh heap
                    mem = pool.submit(measure, r['args'].label, args).result()
                r['result'].update({k: v / 2 ** 20 for k, v in mem.items()}, mem_unit='MiB')
    if args.train:
        peak = peak_flops(args.device, getattr(torch, args.dtype))
        for r in runs:  # warm-up (compilation happens here)
            train_seconds(r, args)
        for _ in range(args.rounds):
            for r in runs:
                r['train_s'] = min(r.get('train_s', float('inf')), train_seconds(r, args))
        for r in runs:
            r['result'].update(profile(r, args) if args.profile else {})
            r['result'].update(throughput(r, args, r['train_s'], peak))
            if r['result']['mfu'] is None:
                r['result']['mfu'] = 'unknown (peak too low)'
    if args.sample:
        new_tokens = args.num_samples * (args.sample_length - 1)  # after the one start token
        for _ in range(args.rounds):
            for r in runs:
                for tag, cache in (('cache', True), ('nocache', False)):
                    s, nfe = sample_once(r, cache)
                    if s < r['result'].get(f'sample_seconds_{tag}', float('inf')):
                        r['result'].update({f'sample_seconds_{tag}': s, f'sample_nfe_{tag}': nfe,
                                            f'sample_tok_per_s_{tag}': new_tokens / s})
        for r in runs:
            r['result'].update(sample_length=args.sample_length, sample_steps=r['args'].steps)
    first = runs[0]['result']
    ratios = ()
    if len(runs) > 1:
        ratios = ('train_tok_per_s', 'sample_seconds_cache', 'sample_seconds_nocache')
    # ratios to the first entry, the point of one shared run
    for res in (r['result'] for r in runs):
        res.update({f'{k}_vs_{first["algo"]}': res[k] / first[k] for k in ratios if k in res})
        lines = (f'{k:>40}: {v:.4g}' if isinstance(v, float) else f'{k:>40}: {v}'
                 for k, v in res.items())
        print(json.dumps(res) if args.json else '\n'.join(lines) + '\n')
    return [r['result'] for r in runs]


if __name__ == '__main__':
    main()
