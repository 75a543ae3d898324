"""The trainer's flags: each default given once, the checks, and their resolution.

A flag whose default depends on the device takes it from DEVICE_DEFAULTS (a GPU gets the seed's
scaling recipe, a CPU a 10-minute run); a method states its own defaults (its defaults(): Duo's
distillation recipe) and its own checks (check_args). parse_args refuses a bad value in one line
before any work, then resolve() fills every default once: after it the args never change.
"""
import argparse
import importlib
import os

import torch

import data
from model import DiT, SIZES, flops_per_token, get_config, seed_flops_per_token

ALGOS = ('ar', 'mdlm', 'duo', 'esolm')
ON_GPU = torch.cuda.is_available()
# bfloat16 only where a matmul runs natively in it: on an AVX2-only CPU it is ~100x slower
CPU_DTYPE = 'bfloat16' if torch.cpu._is_avx512_bf16_supported() else 'float32'
DTYPE = 'bfloat16' if ON_GPU else CPU_DTYPE
# the flags whose default depends on the device: (GPU, the seed's recipe; CPU, a short run)
DEVICE_DEFAULTS = dict(batch_size=(256, 8), micro_batch_size=(16, 8), block_size=(2048, 256),
                       max_iters=(100_000, 400), lr=(2e-4, 1e-3), min_lr=(2e-5, 1e-4),
                       eval_interval=(1000, 100), eval_iters=(50, 10), ckpt_interval=(1000, 250),
                       ema=(0.0, 0.0), dtype=('bfloat16', CPU_DTYPE), compile=(True, False))
AT_LEAST = dict(micro_batch_size=1, batch_size=1, block_size=2, eval_interval=1, ckpt_interval=1,
                log_interval=1, eval_iters=1, max_iters=0, warmup_iters=0, lr=0, min_lr=0,
                weight_decay=0)
IN_UNIT = ('ema', 'dropout', 'beta1', 'beta2')   # in [0, 1)


def load_algo(name):
    if name not in ALGOS:
        raise SystemExit(f"unknown algorithm '{name}': choose one of {', '.join(ALGOS)}")
    return importlib.import_module(name)


def by_device(name):  # help text of a device-dependent default
    gpu, cpu = DEVICE_DEFAULTS[name]
    return f'(default: {gpu} on GPU, {cpu} on CPU)'


def get_parser():
    p = argparse.ArgumentParser(description='Train AR, MDLM, Duo or Eso-LM with one trainer '
                                '(train.py; README "Training").')
    g = p.add_argument_group('run')
    g.add_argument('--algo', default='ar', help=f"{' | '.join(ALGOS)} (default: ar)")
    g.add_argument('--size', default='6M', help=f"model size: {', '.join(SIZES)} (default: 6M)")
    g.add_argument('--dataset', default='shakespeare',
                   help='data.py prepares it once (default: shakespeare)')
    g.add_argument('--data-config', help="a Hub dataset's configuration (data.py --config)")
    g.add_argument('--tokenizer', default='gpt2',
                   help='gpt2 | byte | hf:NAME | a tiktoken encoding (default: gpt2)')
    g.add_argument('--out-dir', help='default: out/<algo>-<size>')
    g.add_argument('--seed', type=int, default=1337)
    g.add_argument('--resume', nargs='?', const='yes', choices=['yes', 'auto'],
                   help="continue from out_dir/ckpt.pt; 'auto': only if it holds this run")
    g.add_argument('--overwrite', action='store_true', help='start over in an --out-dir')
    g.add_argument('--init-from', help="start a new run from a checkpoint's weights")
    g.add_argument('--dry-run', action='store_true', help='print the plan and exit')
    g = p.add_argument_group('optimization')
    g.add_argument('--batch-size', type=int,
                   help=f'global batch in sequences {by_device("batch_size")}')
    g.add_argument('--micro-batch-size', type=int, help='sequences per rank per micro-step, at '
                   f'most batch/ranks {by_device("micro_batch_size")}')
    g.add_argument('--block-size', type=int, help=f'context length {by_device("block_size")}')
    g.add_argument('--max-iters', type=int, help=f'optimizer steps {by_device("max_iters")}')
    g.add_argument('--flops', type=float, help='training FLOPs budget: sets the steps, MATH (37)')
    g.add_argument('--lr', type=float, help=f'peak learning rate {by_device("lr")}')
    g.add_argument('--min-lr', type=float, help=f'cosine floor {by_device("min_lr")}')
    g.add_argument('--warmup-iters', type=int, help='default: max(1%% of steps, 100), at most 20%%')
    g.add_argument('--weight-decay', type=float, default=0.1)
    g.add_argument('--decay', default='all', choices=['all', 'matrices'],
                   help='parameters with weight decay: all (the seed) or matrices only')
    g.add_argument('--beta1', type=float, default=0.9)
    g.add_argument('--beta2', type=float, default=0.95)
    g.add_argument('--grad-clip', type=float, default=1.0)
    g.add_argument('--ema', type=float, help=f'EMA decay of the weights {by_device("ema")}')
    g.add_argument('--dropout', type=float, default=0.0)
    g.add_argument('--ssl-ratio', type=float, default=0.0,
                   help='chance of cutting a batch to a random length (AR: never, as the seed)')
    g = p.add_argument_group('evaluation and logging')
    g.add_argument('--eval-interval', type=int, help=by_device('eval_interval'))
    g.add_argument('--eval-iters', type=int,
                   help=f'micro-batches per rank {by_device("eval_iters")}')
    g.add_argument('--log-interval', type=int, default=10)
    g.add_argument('--ckpt-interval', type=int, help=by_device('ckpt_interval'))
    g = p.add_argument_group('system')
    g.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    g.add_argument('--dtype', choices=['bfloat16', 'float16', 'float32'],
                   help=f'autocast dtype {by_device("dtype")}: bfloat16 needs a GPU or an '
                        'AVX512-BF16 CPU')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction,
                   help=f'torch.compile the network {by_device("compile")}')
    g.add_argument('--fused', action=argparse.BooleanOptionalAction, default=True,
                   help='output layer + loss in chunks (fused.py; default: on); off: the plain '
                        'path of the method file')
    add_method_args(p)  # each method's own flags
    return p


def check_args(a):
    """Refuse a bad value in one line, before any work starts."""
    rules = [(k, getattr(a, k) >= lo, f'>= {lo}') for k, lo in AT_LEAST.items()
             if getattr(a, k) is not None]
    rules += [(k, 0 <= getattr(a, k) < 1, 'in [0, 1)') for k in IN_UNIT
              if getattr(a, k) is not None]
    rules += [('ssl_ratio', 0 <= a.ssl_ratio <= 1, 'in [0, 1]'),
              ('grad_clip', a.grad_clip > 0, '> 0'),
              ('flops', a.flops is None or a.flops > 0, '> 0')]
    for k, ok, rule in rules:
        if not ok:
            raise SystemExit(f"--{k.replace('_', '-')} must be {rule}, got {getattr(a, k)}")
    if a.resume and a.overwrite:
        raise SystemExit('--resume continues the run in --out-dir and --overwrite starts over: '
                         'pass one of them')
    if a.size not in SIZES:
        raise SystemExit(f"unknown size '{a.size}': choose one of {', '.join(SIZES)}")
    if a.device.startswith('cuda') and not ON_GPU and not a.dry_run:  # a plan needs no GPU
        raise SystemExit(f'--device {a.device}: no CUDA device here: use --device cpu '
                         f'(or --dry-run to see the GPU plan)')
    load_algo(a.algo)


def resolve(args):
    """Every default that depends on the device, the method, the tokenizer, the number of
    ranks or the FLOPs budget, resolved once: after this the args never change."""
    gpu = args.device.startswith('cuda')
    algo = load_algo(args.algo)
    table = {k: gpu_cpu[0 if gpu else 1] for k, gpu_cpu in DEVICE_DEFAULTS.items()}
    table.update(algo.defaults(args, gpu))     # the method's own, e.g. Duo's distillation
    a = argparse.Namespace(**vars(args))
    for k, v in table.items():
        if getattr(a, k) is None:              # a flag the user passed wins
            setattr(a, k, v)
    a.vocab_size = data.get_tokenizer(a.tokenizer).vocab_size   # K real tokens
    a.world_size = int(os.environ.get('WORLD_SIZE', 1))         # torchrun sets it
    if gpu and 'LOCAL_RANK' in os.environ:
        a.device = f"cuda:{os.environ['LOCAL_RANK']}"
    a.micro_batch_size = min(a.micro_batch_size, max(1, a.batch_size // a.world_size))
    if a.batch_size % (a.world_size * a.micro_batch_size):
        raise SystemExit(f'--batch-size {a.batch_size} is not divisible by {a.world_size} ranks x '
                         f'--micro-batch-size {a.micro_batch_size}: change one of them')
    a.grad_accum = a.batch_size // (a.world_size * a.micro_batch_size)
    cfg = get_config(a.size, algo.vocab_size(a.vocab_size), dropout=a.dropout)
    if a.flops:  # MATH (37): steps = budget / (3 x forward FLOPs per sequence x global batch)
        per_seq = seed_flops_per_token(cfg, a.block_size) * a.block_size
        a.max_iters = max(1, int(a.flops / (3 * per_seq * a.batch_size)))
    if a.warmup_iters is None:  # max(1% of steps, 100), at most 20%
        a.warmup_iters = min(max(a.max_iters // 100, 100), a.max_iters // 5)
    a.out_dir = a.out_dir or os.path.join('out', f'{a.algo}-{a.size}')
    return a


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    args = resolve(args)
    try:  # the method's own options (e.g. Eso-LM's --alpha0), now rather than at its first step
        load_algo(args.algo).check_args(args, training=True)
    except ValueError as e:
        raise SystemExit(f'--algo {args.algo}: {e}') from None
    return args


def plan(args):
    """What the run will do: sizes, FLOPs, steps, tokens."""
    cfg = get_config(args.size, load_algo(args.algo).vocab_size(args.vocab_size))
    with torch.device('meta'):
        net = DiT(cfg)
    tokens = args.batch_size * args.block_size
    per_token = seed_flops_per_token(cfg, args.block_size)   # the seed's count, MATH (36)
    return {'algo': args.algo, 'size': args.size, 'params': net.num_params(),
            'params_non_embedding': net.num_params(embeddings=False),
            'flops_per_token': per_token,
            'flops_per_token_with_attention': flops_per_token(cfg, args.block_size, True),
            'global_batch_sequences': args.batch_size, 'global_batch_tokens': tokens,
            'ranks': args.world_size, 'micro_batch_per_rank': args.micro_batch_size,
            'micro_steps_per_rank': args.grad_accum, 'steps': args.max_iters,
            'total_tokens': args.max_iters * tokens,
            'total_flops': 3 * per_token * tokens * args.max_iters}


def print_plan(args):
    """--dry-run: the plan, every resolved default, and the epochs if the data is prepared."""
    info = plan(args)
    d = data.dataset_dir(args.dataset, args.tokenizer, args.data_config)  # if prepared already
    info['epochs'] = 'unknown (not prepared yet)'
    if os.path.exists(os.path.join(d, 'meta.json')):
        info['epochs'] = args.max_iters * info['global_batch_tokens'] / data.num_tokens(d, 'train')
    shown = ('warmup_iters', *DEVICE_DEFAULTS, *load_algo(args.algo).defaults(args, False),
             'decay')
    info.update({k: getattr(args, k) for k in shown if getattr(args, k) is not None})
    if int(os.environ.get('RANK', 0)) == 0:
        for k, v in info.items():
            print(f'{k:>32}: {v:.4g}' if isinstance(v, float) else f'{k:>32}: {v}')


def add_sampling_args(p):
    """The flags every method's sampler reads (sample.py, eval.py, bench.py, frontier.py),
    besides --steps."""
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling (1.0 = off)')
    p.add_argument('--temperature', type=float, default=1.0, help='AR only')
    p.add_argument('--stride', type=int,
                   help='past the context: new tokens per window (default: half of it)')
    p.add_argument('--cache', action=argparse.BooleanOptionalAction, default=True,
                   help="use the method's cache (KV cache, or MDLM's skip-unchanged)")
    p.add_argument('--float64', action=argparse.BooleanOptionalAction, default=True,
                   help='sampling probabilities in float64 (default: on)')


def add_method_args(parser):
    """Every method's own flags, a group each; returns their names (argparse dests)."""
    names = set()
    for name in ALGOS:
        group = parser.add_argument_group(f'{name} options')
        load_algo(name).add_args(group)
        names |= {action.dest for action in group._group_actions}
    return names


def parse_with_checkpoint(parser, method_flags, argv, load):
    """(args, checkpoint) for a tool that reads a checkpoint (sample.py, eval.py): the method's
    training options (e.g. --time-cond) come from the checkpoint; flags given here override
    them. load(path) reads the checkpoint named by --ckpt."""
    ckpt = load(parser.parse_known_args(argv)[0].ckpt)
    trained = {k: v for k, v in ckpt['args'].items() if k in method_flags}
    return parser.parse_args(argv, namespace=argparse.Namespace(**trained)), ckpt
