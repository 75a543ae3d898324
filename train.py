"""Train AR, MDLM, Duo or Eso-LM with one trainer.

    python train.py --algo mdlm --size 6M                  # CPU: shrunk defaults, ~10 min
    torchrun --standalone --nproc_per_node=8 train.py --algo mdlm --size 113M --flops 6e18
    python train.py --algo duo --size 19M --dry-run        # print the plan and exit

The method is a module (ar.py, mdlm.py, duo.py, esolm.py) with the same functions; this file never
branches on it. The defaults are the seed's scaling recipe (GUIDE §7) on a GPU and a small run on a CPU.
"""
import argparse
import contextlib
import copy
import gc
import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from model import DiT, SIZES, flops_per_token, get_config

ALGOS = ('ar', 'mdlm', 'duo', 'esolm')
ON_GPU = torch.cuda.is_available()
DTYPE = 'bfloat16' if ON_GPU or torch.cpu._is_avx512_bf16_supported() else 'float32'  # else bf16 is ~100x slower
DEFAULTS = dict(batch_size=(256, 8), micro_batch_size=(16, 8), block_size=(2048, 256),
                max_iters=(100_000, 400), lr=(2e-4, 1e-3), min_lr=(2e-5, 1e-4), eval_interval=(1000, 100),
                eval_iters=(50, 10), ckpt_interval=(1000, 250), ema=(0.0, 0.0))
# with --distill-from: the seed's distil_owt.sh (GUIDE §7); a CPU keeps its 5 teacher rounds: dt <= 2^4/T
DISTILL = dict(batch_size=(128, 8), max_iters=(50_000, 500), lr=(6e-5, 3e-4), min_lr=(None, None),
               warmup_iters=(500, 10), ema=(0.999, 0.99), teacher_every=(10_000, 100), distill_T=(512, 512))
AT_LEAST = dict(micro_batch_size=1, batch_size=1, block_size=2, eval_interval=1, ckpt_interval=1,
                log_interval=1, eval_iters=1, max_iters=0, warmup_iters=0, teacher_every=1, distill_T=1,
                lr=0, min_lr=0, weight_decay=0)
SAME_RUN = ('algo', 'size', 'dataset', 'tokenizer', 'block_size', 'batch_size', 'seed')  # --resume auto


def load_algo(name):
    if name not in ALGOS:
        raise SystemExit(f"unknown algorithm '{name}': choose one of {', '.join(ALGOS)}")
    return importlib.import_module(name)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = lambda k: f'(default: {DEFAULTS[k][0]} on GPU, {DEFAULTS[k][1]} on CPU)'
    g = p.add_argument_group('run')
    g.add_argument('--algo', default='ar', help=f"{' | '.join(ALGOS)} (default: ar)")
    g.add_argument('--size', default='6M', help=f"model size: {', '.join(SIZES)} (default: 6M)")
    g.add_argument('--dataset', default='shakespeare', help='data.py prepares it once (default: shakespeare)')
    g.add_argument('--tokenizer', default='gpt2', help='gpt2 | byte | a tiktoken encoding (default: gpt2)')
    g.add_argument('--out-dir', help='default: out/<algo>-<size>')
    g.add_argument('--seed', type=int, default=1337)
    g.add_argument('--resume', nargs='?', const='yes', choices=['yes', 'auto'],
                   help="continue from out_dir/ckpt.pt; 'auto': only if it holds this run (default: off)")
    g.add_argument('--overwrite', action='store_true', help="start over in an --out-dir that holds a run")
    g.add_argument('--init-from', help="start a new run from a checkpoint's weights")
    g.add_argument('--dry-run', action='store_true', help='print the plan and exit')
    g = p.add_argument_group('optimization')
    g.add_argument('--batch-size', type=int, help=f'global batch in sequences {d("batch_size")}')
    g.add_argument('--micro-batch-size', type=int,
                   help=f'sequences per rank per micro-step, at most batch/ranks {d("micro_batch_size")}')
    g.add_argument('--block-size', type=int, help=f'context length {d("block_size")}')
    g.add_argument('--max-iters', type=int, help=f'optimizer steps {d("max_iters")}')
    g.add_argument('--flops', type=float, help='training FLOPs budget; sets the steps (GUIDE §7)')
    g.add_argument('--lr', type=float, help=f'peak learning rate {d("lr")}')
    g.add_argument('--min-lr', type=float, help=f'cosine floor {d("min_lr")}')
    g.add_argument('--warmup-iters', type=int, help='default: max(1%% of steps, 100), at most 20%%')
    g.add_argument('--weight-decay', type=float, default=0.1)
    g.add_argument('--decay', default='all', choices=['all', 'matrices'],
                   help="parameters that get weight decay: all (the seed) or matrices (not gains, biases)")
    g.add_argument('--beta1', type=float, default=0.9)
    g.add_argument('--beta2', type=float, default=0.95)
    g.add_argument('--grad-clip', type=float, default=1.0)
    g.add_argument('--ema', type=float, help='EMA decay of the weights, e.g. 0.9999 (default: off)')
    g.add_argument('--dropout', type=float, default=0.0)
    g.add_argument('--ssl-ratio', type=float, default=0.0,
                   help='chance of cutting a diffusion batch to a random length (AR: never, as the seed)')
    g = p.add_argument_group('evaluation and logging')
    g.add_argument('--eval-interval', type=int, help=d('eval_interval'))
    g.add_argument('--eval-iters', type=int, help=f'micro-batches per rank {d("eval_iters")}')
    g.add_argument('--log-interval', type=int, default=10)
    g.add_argument('--ckpt-interval', type=int, help=d('ckpt_interval'))
    g = p.add_argument_group('system')
    g.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    g.add_argument('--dtype', default=DTYPE, choices=['bfloat16', 'float16', 'float32'],
                   help=f'autocast dtype (default here: {DTYPE}; bfloat16 needs a GPU or an AVX512-BF16 CPU)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=ON_GPU,
                   help='torch.compile the network (default: on with CUDA)')
    g.add_argument('--fused', action=argparse.BooleanOptionalAction, default=True,
                   help='output layer + loss in chunks, never all logits (default: on; off: the plain path)')
    for name in ALGOS:  # each method's own flags
        load_algo(name).add_args(p.add_argument_group(f'{name} options'))
    return p


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    distill = getattr(args, 'distill_from', None)
    for k, (gpu, cpu) in ({**DEFAULTS, **DISTILL} if distill else DEFAULTS).items():
        if getattr(args, k) is None:  # a flag the user passed wins
            setattr(args, k, gpu if args.device.startswith('cuda') else cpu)
    if args.min_lr is None:
        args.min_lr = args.lr  # distillation: constant after warmup
    args.out_dir = args.out_dir or os.path.join('out', f'{args.algo}-{args.size}')
    check_args(args)
    if args.algo == 'ar':
        args.ssl_ratio = 0.0  # the seed cuts only diffusion batches (GUIDE §7)
    return args


def check_args(a):
    """Refuse a bad value in one line now, before any work starts."""
    rules = [(k, getattr(a, k) >= lo, f'>= {lo}') for k, lo in AT_LEAST.items()
             if getattr(a, k, None) is not None]
    rules += [(k, 0 <= getattr(a, k) < 1, 'in [0, 1)') for k in ('ema', 'dropout', 'beta1', 'beta2')]
    rules += [('ssl_ratio', 0 <= a.ssl_ratio <= 1, 'in [0, 1]'), ('grad_clip', a.grad_clip > 0, '> 0'),
              ('flops', a.flops is None or a.flops > 0, '> 0')]
    for k, ok, rule in rules:
        if not ok:
            raise SystemExit(f"--{k.replace('_', '-')} must be {rule}, got {getattr(a, k)}")
    if a.resume and a.overwrite:
        raise SystemExit('--resume continues the run in --out-dir and --overwrite starts over: pass one of them')
    if a.size not in SIZES:
        raise SystemExit(f"unknown size '{a.size}': choose one of {', '.join(SIZES)}")
    if a.device.startswith('cuda') and not ON_GPU:
        raise SystemExit(f'--device {a.device}: no CUDA device here: use --device cpu')
    try:  # the method's own options (e.g. Eso-LM's --alpha0), not at its first evaluation
        getattr(load_algo(a.algo), 'check_args', lambda a, training: None)(a, training=True)
    except ValueError as e:
        raise SystemExit(f'--algo {a.algo}: {e}') from None


def seed_for(*keys):
    """A 63-bit seed from any keys: randomness is a function of (seed, step, slice),
    so resuming, or splitting a batch over ranks or micro-steps, changes nothing."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


def get_lr(step, args):
    warmup = args.warmup_iters  # resolved by Trainer.plan
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.max_iters - warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def peak_flops(device, dtype):
    """Peak matmul FLOP/s for MFU: the datasheet on known GPUs, else the best of up to
    6 timed n x n matmuls in the run's dtype (the best: a busy machine slows only some)."""
    cuda = torch.device(device).type == 'cuda'
    for key, peak in (('H100', 989e12), ('H200', 989e12), ('A100', 312e12), ('L40', 181e12)):
        if cuda and dtype != torch.float32 and key in torch.cuda.get_device_name(device):
            return peak
    n, best, start = 2048 if cuda else 1024, float('inf'), time.perf_counter()
    a = torch.randn(n, n, device=device, dtype=dtype)
    for i in range(6):  # at most ~2 s: bfloat16 on a CPU without it can be 100x slower than float32
        t0 = time.perf_counter()
        (a @ a).sum().item()  # .item() waits for a GPU
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > 2:
            break
    return 2 * n ** 3 / best


def mfu_flops_per_token(algo, cfg, args):  # attention included; MDLM, Eso-LM: the output layer where masked
    own = getattr(algo, 'mfu_flops', None)
    return own(cfg, args) if own else flops_per_token(cfg, args.block_size, attention=True)


def percent(mfu):  # an MFU above 100% means the measured peak is wrong: unknown
    return f'{mfu:.1%}' if mfu <= 1 else '?'


def compile_model(model):
    # keep select= (the masked positions MDLM computes logits at) inside one graph
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model)


def load_checkpoint(path, algo=None):
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at '{path}'")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)  # plain tensors only: runs no code
    except Exception as e:  # truncated, or not a torch file (torch's message would advise running its code)
        raise SystemExit(f"'{path}' is not a readable checkpoint ({type(e).__name__}): "
                         f"pass a ckpt.pt written by train.py") from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'args', 'algo', 'step', 'meta'} <= set(ckpt):
        raise SystemExit(f"'{path}' holds no train.py checkpoint: pass a ckpt.pt written by train.py")
    if algo is not None and ckpt['algo'] != algo:
        raise SystemExit(f"'{path}' is a checkpoint of --algo {ckpt['algo']}, not {algo}: "
                         f"pass --algo {ckpt['algo']} or another checkpoint")
    return ckpt


def check_out_dir(a):
    """Never replace a run by accident; refuse a folder that cannot be written, now."""
    if os.path.exists(os.path.join(a.out_dir, 'ckpt.pt')) and not (a.resume or a.overwrite):
        raise SystemExit(f'{a.out_dir} holds a run (ckpt.pt): pass --resume to continue it, '
                         f'--overwrite to start over, or another --out-dir')
    with contextlib.suppress(OSError):
        os.makedirs(a.out_dir, exist_ok=True)
    if not os.access(a.out_dir, os.W_OK) or not os.path.isdir(a.out_dir):
        raise SystemExit(f'cannot write to --out-dir {a.out_dir}: pass another --out-dir')


class Trainer:
    """Holds what the loop needs; each method is a plain function below."""

    def __init__(self, args):
        self.args = a = args
        self.algo = load_algo(a.algo)
        self.ddp, self.rank, self.world = 'RANK' in os.environ, 0, 1
        if self.ddp:
            dist.init_process_group('nccl' if a.device.startswith('cuda') else 'gloo')
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if a.device.startswith('cuda'):
                a.device = f"cuda:{os.environ['LOCAL_RANK']}"
                torch.cuda.set_device(a.device)
        self.master = self.rank == 0
        a.micro_batch_size = min(a.micro_batch_size, max(1, a.batch_size // self.world))
        if a.batch_size % (self.world * a.micro_batch_size):
            raise SystemExit(f'--batch-size {a.batch_size} is not divisible by {self.world} ranks x '
                             f'--micro-batch-size {a.micro_batch_size}: change one of them')
        self.accum = a.batch_size // (self.world * a.micro_batch_size)
        self.device_type, self.dtype = torch.device(a.device).type, getattr(torch, a.dtype)
        self.autocast = contextlib.nullcontext() if self.dtype == torch.float32 else \
            torch.autocast(self.device_type, dtype=self.dtype)

    def plan(self, vocab):
        a = self.args
        self.cfg = get_config(a.size, self.algo.vocab_size(vocab), dropout=a.dropout)
        self.flops_per_seq = flops_per_token(self.cfg, a.block_size) * a.block_size
        if a.flops:  # GUIDE §7: steps = budget / (3 x forward FLOPs per sequence x global batch)
            a.max_iters = max(1, int(a.flops / (3 * self.flops_per_seq * a.batch_size)))
        if a.warmup_iters is None:  # max(1% of steps, 100), at most 20%
            a.warmup_iters = min(max(a.max_iters // 100, 100), a.max_iters // 5)
        with torch.device('meta'):
            m = DiT(self.cfg)
        return {'algo': a.algo, 'size': a.size, 'params': m.num_params(),
                'params_non_embedding': m.num_params(embeddings=False),
                'flops_per_token': flops_per_token(self.cfg, a.block_size),
                'flops_per_token_with_attention': flops_per_token(self.cfg, a.block_size, attention=True),
                'global_batch_sequences': a.batch_size, 'global_batch_tokens': a.batch_size * a.block_size,
                'ranks': self.world, 'micro_batch_per_rank': a.micro_batch_size,
                'micro_steps_per_rank': self.accum, 'steps': a.max_iters,
                'total_tokens': a.max_iters * a.batch_size * a.block_size,
                'total_flops': 3 * self.flops_per_seq * a.batch_size * a.max_iters}

    def setup_data(self):
        a = self.args
        if self.master:
            data.prepare(a.dataset, a.tokenizer)
        if self.ddp:
            dist.barrier()
        self.data_dir = data.dataset_dir(a.dataset, a.tokenizer)
        self.meta = data.load_meta(self.data_dir)
        self.n_tokens = {split: data.num_tokens(self.data_dir, split) for split in ('train', 'val')}
        for split in ('train', 'val'):
            if self.n_tokens[split] <= a.block_size:
                raise SystemExit(f'the {split} split of {a.dataset} has fewer tokens than --block-size '
                                 f'{a.block_size}: lower --block-size or use more data')
        a.vocab_size = self.meta['vocab_size']  # K real tokens, what the methods read

    def batch(self, split, key, slice_id, n_slices):
        """Rows [slice_id] of a global batch drawn from seed (key): tokens and the
        antithetic uniforms u_i = (u + i) / n over the whole batch (GUIDE §1)."""
        a, mb, n = self.args, self.args.micro_batch_size, self.args.micro_batch_size * n_slices
        g = torch.Generator().manual_seed(seed_for(a.seed, split, key))
        starts = torch.randint(self.n_tokens[split] - a.block_size, (n,), generator=g)
        u = (torch.rand(1, generator=g) + torch.arange(n)) / n
        rows = slice(slice_id * mb, (slice_id + 1) * mb)
        x = data.get_batch(self.data_dir, split, starts[rows], a.block_size, a.device, self.meta['dtype'])
        if split == 'train' and torch.rand(1, generator=g).item() < a.ssl_ratio:  # variable length
            x = x[:, :int(torch.randint(2, a.block_size + 1, (1,), generator=g))]
        return x, u[rows].to(a.device)

    def setup_model(self):
        a = self.args
        self.raw = DiT(self.cfg).to(a.device)
        decays = lambda p: a.decay == 'all' or p.dim() >= 2  # the seed decays gains and biases too
        groups = [{'params': [p for p in self.raw.parameters() if decays(p) == d], 'weight_decay': wd}
                  for d, wd in ((True, a.weight_decay), (False, 0.0))]
        self.opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=1e-8,
                                     fused=self.device_type == 'cuda')
        self.step, self.best_val, self.resumed = 0, float('inf'), False
        self.ema = copy.deepcopy(self.raw).requires_grad_(False) if a.ema else None
        self.ckpt_path = os.path.join(a.out_dir, 'ckpt.pt')
        self.load()
        self.model = compile_model(self.raw) if a.compile else self.raw
        if self.ddp:  # compile first, then wrap (as nanoGPT)
            ids = [torch.device(a.device).index] if self.device_type == 'cuda' else None
            self.model = DDP(self.model, device_ids=ids)
        self.state = {}  # per-run state a method may keep (Duo's teacher)

    def load(self):
        a = self.args
        if a.resume == 'yes' or (a.resume == 'auto' and os.path.exists(self.ckpt_path)):
            ckpt = load_checkpoint(self.ckpt_path, a.algo)
            differ = [k for k in SAME_RUN if ckpt['args'].get(k) != getattr(a, k)]
            if a.resume == 'auto' and differ:
                raise SystemExit(f"{self.ckpt_path} holds another run (differs in {', '.join(differ)}): use another --out-dir")
            self.raw.load_state_dict(ckpt['model'])
            try:
                self.opt.load_state_dict(ckpt['optimizer'])
            except ValueError:  # other parameter groups
                decay = ckpt['args'].get('decay', 'matrices')
                raise SystemExit(f'pass --decay {decay} to resume this run') from None
            if self.ema is not None and ckpt.get('ema') is not None:
                self.ema.load_state_dict(ckpt['ema'])
            self.step, self.best_val, self.resumed = ckpt['step'], ckpt['best_val_loss'], True
            self.log(f'resumed from {self.ckpt_path} at step {self.step}')
        elif init := a.init_from or getattr(a, 'distill_from', None):
            ckpt = load_checkpoint(init, a.algo)  # weights only: fresh optimizer and schedule
            if ckpt['config'] != asdict(self.cfg):
                raise SystemExit(f"{init} has another network ({ckpt['config']}): pass its --size and --tokenizer")
            self.raw.load_state_dict(ckpt['ema'] if ckpt.get('ema') else ckpt['model'])
            if self.ema is not None:
                self.ema.load_state_dict(self.raw.state_dict())
            self.log(f'initialised from {init} (step {ckpt["step"]})')

    def save(self):
        if not self.master:
            return
        tmp = f'{self.ckpt_path}.{os.getpid()}.tmp'  # unique per process
        torch.save({'model': self.raw.state_dict(), 'optimizer': self.opt.state_dict(),
                    'ema': self.ema.state_dict() if self.ema is not None else None, 'step': self.step,
                    'args': vars(self.args), 'algo': self.args.algo, 'config': asdict(self.cfg),
                    'meta': self.meta, 'best_val_loss': self.best_val}, tmp)
        os.replace(tmp, self.ckpt_path)  # atomic: a crash never leaves a half-written checkpoint
        self.last_ckpt_step = self.step

    def trim_log(self):
        """Keep the log rows written before the checkpoint this run starts from (none for a new
        run), so a resumed run logs as one; its evaluation at that step runs again."""
        path = os.path.join(self.args.out_dir, 'log.jsonl')
        with open(path, 'a+') as f:
            f.seek(0)  # a last line cut short by a kill has no newline
            rows = [r for r in map(json.loads, (line for line in f if line.endswith('\n'))) if
                    r.get('step', 0) < self.step or (r.get('step') == self.step and 'val_loss' not in r)]
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
        os.replace(tmp, path)  # atomic

    def log(self, msg=None, **record):
        if self.master and msg:
            print(msg, flush=True)
        if self.master and record:
            with open(os.path.join(self.args.out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')

    @torch.no_grad()
    def evaluate(self):
        """Validation NLL (AR) or NELBO (diffusion) per token, over all ranks."""
        a = self.args
        model = self.ema if self.ema is not None else self.model
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=a.device)
        for i in range(a.eval_iters):
            x, u = self.batch('val', i, self.rank, self.world)
            torch.manual_seed(seed_for(a.seed, 'val-noise', i, self.rank))
            with self.autocast:
                nll, tokens = self.algo.eval_nll(model, x, u, a)
            total += torch.tensor([nll.double().sum().item(), nll.numel() * tokens], device=a.device)
        if self.ddp:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def train(self):
        a = self.args
        from tqdm import tqdm
        tokens_per_step = a.batch_size * a.block_size
        mfu_flops = 3 * mfu_flops_per_token(self.algo, self.cfg, a) * tokens_per_step
        peak = peak_flops(a.device, self.dtype) * self.world
        bar = tqdm(total=a.max_iters, initial=self.step, disable=None if self.master else True, unit='step')
        self.last_ckpt_step, tokens_per_s, mfu = self.step, 0.0, 0.0
        bound = '' if self.algo.EXACT else '<= '
        while True:
            if self.step % a.eval_interval == 0 or self.step == a.max_iters:
                val = self.evaluate()
                self.best_val = min(self.best_val, val)
                self.log(f'step {self.step}: val loss {val:.4f}, val ppl {bound}{math.exp(min(val, 50)):.2f}',
                         step=self.step, val_loss=val, val_ppl=math.exp(min(val, 50)),
                         tokens=self.step * tokens_per_step)
            if self.step == a.max_iters:
                break
            lr = get_lr(self.step, a)
            for group in self.opt.param_groups:
                group['lr'] = lr
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=a.device)
            for micro in range(self.accum):
                slice_id = micro * self.world + self.rank
                x, u = self.batch('train', self.step, slice_id, self.accum * self.world)
                torch.manual_seed(seed_for(a.seed, 'train-noise', self.step, slice_id))
                if self.ddp:  # sync gradients on the last micro-step only
                    self.model.require_backward_grad_sync = micro == self.accum - 1
                with self.autocast:
                    try:
                        loss = self.algo.train_loss(self.model, x, u, a, self.step, self.state)
                    except ValueError as e:  # a method refusing its options: one clear line
                        raise SystemExit(f'--algo {a.algo}: {e}') from None
                (loss / self.accum).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), a.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.raw.parameters()), 1 - a.ema)
            train_loss = loss_sum.item() / self.accum
            if not math.isfinite(train_loss):
                last = f'the last good checkpoint is {self.ckpt_path} (step {self.last_ckpt_step})' \
                    if os.path.exists(self.ckpt_path) else 'no checkpoint was written'
                raise SystemExit(f'non-finite loss at step {self.step}: stopping; {last}')
            self.step += 1
            dt = time.perf_counter() - t0
            tokens_per_s, mfu = tokens_per_step / dt, mfu_flops / dt / peak
            bar.update(1)
            bar.set_postfix(loss=f'{train_loss:.3f}', tok_s=f'{tokens_per_s:.0f}', mfu=percent(mfu))
            if self.step % a.log_interval == 0 or self.step == a.max_iters:
                if self.ddp:
                    mean = torch.tensor([loss_sum.item() / self.accum], device=a.device)
                    dist.all_reduce(mean)
                    train_loss = mean.item() / self.world
                self.log(None if bar.disable is False else f'step {self.step}: loss {train_loss:.4f}, '
                         f'lr {lr:.2e}, {tokens_per_s:.0f} tok/s, mfu {percent(mfu)}',
                         step=self.step, train_loss=train_loss, lr=lr, tokens=self.step * tokens_per_step,
                         tok_per_s=tokens_per_s, mfu=mfu if mfu <= 1 else None)
            if self.step % a.ckpt_interval == 0:
                self.save()
        bar.close()
        self.save()
        self.log(f'done: {self.step} steps, best val loss {self.best_val:.4f}; checkpoint {self.ckpt_path}')


def main(argv=None):
    args = parse_args(argv)
    trainer = Trainer(args)
    plan = trainer.plan(data.get_tokenizer(args.tokenizer).vocab_size)
    if args.dry_run:
        d = data.dataset_dir(args.dataset, args.tokenizer)  # epochs only if prepared: preparing can be slow
        n = data.num_tokens(d, 'train') if os.path.exists(os.path.join(d, 'meta.json')) else None
        plan['epochs'] = (args.max_iters * plan['global_batch_tokens'] / n if n else
                          'unknown (not prepared yet)')
        plan.update({k: getattr(args, k) for k in ('warmup_iters', *DEFAULTS, *DISTILL, 'decay')
                     if getattr(args, k, None) is not None})
        if trainer.master:
            for k, v in plan.items():
                print(f'{k:>32}: {v:.4g}' if isinstance(v, float) else f'{k:>32}: {v}')
        return
    check_out_dir(args)
    trainer.setup_data()
    plan['epochs'] = epochs = args.max_iters * plan['global_batch_tokens'] / trainer.n_tokens['train']
    if epochs > 4:
        trainer.log(f'note: this run reads the training split of {args.dataset} {epochs:.1f} times: '
                    f'pass a larger --dataset (e.g. openwebtext) for more tokens')
    torch.manual_seed(args.seed)  # same initial weights on every rank
    trainer.setup_model()
    if trainer.master:
        trainer.trim_log()
        if not trainer.resumed and os.path.exists(trainer.ckpt_path):
            os.remove(trainer.ckpt_path)  # --overwrite: start over
    trainer.log(' | '.join(f'{k} {v:.3g}' if isinstance(v, float) else f'{k} {v}' for k, v in plan.items()))
    trainer.train()
    if trainer.ddp:  # tear down while Python is alive: gloo's threads freeing a collective's tensors
        dist.barrier()  # during interpreter exit abort the rank (SIGABRT), e.g. rank 1, which saves nothing
        trainer.model = None
        gc.collect()  # DDP holds the process group in a ref cycle: free it, so destroying joins its threads
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
