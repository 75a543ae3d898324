"""A run's files: the checkpoint, the log and the out-dir, written so that no crash corrupts them.

A checkpoint is one dict of plain tensors and numbers (model, optimizer, ema, step, args, algo,
config, meta, best_val_loss), loaded with torch.load(weights_only=True), which runs no code. Every
file is written to a temporary name and renamed: a crash leaves the old file or the new one,
never half of one. train.py, sample.py, eval.py and scaling.py read checkpoints through here.
"""
import contextlib
import fcntl
import json
import os
import socket
import time

import torch

import convert
from data import no_room
from model import DiT, Config

KEYS = {'model', 'config', 'args', 'algo', 'step', 'meta'}


def load_checkpoint(path, algo=None):
    """A train.py checkpoint, or one line that says why not (a missing, truncated or foreign
    file; another method than `algo`). A released model (hf:NAME, a folder in its layout, a
    Lightning .ckpt) comes converted to the same shape by convert.py."""
    if convert.is_released(path):
        ckpt = convert.load(path)
    else:
        ckpt = read_checkpoint(path)
    if algo is not None and ckpt['algo'] != algo:
        raise SystemExit(f"'{path}' is a checkpoint of --algo {ckpt['algo']}, not {algo}: "
                         f"pass --algo {ckpt['algo']} or another checkpoint")
    return ckpt


def read_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at '{path}'")
    try:  # plain tensors only: runs no code
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, or not a torch file
        raise SystemExit(f"'{path}' is not a readable checkpoint ({type(e).__name__}): "
                         f"pass a ckpt.pt written by train.py") from None
    if not isinstance(ckpt, dict) or not KEYS <= set(ckpt):
        raise SystemExit(f"'{path}' holds no train.py checkpoint (for a released model: "
                         f"{convert.SOURCES}): pass a ckpt.pt written by train.py")
    return ckpt


def load_model(path, device):
    """The network of a checkpoint, in eval mode (its EMA weights when it has them), and the
    checkpoint."""
    ckpt = load_checkpoint(path)
    return model_from(ckpt, device), ckpt


def model_from(ckpt, device):
    """The network of a loaded checkpoint, in eval mode, its EMA weights when it has them."""
    model = DiT(Config(**ckpt['config']))
    model.load_state_dict(ckpt.get('ema') or ckpt['model'])
    return model.to(device).eval()


def tensor_bytes(obj):
    """The bytes of every tensor in a nest of dicts and lists (what torch.save writes, about)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@contextlib.contextmanager
def atomic(path):
    """A temporary name to write `path` through, renamed over it when the block ends: a crash
    leaves the old file or the new one, never half of one, and no temporary file behind (it is
    removed on any failure: a full disk, an error, a second signal)."""
    tmp = f'{path}.{os.getpid()}.tmp'  # unique per process
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone already after the rename
            os.remove(tmp)


def save_checkpoint(ckpt, path):
    """The checkpoint, atomically; a failed write (a full disk) is one line (no_room)."""
    try:
        with atomic(path) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:  # torch's writer reports ENOSPC as either
        raise SystemExit(no_room(path, e, tensor_bytes(ckpt)) + ' (--out-dir)') from None


def append_log(out_dir, record):
    path = os.path.join(out_dir, 'log.jsonl')
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        raise SystemExit(no_room(path, e)) from None


def trim_log(out_dir, step):
    """Keep the log rows written before `step`, the step a run starts from (0 for a new run),
    so that a resumed run logs as one; its evaluation at that step runs again."""
    path = os.path.join(out_dir, 'log.jsonl')
    with open(path, 'a+') as f:
        f.seek(0)  # a last line cut short by a kill has no newline
        rows = [json.loads(line) for line in f if line.endswith('\n')]
    rows = [r for r in rows
            if r.get('step', 0) < step or (r.get('step') == step and 'val_loss' not in r)]
    try:
        with atomic(path) as tmp, open(tmp, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
    except OSError as e:
        raise SystemExit(no_room(path, e)) from None


def check_out_dir(args):
    """Never replace a run by accident; refuse a folder that cannot be written, now."""
    if os.path.exists(os.path.join(args.out_dir, 'ckpt.pt')) and not (args.resume or
                                                                       args.overwrite):
        raise SystemExit(f'{args.out_dir} holds a run (ckpt.pt): pass --resume to continue it, '
                         f'--overwrite to start over, or another --out-dir')
    with contextlib.suppress(OSError):
        os.makedirs(args.out_dir, exist_ok=True)
    if not os.access(args.out_dir, os.W_OK) or not os.path.isdir(args.out_dir):
        raise SystemExit(f'cannot write to --out-dir {args.out_dir}: pass another --out-dir')


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir/.lock for as long as the returned file stays open: the OS
    releases it when the process ends, so even a SIGKILL leaves no stale lock. A second trainer
    in the same out-dir is refused in one line naming the first."""
    f = open(os.path.join(out_dir, '.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise SystemExit(f'{out_dir} is in use by another trainer ({holder}): wait for it to '
                         f'end or stop it, or pass another --out-dir') from None
    f.seek(0)
    f.truncate()
    started = time.strftime('%Y-%m-%d %H:%M:%S')
    f.write(f'pid {os.getpid()} on {socket.gethostname()}, started {started}\n')
    f.flush()
    return f
