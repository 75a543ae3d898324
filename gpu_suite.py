"""The GPU suite: every GPU claim of the project measured by one command, into DIR/suite.json and
DIR/suite.md (markdown tables for BENCHMARKS.md, the card's name in the heading).

    python gpu_suite.py --out out/suite                  # one GPU, at most --budget-s (8 minutes)
    python gpu_suite.py --out out/suite --parts a,d      # some parts only (they share the budget)
    python gpu_suite.py --out /tmp/suite --dry-run       # every part at toy size on the CPU

(a) training tokens/s and MFU at 113M, GPT-2 vocabulary, block 1024, batch 16, bfloat16,
    torch.compile, the fused and the plain output layer + loss, for AR, MDLM, Duo, Eso-LM
    alpha_0 = 1 and alpha_0 = 0.25 (batch split 0.5);
(b) the attention kernel of each attention mode (the profiler's kernel names), and each SDPA
    backend forced on the same call: which run it, in how many ms (and flex_attention beside a
    boolean mask);
(c) the peak memory of one training step (eager; part (a) adds the compiled peak);
(d) sampling at L = 2048, batch 1 and 16: AR and Eso-LM with their KV cache, MDLM cached, Duo at
    8 steps;
(e) torchrun --standalone --nproc_per_node=1 train.py with NCCL: a few steps, then --resume.

Each part runs in its own process under its own timeout, its share of the time left (SHARES), so
the suite never runs past --budget-s. A part saves its figures after each entry: a crash, a hang
or an out-of-memory keeps what it measured, and the other parts still run. suite.json records each
part's status (ok; failed, with its last error line; timeout) and DIR/part_<x>.log its output.
The figures are reported against the project's targets, never asserted. Measurements reuse
bench.py (setup, train_seconds, throughput, peak_memory, sample_once).
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torch.profiler import ProfilerActivity, profile

import bench
import data
import fused
from checkpoint import atomic
from model import KVCache, peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))
# Each part's share of the time left when it starts (a part that ends early leaves its time to the
# next ones); of 480 s: (a) ~200 s, 10 torch.compile runs of the 113M network (~15-20 s each) and
# 10 x 2 x 5 steps of ~0.1 s; (b) ~65 s, 8 eager steps and ~60 small attention calls, with
# flex_attention compiled once or twice (~20 s each); (c) ~35 s, 10 eager steps (flex_attention
# again, from the compile cache); (d) ~125 s, ~5,400 network calls at each batch size, ~5-10 ms
# each eager; (e) ~45 s, two torchrun launches of a tiny model. Estimates until a GPU measures
# them: a part out of time keeps what it measured; rerun it alone (--parts) or with more time.
SHARES = dict(a=0.42, b=0.14, c=0.07, d=0.27, e=0.10)
GRACE_S = 10  # kept back from the budget: a part out of time gets SIGTERM, this long, SIGKILL
REAL = dict(device='cuda', size='113M', tokenizer='gpt2', block_size=1024, batch_size=16,
            dtype='bfloat16', compile=True, iters=5, sample_length=2048, attention_batch=2)
DRY = dict(device='cpu', size='tiny', tokenizer='byte', block_size=32, batch_size=4,
           dtype='float32', compile=False, iters=2, sample_length=32, attention_batch=2)
SAMPLE_BATCHES = (1, 16)
METHODS = [('AR', 'ar'), ('MDLM', 'mdlm'), ('Duo', 'duo'), ('Eso-LM alpha_0 = 1', 'esolm'),
           ('Eso-LM alpha_0 = 0.25, split 0.5', 'esolm:alpha0=0.25,batch_split=0.5')]
SEQUENTIAL = 'esolm:alpha0=0,batch_split=0'  # Eso-LM's sequential loss alone: the 2L mask
MODES = [  # (attention mode, bench entry, what runs)
    ('AR: causal', 'ar', 'train'),
    ('MDLM: bidirectional', 'mdlm', 'train'),
    ('Duo: bidirectional', 'duo', 'train'),
    ('Eso-LM diffusion: is_causal on the sorted order', 'esolm', 'train'),
    ('Eso-LM sequential: the 2L mask, fused path', SEQUENTIAL, 'train'),
    ('Eso-LM sequential: the 2L mask, plain path', SEQUENTIAL + ',fused=False', 'train'),
    ('KV-cache decode: 16 new queries (Eso-LM steps)', 'esolm', 16),
    ('KV-cache decode: 1 new query (AR steps)', 'ar', 1),
]
BACKENDS = {'flash': SDPBackend.FLASH_ATTENTION, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
            'cudnn': SDPBackend.CUDNN_ATTENTION, 'math': SDPBackend.MATH}
# a substring of a profiler event's name (lower case, no '_') -> the attention kernel it names
KERNELS = [('flashattentionforcpu', 'cpu flash'), ('flex', 'flex'), ('tritontem', 'flex'),
           ('flash', 'flash'), ('efficientattention', 'efficient'), ('fmha', 'efficient'),
           ('cudnn', 'cudnn'), ('attentionmath', 'math')]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help="folder for suite.json, suite.md, each part's log")
    p.add_argument('--dry-run', action='store_true',
                   help='every part at toy size on the CPU (what the tests run)')
    p.add_argument('--parts', default='a,b,c,d,e', help='which parts (default: a,b,c,d,e)')
    p.add_argument('--budget-s', type=float, default=480,
                   help='seconds for the whole suite, %d s of it kept for stopping a part out of '
                        'time; each part gets its share of the time left (default: 480)' % GRACE_S)
    p.add_argument('--part', help=argparse.SUPPRESS)  # set in a part's own process
    return p


def check_args(args):
    parts = [x.strip() for x in args.parts.split(',') if x.strip()]
    if not parts or any(x not in SHARES for x in parts) or len(set(parts)) < len(parts):
        raise SystemExit(f"--parts '{args.parts}': give some of a,b,c,d,e, e.g. --parts a,d")
    if not args.budget_s > 0:
        raise SystemExit(f'--budget-s must be > 0, got {args.budget_s}')
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('no CUDA device here: the GPU suite needs one; --dry-run runs every part '
                         'at toy size on the CPU')
    return parts


def write_json(path, obj):  # a temporary name, then renamed: never half a file
    with atomic(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)


def write_text(path, text):
    with atomic(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


# ---- the parent: one process per part ------------------------------------------------------

def part_command(name, args):
    cmd = [sys.executable, os.path.join(HERE, 'gpu_suite.py'), '--out', args.out, '--part', name]
    return cmd + (['--dry-run'] if args.dry_run else [])


def last_error(log, rc):
    if rc < 0:
        return f'killed by {signal.Signals(-rc).name}' + (' (out of memory?)' if rc == -9 else '')
    with open(log, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else f'exit code {rc}'


def launch(name, args, timeout):
    """Run part `name` in its own process group for at most `timeout` seconds: its status, time,
    error line, and the figures it saved (all of them, or those it had when it stopped)."""
    result = os.path.join(args.out, f'part_{name}.json')
    log = os.path.join(args.out, f'part_{name}.log')
    with contextlib.suppress(FileNotFoundError):
        os.remove(result)
    t0 = time.perf_counter()
    with open(log, 'w') as f:
        p = subprocess.Popen(part_command(name, args), cwd=HERE, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(p.pid, signal.SIGTERM)  # torchrun passes it on to its workers
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=GRACE_S)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the part's group
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    entry = dict(status='ok' if rc == 0 else 'timeout' if rc is None else 'failed',
                 seconds=time.perf_counter() - t0, timeout_s=timeout, log=os.path.basename(log))
    if rc not in (0, None):
        entry['error'] = last_error(log, rc)
    if os.path.exists(result):
        with open(result) as f:
            entry.update(json.load(f))
    return entry


def git_commit():
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=HERE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ('+changes' if dirty.stdout.strip() else '') or None


def cpu_name():
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown CPU'


def machine(cfg):
    m = dict(torch=torch.__version__, python=platform.python_version(), commit=git_commit(),
             date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
             dtype=cfg['dtype'], gpu=None)
    if cfg['device'] == 'cuda':
        props = torch.cuda.get_device_properties(0)
        m.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                 capability=f'{props.major}.{props.minor}', gpus=torch.cuda.device_count(),
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        m.update(cpu=cpu_name(), cores=os.cpu_count())
    return m


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.out = os.path.abspath(args.out)
    if args.part:
        return run_part(args)
    parts = check_args(args)
    cfg = DRY if args.dry_run else REAL
    os.makedirs(args.out, exist_ok=True)
    suite = dict(machine=machine(cfg), config=cfg, dry_run=args.dry_run, budget_s=args.budget_s,
                 parts={})
    start = time.perf_counter()
    for i, name in enumerate(parts):
        left = args.budget_s - GRACE_S - (time.perf_counter() - start)
        timeout = max(1.0, left * SHARES[name] / sum(SHARES[p] for p in parts[i:]))
        part = suite['parts'][name] = launch(name, args, timeout)
        suite['wall_s'] = time.perf_counter() - start
        write_json(os.path.join(args.out, 'suite.json'), suite)  # after every part
        try:
            text = markdown(suite)
        except Exception as e:  # a figure the tables did not expect: suite.json still holds it
            text = f'suite.md: {one_line(e)}; the figures are in suite.json\n'
        write_text(os.path.join(args.out, 'suite.md'), text)
        print(f"part {name}: {part['status']} in {part['seconds']:.0f} s (timeout {timeout:.0f} s)"
              + (f": {part['error']}" if 'error' in part else ''), flush=True)
    print(f"{os.path.join(args.out, 'suite.md')}: {suite['wall_s']:.0f} s in all")
    return suite


# ---- in a part's own process -------------------------------------------------------------

def run_part(args):
    cfg = DRY if args.dry_run else REAL
    if args.dry_run:
        torch.set_num_threads(1)  # toy sizes gain nothing from threads on a shared machine
    figures = {}

    def save(**kw):
        figures.update(kw)
        write_json(os.path.join(args.out, f'part_{args.part}.json'), figures)
    PARTS[args.part](cfg, args.out, save)


def one_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def free_memory():  # what the last entry left in reference cycles, before the next one
    if torch.cuda.is_available():
        gc.collect()  # ~0.2 s: not worth it on a CPU
        torch.cuda.empty_cache()


def each(entries, measure, save):
    """rows: each entry (a dict) with measure(**entry) (a dict, or a list of them), saved after
    each; an entry that raises (out of memory, a refusal) gets its error line and the others
    still run, then the part fails naming it."""
    rows = []
    for entry in entries:
        try:
            out = measure(**entry)
        except Exception as e:
            traceback.print_exc()
            out = dict(error=one_line(e))
        rows += [{**entry, **row} for row in (out if isinstance(out, list) else [out])]
        save(rows=rows)
        free_memory()
    failed = [r for r in rows if 'error' in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(rows)} entries failed; the first "
                         f"({failed[0]['label']}): {failed[0]['error']}")


def bench_args(cfg):
    """bench.py's args for the suite's sizes, every other flag at its default."""
    argv = ['--size', cfg['size'], '--tokenizer', cfg['tokenizer'], '--block-size',
            str(cfg['block_size']), '--batch-size', str(cfg['batch_size']), '--iters',
            str(cfg['iters']), '--dtype', cfg['dtype'], '--device', cfg['device'],
            '--sample-length', str(cfg['sample_length'])]
    args = bench.get_parser().parse_args(argv + (['--compile'] if cfg['compile'] else []))
    bench.check_args(args)
    args.vocab_size = data.get_tokenizer(args.tokenizer).vocab_size
    args.steps = args.sample_length
    return args


def training_entries():
    """Each method with the fused and the plain output layer + loss, fused first."""
    return [dict(label=label, path=path, spec=spec if path == 'fused' else
                 spec + (',' if ':' in spec else ':') + 'fused=False')
            for path in ('fused', 'plain') for label, spec in METHODS]


def part_train(cfg, out, save):
    """(a) A training step (forward, backward, AdamW) compiled as train.py compiles it: the
    median of --iters steps after as many warm-up steps (the compile); tokens/s and MFU."""
    args = bench_args(cfg)
    cuda = args.device == 'cuda'
    peak = peak_flops(args.device, getattr(torch, args.dtype))
    save(peak_flops=peak)

    def measure(label, path, spec):
        torch._dynamo.reset()  # a fresh compile: past 8 recompiles dynamo would run eager
        r = bench.setup(spec, args)
        warmup, _ = bench.timed(lambda: bench.train_seconds(r, args), args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = bench.train_seconds(r, args)
        row = dict(step_s=seconds, warmup_s=warmup, **bench.throughput(r, args, seconds, peak))
        if cuda:
            row['peak_mib_compiled'] = torch.cuda.max_memory_allocated() / 2 ** 20
        return row
    each(training_entries(), measure, save)


def part_memory(cfg, out, save):
    """(c) The peak memory of one eager training step (bench.py --mem: torch.cuda's peak, or on
    a CPU the peak resident set with freed blocks returned at once)."""
    args = bench_args(cfg)
    args.compile = False

    def measure(label, path, spec):
        mem = bench.peak_memory(spec, args)
        before = mem['mem_before_step'] / 2 ** 20
        peak = mem['peak_mem_step'] / 2 ** 20
        return dict(before_mib=before, peak_mib=peak, step_mib=peak - before)
    each(training_entries(), measure, save)


# ---- (b) attention backends ------------------------------------------------------------------

@contextlib.contextmanager
def first_attention_call():
    """The network's first attention call in this block (its layer 0): the function (sdpa or
    flex), q, k, v, the mask and is_causal. model.py looks both functions up at each call."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    flex = fused.flex

    def spy_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if not calls:
            calls.append(dict(fn='sdpa', q=q.detach(), k=k.detach(), v=v.detach(), mask=attn_mask,
                              causal=is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    def spy_flex(q, k, v, mask):
        if not calls:
            calls.append(dict(fn='flex', q=q.detach(), k=k.detach(), v=v.detach(), mask=mask,
                              causal=False))
        return flex(q, k, v, mask)
    F.scaled_dot_product_attention = spy_sdpa
    fused.flex = spy_flex
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa
        fused.flex = flex


def describe(call):
    from torch.nn.attention.bias import CausalBias  # here: importing it costs a second
    mask = call['mask']
    if call['fn'] == 'flex':
        return 'flex_attention, BlockMask'
    if mask is None:
        return 'sdpa, is_causal' if call['causal'] else 'sdpa, no mask'
    if isinstance(mask, CausalBias):
        return 'sdpa, lower-right causal bias'
    return 'sdpa, boolean mask'


def dense_mask(call):
    """The call's mask as a boolean tensor (True = may attend), or None."""
    from torch.nn.attention.bias import CausalBias
    mask = call['mask']
    if isinstance(mask, BlockMask):
        return create_mask(mask.mask_mod, None, None, *mask.seq_lengths, call['q'].device)[0, 0]
    if isinstance(mask, CausalBias):  # query i of Lq is key Lk - Lq + i
        ones = torch.ones(mask.seq_len_q, mask.seq_len_kv, dtype=torch.bool,
                          device=call['q'].device)
        return ones.tril(mask.seq_len_kv - mask.seq_len_q)
    return mask


def kernels_seen(prof):
    """The attention kernels a profile ran, by the names of its events and GPU kernels."""
    names = set()
    for e in prof.events():
        names.add(e.name)
        names.update(k.name for k in e.kernels)
    seen = set()
    matched = set()
    for name in names:
        for key, kernel in KERNELS:
            if key in name.lower().replace('_', ''):
                seen.add(kernel)
                matched.add(name[:100])
                break
    return sorted(seen), sorted(matched)[:8]


def milliseconds(attend, q, k, v, grad, device, reps=3):
    """ms of attend(q, k, v) (with its backward when grad): the median of reps after a warm-up,
    or 'no: why' where it raises (a backend refusing a call gives its reasons as warnings)."""
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))

    def once():
        out = attend(q, k, v)
        if grad:
            out.sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            once()
            seconds = [bench.timed(once, device)[0] for _ in range(reps)]
        except (RuntimeError, ValueError) as e:
            why = [str(w.message).strip().splitlines()[0] for w in caught] or [one_line(e)]
            return 'no: ' + '; '.join(dict.fromkeys(why))[:200]
    return 1000 * statistics.median(seconds)


def attention_step(r, new):
    """What part (b) profiles: a training step (new = 'train'), or one KV-cache decoding call of
    `new` queries after a cached prefix."""
    if new == 'train':
        return lambda: bench.train_step(r)
    model = r['model'].eval()
    x = r['x']
    cache = KVCache(x.shape[1])
    with r['autocast'], torch.no_grad():
        model(x[:, :-new], cache=cache)

    def decode():
        cache.truncate(x.shape[1] - new)
        with r['autocast'], torch.no_grad():
            model(x[:, -new:], cache=cache)
    return decode


def part_attention(cfg, out, save):
    """(b) Each attention mode as a method runs it (eager): the profiler's attention kernels;
    then layer 0's call again, as run and with each SDPA backend forced on its mask as a boolean
    tensor (and flex_attention for a training mode's 2-D mask), in ms."""
    args = bench_args(cfg)
    args.compile = False
    args.batch_size = cfg['attention_batch']
    device = args.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])

    def measure(label, spec, new):
        r = bench.setup(spec, args)
        step = attention_step(r, new)
        step()  # warm-up (flex_attention compiles here)
        with first_attention_call() as calls, profile(activities=activities) as prof:
            bench.timed(step, device)
        call = calls[0]
        q, k, v = call['q'], call['k'], call['v']
        grad = new == 'train'
        kernels, names = kernels_seen(prof)
        row = dict(calls=describe(call), kernels=kernels, kernel_names=names,
                   shape=list(q.shape), keys=k.shape[2], backward=grad, forced={})

        def as_run(q, k, v):
            if call['fn'] == 'flex':
                return fused.flex(q, k, v, call['mask'])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=call['mask'],
                                                  is_causal=call['causal'])
        flex_grad = device == 'cuda'  # flex_attention has no backward on a CPU
        row['as_run_ms'] = milliseconds(as_run, q, k, v, grad and (call['fn'] == 'sdpa' or
                                                                    flex_grad), device)
        mask = dense_mask(call)
        for name, backend in BACKENDS.items():
            def forced(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                          is_causal=call['causal'])
            row['forced'][name] = milliseconds(forced, q, k, v, grad, device)
        if grad and call['fn'] == 'sdpa' and mask is not None and mask.dim() == 2:
            block_mask = fused.as_block_mask(mask)
            row['forced']['flex'] = milliseconds(lambda q, k, v: fused.flex(q, k, v, block_mask),
                                                 q, k, v, flex_grad, device)
        return row
    each([dict(label=label, spec=spec, new=new) for label, spec, new in MODES], measure, save)


# ---- (d) sampling, (e) torchrun ------------------------------------------------------------

def samplers(L):
    return [('AR, KV cache', 'ar'), ('MDLM, cached, T = L', 'mdlm'),
            ('Eso-LM, KV cache, alpha_0 = 1, T = 16 L', f'esolm:steps={16 * L}'),
            ('Duo, 8 steps', 'duo:steps=8')]


def part_sampling(cfg, out, save):
    """(d) Seconds and NFE of sampling L tokens (a start token, then L - 1 new ones) in one
    window, after a short warm-up (bench.sample_once); batch 1 for every sampler first, so that a
    part out of time still compares them."""
    args = bench_args(cfg)
    args.compile = False  # the samplers call the network eagerly
    L = args.sample_length

    def measure(label, spec, batch):
        r = bench.setup(spec, args)
        r['args'].num_samples = batch
        r['args'].sample_length = min(L, 16)
        bench.sample_once(r, cache=True)  # warm-up
        r['args'].sample_length = L
        seconds, nfe = bench.sample_once(r, cache=True)
        return dict(length=L, nfe=nfe, seconds=seconds, tok_per_s=batch * (L - 1) / seconds)
    each([dict(label=label, spec=spec, batch=n) for n in SAMPLE_BATCHES
          for label, spec in samplers(L)], measure, save)


def part_torchrun(cfg, out, save):
    """(e) train.py under torchrun on one device (NCCL on a GPU, gloo on a CPU): 3 steps with a
    checkpoint, then --resume to step 6; the resumed run must continue at step 3."""
    cuda = cfg['device'] == 'cuda'
    run_dir = os.path.join(out, 'torchrun_smoke')
    flags = ['train.py', '--algo', 'mdlm', '--size', 'tiny', '--tokenizer', 'byte',
             '--block-size', '64', '--batch-size', '8', '--eval-interval', '1000',
             '--eval-iters', '1', '--log-interval', '1', '--ckpt-interval', '3', '--no-compile',
             '--device', cfg['device'], '--dtype', cfg['dtype'], '--out-dir', run_dir]
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node=1']
    env = {**os.environ, 'NCCL_DEBUG': 'INFO'}
    if not cuda:
        env['OMP_NUM_THREADS'] = '1'  # a toy model: a second thread only waits on a busy CPU
    output = ''
    for what, extra in (('first run', ['--max-iters', '3', '--overwrite']),
                        ('resumed run', ['--max-iters', '6', '--resume'])):
        p = subprocess.run(torchrun + flags + extra, cwd=HERE, env=env, capture_output=True,
                           text=True)
        print(p.stdout + p.stderr, flush=True)
        if p.returncode:
            lines = (p.stdout + p.stderr).strip().splitlines() or ['no output']
            raise SystemExit(f'torchrun, {what}: exit code {p.returncode}: {lines[-1][:200]}')
        output += p.stdout + p.stderr
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        logged = sorted(r['step'] for r in map(json.loads, f) if 'train_loss' in r)
    resumed = re.search(r'resumed from \S+ at step (\d+)', output)
    final = torch.load(os.path.join(run_dir, 'ckpt.pt'), weights_only=True)['step']
    figures = dict(command=' '.join(['torchrun', *torchrun[3:], *flags]),
                   backend='nccl' if cuda else 'gloo', nccl_in_log='NCCL INFO' in output,
                   resumed_at=int(resumed.group(1)) if resumed else None, final_step=final,
                   logged_steps=logged)
    save(**figures)
    if figures['resumed_at'] != 3 or final != 6 or logged != list(range(1, 7)):
        raise SystemExit(f'the resumed run did not continue at step 3 to step 6: resumed at '
                         f"{figures['resumed_at']}, final step {final}, logged steps {logged}")
    if cuda and not figures['nccl_in_log']:
        raise SystemExit('no NCCL in the log of a CUDA run (NCCL_DEBUG=INFO was set)')


PARTS = dict(a=part_train, b=part_attention, c=part_memory, d=part_sampling, e=part_torchrun)


# ---- suite.md ------------------------------------------------------------------------------

def fmt(x, spec='.3g'):
    if x is None:
        return '-'
    if isinstance(x, str):
        return x
    return format(x, spec)


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def status_line(part):
    if part['status'] == 'ok':
        return []
    why = f": {part['error']}" if 'error' in part else ''
    return [f"**{part['status']}** after {part['seconds']:.0f} s of {part['timeout_s']:.0f} s"
            f"{why} (what it measured before is below; log: {part['log']})", '']


def target(name, value, ok):
    if value is None:
        return f'{name}: not measured'
    return f"{name}: **{value:.2f}** ({'met' if ok(value) else 'not met'})"


def by(rows, key, value):
    return next((r for r in rows if r.get(key) == value and 'error' not in r), None)


def section_train(part, suite):
    cfg = suite['config']
    rows = part.get('rows', [])
    out = [f"### (a) Training: {cfg['size']}, {cfg['tokenizer']} vocabulary, block "
           f"{cfg['block_size']}, batch {cfg['batch_size']}, {cfg['dtype']}, "
           f"{'torch.compile' if cfg['compile'] else 'eager'}", ''] + status_line(part)
    body = []
    for r in rows:
        ar = by([x for x in rows if x['path'] == r['path']], 'label', 'AR')
        if 'error' in r:
            body.append([r['label'], r['path'], r['error'], '', '', '', '', ''])
            continue
        vs = r['train_tok_per_s'] / ar['train_tok_per_s'] if ar else None
        body.append([r['label'], r['path'], fmt(r['train_tok_per_s'], ',.0f'), fmt(r['mfu'], '.3f'),
                     fmt(vs, '.2f'), fmt(1000 * r['step_s'], '.1f'), fmt(r['warmup_s'], '.1f'),
                     fmt(r.get('peak_mib_compiled'), ',.0f')])
    out += table(['method', 'output layer + loss', 'tok/s', 'MFU', 'vs AR (same path)', 'step ms',
                  'compile + warm-up s', 'peak MiB'], body)
    fused_rows = [r for r in rows if r['path'] == 'fused']
    ar, mdlm, duo = (by(fused_rows, 'label', x) for x in ('AR', 'MDLM', 'Duo'))
    mfu = ar['mfu'] if ar else None
    ratios = [x['train_tok_per_s'] / ar['train_tok_per_s'] if x and ar else None
              for x in (mdlm, duo)]
    peak = part.get('peak_flops')
    out += ['', f"MFU: the FLOPs each method does, MATH (38), over {fmt(peak and peak / 1e12)} "
            'TFLOP/s (the datasheet of a known card, else a timed matmul); `-` where it would '
            'exceed 100%. Targets (fused path; reported, not asserted): '
            + '; '.join([target('AR MFU >= 0.45', mfu, lambda x: x >= 0.45),
                         target('MDLM/AR >= 1.0', ratios[0], lambda x: x >= 1.0),
                         target('Duo/AR >= 0.9', ratios[1], lambda x: x >= 0.9)]) + '.', '']
    return out


def section_attention(part, suite):
    cfg = suite['config']
    out = ['### (b) Attention kernels (eager, the network of (a), batch '
           f"{cfg['attention_batch']})", ''] + status_line(part)
    body = []
    for r in part.get('rows', []):
        if 'error' in r:
            body.append([r['label'], r['error']] + [''] * 7)
            continue
        forced = [fmt(r['forced'].get(name), '.3f') for name in [*BACKENDS, 'flex']]
        forced = ['no' if x.startswith('no:') else x for x in forced]
        body.append([r['label'], r['calls'], ', '.join(r['kernels']) or '?',
                     fmt(r['as_run_ms'], '.3f'), *forced])
    out += table(['attention mode', 'calls', 'kernel (profiler)', 'as run, ms', *BACKENDS,
                  'flex'], body)
    return out + ['', "ms: layer 0's attention call, forward + backward in training modes "
                  '(forward only when decoding, and for flex on a CPU). The backend columns: '
                  'the same call under `sdpa_kernel(backend)`, its mask as a boolean tensor (the '
                  'decode as the boolean mask before causal_lower_right), `no`: the backend '
                  'refuses it (suite.json says why); flex: flex_attention with that mask as a '
                  'BlockMask (fused.as_block_mask).', '']


def section_memory(part, suite):
    cfg = suite['config']
    compiled = suite['parts'].get('a', {}).get('rows', [])
    out = [f"### (c) Peak memory of one training step ({cfg['size']}, block {cfg['block_size']}, "
           f"batch {cfg['batch_size']}, {cfg['dtype']})", ''] + status_line(part)
    peaks = {r['spec']: r.get('peak_mib_compiled') for r in compiled}
    body = []
    for r in part.get('rows', []):
        if 'error' in r:
            body.append([r['label'], r['path'], r['error'], '', ''])
            continue
        body.append([r['label'], r['path'], fmt(r['peak_mib'], ',.0f'), fmt(r['step_mib'], ',.0f'),
                     fmt(peaks.get(r['spec']), ',.0f')])
    out += table(['method', 'output layer + loss', 'eager peak MiB', 'above the model + optimizer',
                  'compiled peak MiB (a)'], body)
    return out + ['']


def section_sampling(part, suite):
    cfg = suite['config']
    rows = part.get('rows', [])
    L = cfg['sample_length']
    out = [f'### (d) Sampling L = {L} tokens in one window, {cfg["size"]}, {cfg["dtype"]} '
           'network, float64 sampling, eager', ''] + status_line(part)
    body = []
    for r in rows:
        if 'error' in r:
            body.append([r['label'], r['batch'], r['error'], '', ''])
            continue
        body.append([r['label'], r['batch'], r['nfe'], fmt(r['seconds'], '.2f'),
                     fmt(r['tok_per_s'], ',.0f')])
    out += table(['sampler', 'batch', 'NFE', 'seconds', 'tok/s'], body)
    targets = []
    labels = [label for label, _ in samplers(L)]
    for n in SAMPLE_BATCHES:
        group = [r for r in rows if r.get('batch') == n]
        ar, mdlm, eso = (by(group, 'label', x) for x in labels[:3])
        speedup = mdlm['seconds'] / eso['seconds'] if eso and mdlm else None
        vs_ar = eso['seconds'] / ar['seconds'] if eso and ar else None
        targets += [target(f'batch {n}: MDLM s / Eso-LM s >= 10', speedup, lambda x: x >= 10),
                    target(f'batch {n}: Eso-LM s / AR s <= 1.2', vs_ar, lambda x: x <= 1.2)]
    return out + ['', 'Targets (reported, not asserted): ' + '; '.join(targets) + '.', '']


def section_torchrun(part, suite):
    out = ['### (e) torchrun smoke test', ''] + status_line(part)
    if 'final_step' not in part:
        return out
    body = [['command', f"`{part['command']} --max-iters 3`, then `--max-iters 6 --resume`"],
            ['backend', part['backend'] + (', in the log' if part['nccl_in_log'] else '')],
            ['resumed at step', fmt(part['resumed_at'])],
            ['final step', part['final_step']],
            ['logged training steps', ', '.join(map(str, part['logged_steps']))]]
    return out + table(['check', 'result'], body) + ['']


def markdown(suite):
    m = suite['machine']
    if m['gpu']:
        head = f"## GPU suite: {m['gpu']}"
        about = (f"{m['gpus']} x {m['gpu']} ({m['gpu_memory_gib']} GiB, compute {m['capability']}),"
                 f" torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}")
    else:
        head = '## GPU suite: dry run on the CPU (toy sizes: no figures to report)'
        about = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"
    command = 'python gpu_suite.py --out DIR' + (' --dry-run' if suite['dry_run'] else '')
    out = [head, '', f"{about}; commit {m['commit']}, {m['date']}. `{command}`: "
           f"{suite.get('wall_s', 0):.0f} s of a {suite['budget_s']:.0f} s budget.", '']
    for name, part in suite['parts'].items():
        out += SECTIONS[name](part, suite)
    return '\n'.join(out) + '\n'


SECTIONS = dict(a=section_train, b=section_attention, c=section_memory, d=section_sampling,
                e=section_torchrun)


if __name__ == '__main__':
    main()
