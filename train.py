"""Train AR, MDLM, Duo or Eso-LM with one trainer.

    python train.py --algo mdlm --size 6M                  # CPU: shrunk defaults, ~10 min
    torchrun --standalone --nproc_per_node=8 train.py --algo mdlm --size 113M --flops 6e18
    python train.py --algo duo --size 19M --dry-run        # print the plan and exit

The method is a module (ar.py, mdlm.py, duo.py, esolm.py) with the same functions (the contract
in ar.py's docstring): this file never branches on it. The defaults are the seed's scaling
recipe on a GPU and a 10-minute run on a CPU; a method states its own (Duo's distillation).
"""
import argparse
import contextlib
import copy
import gc
import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from checkpoint import (append_log, check_out_dir, load_checkpoint, lock_out_dir, save_checkpoint,
                        trim_log)
from config import load_algo, parse_args, plan, print_plan
from model import DiT, get_config, peak_flops, percent

SAME_RUN = ('algo', 'size', 'dataset', 'data_config', 'tokenizer', 'block_size', 'batch_size',
            'seed')
PREEMPTED = 75  # the exit code after a stop signal's checkpoint (EX_TEMPFAIL: run it again)


# ---- the run's state, built in one place -----------------------------------------------------

@dataclass
class Run:
    args: argparse.Namespace
    algo: object               # the method's module
    cfg: object                # model.Config
    rank: int
    ddp: bool
    data_dir: str
    meta: dict                 # the dataset's meta.json
    n_tokens: dict             # tokens per split
    raw: torch.nn.Module       # the DiT itself
    model: torch.nn.Module     # what the losses call: compiled and/or DDP-wrapped
    ema: torch.nn.Module       # or None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16 only: loss scaling (enabled=False is a no-op)
    autocast: object
    step: int = 0
    best_val: float = float('inf')
    last_ckpt: int = 0         # the step of the last checkpoint written
    resumed: bool = False
    state: dict = field(default_factory=dict)   # what a method keeps (Duo's teacher)

    @property
    def master(self):
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.args.out_dir, 'ckpt.pt')


def make_optimizer(model, args):
    """AdamW, with weight decay on every parameter (the seed's), or only on matrices."""
    decayed = [p for p in model.parameters() if args.decay == 'all' or p.dim() >= 2]
    ids = {id(p) for p in decayed}
    free = [p for p in model.parameters() if id(p) not in ids]
    groups = [{'params': decayed, 'weight_decay': args.weight_decay},
              {'params': free, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8,
                             fused=args.device.startswith('cuda'))


def compile_model(model):
    # keep select= (the masked positions MDLM computes logits at) inside one graph
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model)


def setup(args):
    """Processes, data, network, optimizer, and the checkpoint to start from."""
    ddp = 'RANK' in os.environ
    rank = 0
    if ddp:
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
        rank = dist.get_rank()
        if args.device.startswith('cuda'):
            torch.cuda.set_device(args.device)
    if rank == 0:
        data.prepare(args.dataset, args.tokenizer, config=args.data_config)
    if ddp:
        dist.barrier()
    data_dir = data.dataset_dir(args.dataset, args.tokenizer, args.data_config)
    n_tokens = {split: data.num_tokens(data_dir, split) for split in ('train', 'val')}
    for split, n in n_tokens.items():
        if n <= args.block_size:
            raise SystemExit(f'the {split} split of {args.dataset} has fewer tokens than '
                             f'--block-size {args.block_size}: lower it or use more data')
    algo = load_algo(args.algo)
    cfg = get_config(args.size, algo.vocab_size(args.vocab_size), dropout=args.dropout)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw = DiT(cfg).to(args.device)
    ema = copy.deepcopy(raw).requires_grad_(False) if args.ema else None
    dtype = getattr(torch, args.dtype)
    autocast = contextlib.nullcontext()
    if dtype != torch.float32:
        autocast = torch.autocast(torch.device(args.device).type, dtype=dtype)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=dtype == torch.float16)
    run = Run(args, algo, cfg, rank, ddp, data_dir, data.load_meta(data_dir), n_tokens, raw,
              raw, ema, make_optimizer(raw, args), scaler, autocast)
    load(run)
    if args.compile:
        run.model = compile_model(raw)
    if ddp:  # compile first, then wrap (as nanoGPT)
        ids = [torch.device(args.device).index] if args.device.startswith('cuda') else None
        run.model = DDP(run.model, device_ids=ids)
    return run


# ---- checkpoints and the log (checkpoint.py writes the files) --------------------------------

def load(run):
    """Resume the run in out_dir (--resume), or start from a checkpoint's weights (--init-from:
    a fresh optimizer and schedule; the EMA weights when it has them)."""
    a = run.args
    if a.resume == 'yes' or (a.resume == 'auto' and os.path.exists(run.ckpt_path)):
        ckpt = load_checkpoint(run.ckpt_path, a.algo)
        differ = [k for k in SAME_RUN if ckpt['args'].get(k) != getattr(a, k)]
        if a.resume == 'auto' and differ:
            raise SystemExit(f"{run.ckpt_path} holds another run (differs in "
                             f"{', '.join(differ)}): use another --out-dir")
        run.raw.load_state_dict(ckpt['model'])
        try:
            run.opt.load_state_dict(ckpt['optimizer'])
        except ValueError:  # other parameter groups
            raise SystemExit(f"pass --decay {ckpt['args']['decay']} to resume this run") from None
        if run.ema is not None and ckpt['ema'] is not None:
            run.ema.load_state_dict(ckpt['ema'])
        if ckpt.get('scaler'):
            run.scaler.load_state_dict(ckpt['scaler'])
        run.step = ckpt['step']
        run.last_ckpt = ckpt['step']
        run.best_val = ckpt['best_val_loss']
        run.resumed = True
        log(run, f'resumed from {run.ckpt_path} at step {run.step}')
    elif a.init_from:
        ckpt = load_checkpoint(a.init_from, a.algo)
        if ckpt['config'] != asdict(run.cfg):
            raise SystemExit(f"{a.init_from} has another network ({ckpt['config']}): pass its "
                             f"--size and --tokenizer")
        run.raw.load_state_dict(ckpt['ema'] if ckpt['ema'] else ckpt['model'])
        if run.ema is not None:
            run.ema.load_state_dict(run.raw.state_dict())
        log(run, f'initialised from {a.init_from} (step {ckpt["step"]})')


def save(run):
    if run.master:
        ckpt = {'model': run.raw.state_dict(), 'optimizer': run.opt.state_dict(),
                'ema': None if run.ema is None else run.ema.state_dict(), 'step': run.step,
                'scaler': run.scaler.state_dict(),
                'args': vars(run.args), 'algo': run.args.algo, 'config': asdict(run.cfg),
                'meta': run.meta, 'best_val_loss': run.best_val}
        save_checkpoint(ckpt, run.ckpt_path)
    run.last_ckpt = run.step


def log(run, msg=None, **record):
    if run.master and msg:
        print(msg, flush=True)
    if run.master and record:
        append_log(run.args.out_dir, record)


# ---- the pieces of the loop ------------------------------------------------------------------

def seed_for(*keys):
    """A 63-bit seed from any keys: randomness is a function of (seed, step, slice), so
    resuming, or splitting a batch over ranks or micro-steps, changes nothing."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


def get_lr(step, args):
    """Linear warmup, then cosine from lr to min_lr."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def get_batch(run, split, key, slice_id, n_slices):
    """Rows [slice_id] of a global batch drawn from seed (key): tokens and the antithetic
    uniforms u_i = (u + i) / n over the whole batch, MATH (4)."""
    a = run.args
    n = a.micro_batch_size * n_slices
    g = torch.Generator().manual_seed(seed_for(a.seed, split, key))
    starts = torch.randint(run.n_tokens[split] - a.block_size, (n,), generator=g)
    u = (torch.rand(1, generator=g) + torch.arange(n)) / n
    rows = slice(slice_id * a.micro_batch_size, (slice_id + 1) * a.micro_batch_size)
    x = data.get_batch(run.data_dir, split, starts[rows], a.block_size, a.device,
                       run.meta['dtype'])
    cut = torch.rand(1, generator=g).item() < a.ssl_ratio
    if split == 'train' and run.algo.VARIABLE_LENGTH and cut:  # a random length
        x = x[:, :int(torch.randint(2, a.block_size + 1, (1,), generator=g))]
    return x, u[rows].to(a.device)


def train_step(run, lr):
    """One optimizer step over the global batch at learning rate lr: this rank's micro-steps,
    forward and backward, then clip, update, EMA. Returns this rank's mean loss."""
    a = run.args
    for group in run.opt.param_groups:
        group['lr'] = lr
    total = torch.zeros((), device=a.device)
    for micro in range(a.grad_accum):
        slice_id = micro * a.world_size + run.rank
        x, u = get_batch(run, 'train', run.step, slice_id, a.grad_accum * a.world_size)
        torch.manual_seed(seed_for(a.seed, 'train-noise', run.step, slice_id))
        if run.ddp:  # sync the gradients on the last micro-step only
            run.model.require_backward_grad_sync = micro == a.grad_accum - 1
        with run.autocast:
            loss = run.algo.train_loss(run.model, x, u, a, run.step, run.state)
        run.scaler.scale(loss / a.grad_accum).backward()
        total += loss.detach()
    run.scaler.unscale_(run.opt)
    torch.nn.utils.clip_grad_norm_(run.raw.parameters(), a.grad_clip)
    run.scaler.step(run.opt)  # skipped by float16's scaler when a gradient is not finite
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    if run.ema is not None:  # ema <- ema + (1 - decay) (w - ema)
        ema = list(run.ema.parameters())
        torch._foreach_lerp_(ema, list(run.raw.parameters()), 1 - a.ema)
    return total.item() / a.grad_accum


@torch.no_grad()
def evaluate(run):
    """Validation NLL (AR) or NELBO (diffusion) per token, over all ranks."""
    a = run.args
    model = run.ema if run.ema is not None else run.model
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=a.device)
    for i in range(a.eval_iters):
        x, u = get_batch(run, 'val', i, run.rank, a.world_size)
        torch.manual_seed(seed_for(a.seed, 'val-noise', i, run.rank))
        with run.autocast:
            nll, tokens = run.algo.eval_nll(model, x, u, a)
        total += torch.tensor([nll.double().sum().item(), nll.numel() * tokens], device=a.device)
    if run.ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# ---- preemption: SIGTERM and SIGUSR1 save the step --------------------------------------------

signals = []  # the stop signals received so far


def on_signal(signum, frame):
    """The first SIGTERM / SIGUSR1 asks the loop to save after this step and exit; a second
    one stops at once."""
    if signals:
        raise SystemExit(f'{signal.Signals(signum).name} again: stopping now, without saving')
    signals.append(signum)


def stop_requested(run):
    """Whether a stop signal arrived, agreed by all ranks, so that they stop at one step."""
    if not run.ddp:
        return bool(signals)
    stop = torch.tensor([float(bool(signals))], device=run.args.device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return stop.item() > 0


# ---- the loop --------------------------------------------------------------------------------

def train(run):
    """The loop, from run.step to args.max_iters; returns True if a stop signal ended it."""
    from tqdm import tqdm
    a = run.args
    tokens_per_step = a.batch_size * a.block_size
    flops_per_step = 3 * run.algo.mfu_flops(run.cfg, a) * tokens_per_step     # MATH (38)
    peak = peak_flops(a.device, getattr(torch, a.dtype)) * a.world_size
    bar = tqdm(total=a.max_iters, initial=run.step, disable=None if run.master else True,
               unit='step')
    bound = '' if run.algo.EXACT else '<= '
    while True:
        # 1. validate every eval_interval steps and at the end
        if run.step % a.eval_interval == 0 or run.step == a.max_iters:
            val = evaluate(run)
            run.best_val = min(run.best_val, val)
            ppl = math.exp(min(val, 50))
            log(run, f'step {run.step}: val loss {val:.4f}, val ppl {bound}{ppl:.2f}',
                step=run.step, val_loss=val, val_ppl=ppl, tokens=run.step * tokens_per_step)
        if run.step == a.max_iters:
            break
        # 2. one optimizer step over the global batch
        lr = get_lr(run.step, a)
        t0 = time.perf_counter()
        try:
            loss = train_step(run, lr)
        except ValueError as e:  # a method refusing its options: one clear line
            raise SystemExit(f'--algo {a.algo}: {e}') from None
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            last = 'no checkpoint was written'
            if os.path.exists(run.ckpt_path):
                last = f'the last good checkpoint is {run.ckpt_path} (step {run.last_ckpt})'
            raise SystemExit(f'non-finite loss at step {run.step}: stopping; {last}')
        run.step += 1
        # 3. log and checkpoint
        mfu = flops_per_step / dt / peak
        bar.update(1)
        bar.set_postfix(loss=f'{loss:.3f}', tok_s=f'{tokens_per_step / dt:.0f}', mfu=percent(mfu))
        if run.step % a.log_interval == 0 or run.step == a.max_iters:
            if run.ddp:  # the mean over the ranks
                mean = torch.tensor([loss], device=a.device)
                dist.all_reduce(mean)
                loss = mean.item() / a.world_size
            msg = None
            if bar.disable is not False:  # no progress bar: a line instead
                msg = (f'step {run.step}: loss {loss:.4f}, lr {lr:.2e}, '
                       f'{tokens_per_step / dt:.0f} tok/s, mfu {percent(mfu)}')
            log(run, msg, step=run.step, train_loss=loss, lr=lr,
                tokens=run.step * tokens_per_step, tok_per_s=tokens_per_step / dt,
                mfu=mfu if mfu <= 1 else None)
        if run.step % a.ckpt_interval == 0:
            save(run)
        if stop_requested(run):  # preempted: save this step and stop
            break
    bar.close()
    save(run)
    if run.step < a.max_iters:
        log(run, f'stop signal at step {run.step}: checkpoint {run.ckpt_path} written; run the '
                 f'same command with --resume auto to continue')
        return True
    log(run, f'done: {run.step} steps, best val loss {run.best_val:.4f}; '
             f'checkpoint {run.ckpt_path}')
    return False


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print_plan(args)
        return
    check_out_dir(args)
    lock = None
    if int(os.environ.get('RANK', 0)) == 0:  # one trainer per out-dir; rank 0 holds the lock
        lock = lock_out_dir(args.out_dir)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    signals.clear()
    try:
        run = setup(args)
        info = plan(args)
        info['epochs'] = args.max_iters * info['global_batch_tokens'] / run.n_tokens['train']
        if info['epochs'] > 4:
            log(run, f"note: this run reads the training split of {args.dataset} "
                     f"{info['epochs']:.1f} times: pass a larger --dataset for more tokens")
        if run.master:
            trim_log(args.out_dir, run.step)
            if not run.resumed and os.path.exists(run.ckpt_path):
                os.remove(run.ckpt_path)  # --overwrite: start over
        log(run, ' | '.join(f'{k} {v:.3g}' if isinstance(v, float) else f'{k} {v}'
                            for k, v in info.items()))
        preempted = train(run)  # True: a stop signal's checkpoint was written
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock is not None:
            lock.close()
    if run.ddp:  # tear down while Python is alive: gloo's threads freeing a collective's
        dist.barrier()  # tensors during interpreter exit abort the rank (SIGABRT)
        run.model = None
        gc.collect()  # DDP holds the process group in a reference cycle: free it first
        dist.destroy_process_group()
    if preempted:
        raise SystemExit(PREEMPTED)


if __name__ == '__main__':
    main(sys.argv[1:])
