"""Faults met on a cluster or a laptop: a preemption signal saves the step, a full disk loses
nothing, one trainer per out-dir, float16 with a loss scaler, and a bounded set of matmul
shapes (flat memory), each against what the user must see."""
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import data
import mdlm
import scaling
import train
from args import make_args
from model import DiT, get_config
from test_train import ROOT, TINY, log, rows

MDLM = TINY + ['--algo', 'mdlm', '--eval-interval', '5']


def tmp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith('.tmp')]


# ---- a stop signal saves the step ------------------------------------------------------------

@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_step_and_the_resumed_run_equals_the_uninterrupted_one(
        sig, tmp_path, monkeypatch):
    args = MDLM + ['--max-iters', '12', '--ckpt-interval', '100']   # no periodic checkpoint
    train.main(args + ['--out-dir', str(tmp_path / 'a')])
    real_loss = mdlm.train_loss

    def signalled_at_step_7(model, x, u, a, step, state):
        if step == 7:
            os.kill(os.getpid(), sig)
        return real_loss(model, x, u, a, step, state)
    before = signal.getsignal(sig)
    monkeypatch.setattr(mdlm, 'train_loss', signalled_at_step_7)
    with pytest.raises(SystemExit) as stopped:
        train.main(args + ['--out-dir', str(tmp_path / 'b')])
    assert stopped.value.code == train.PREEMPTED
    assert signal.getsignal(sig) is before                  # the handler is given back
    ckpt = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 8 and not tmp_files(tmp_path / 'b')  # step 7 finished, then saved
    monkeypatch.setattr(mdlm, 'train_loss', real_loss)
    train.main(args + ['--out-dir', str(tmp_path / 'b'), '--resume', 'auto'])
    assert rows(tmp_path / 'b') == rows(tmp_path / 'a')
    a = log(tmp_path / 'a', 'train_loss')
    b = log(tmp_path / 'b', 'train_loss')
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    real_loss = mdlm.train_loss

    def signalled_twice(model, x, u, a, step, state):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(model, x, u, a, step, state)
    monkeypatch.setattr(mdlm, 'train_loss', signalled_twice)
    with pytest.raises(SystemExit, match='SIGTERM again: stopping now, without saving'):
        train.main(MDLM + ['--max-iters', '10', '--ckpt-interval', '2',
                           '--out-dir', str(tmp_path)])
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 4  # the last periodic
    assert not tmp_files(tmp_path)


def test_sigterm_to_a_running_trainer_exits_with_the_preempted_code(tmp_path):
    """A real signal to a real process: exit code 75 and a checkpoint of the last step logged."""
    argv = [sys.executable, 'train.py', *MDLM, '--max-iters', '100000', '--ckpt-interval',
            '100000', '--eval-interval', '100000', '--out-dir', str(tmp_path)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while max(log(tmp_path, 'train_loss'), default=0) < 3 if (tmp_path / 'log.jsonl').exists() \
            else True:
        assert p.poll() is None and time.time() < deadline, p.stderr.read()
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == train.PREEMPTED, err[-2000:]
    step = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step']
    assert step == max(log(tmp_path, 'train_loss')) >= 3 and 'stop signal at step' in out
    assert not tmp_files(tmp_path)


# ---- a full disk loses nothing ---------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past nbytes fail (EFBIG), as on a full disk (SIGXFSZ ignored: they fail, not kill)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failing_checkpoint_write_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    real_save = train.save_checkpoint
    calls = []

    def fails_the_second_time(ckpt, path):
        calls.append(ckpt['step'])
        limit = 10_000 if len(calls) == 2 else resource.RLIM_INFINITY
        with file_size_limit(limit):
            return real_save(ckpt, path)
    monkeypatch.setattr(train, 'save_checkpoint', fails_the_second_time)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ['--max-iters', '10', '--ckpt-interval', '3', '--out-dir', str(tmp_path)])
    msg = str(e.value)
    assert calls == [3, 6] and '\n' not in msg
    assert msg.startswith(f'cannot write {tmp_path / "ckpt.pt"}') and 'MiB free' in msg
    assert 'MiB needed' in msg and '--out-dir' in msg
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 3  # the previous one
    assert not tmp_files(tmp_path)


def test_failing_log_and_data_writes_are_one_line(tmp_path, monkeypatch):
    (tmp_path / 'log.jsonl').write_text('{"step": 0}\n')
    with file_size_limit(os.path.getsize(tmp_path / 'log.jsonl') - 1):
        with pytest.raises(SystemExit, match=r'cannot write .*log\.jsonl \(File too large\)'):
            checkpoint.append_log(str(tmp_path), {'step': 1, 'train_loss': 2.0})
        with pytest.raises(SystemExit, match=r'cannot write .*log\.jsonl'):
            checkpoint.trim_log(str(tmp_path), 5)
    assert (tmp_path / 'log.jsonl').read_text() == '{"step": 0}\n' and not tmp_files(tmp_path)
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i in range(20):
        (corpus / f'{i}.txt').write_text('to be or not to be ' * 300)
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    with file_size_limit(20_000):
        with pytest.raises(SystemExit, match='cannot write .*corpus.*File too large.*MiB free'):
            data.prepare(str(corpus), 'byte', num_proc=1)
    assert not os.listdir(tmp_path / 'data')       # no temporary file, no half-made folder


# ---- one trainer per out-dir -----------------------------------------------------------------

def test_a_second_trainer_is_refused_naming_the_first(tmp_path):
    first = checkpoint.lock_out_dir(str(tmp_path))
    try:
        with pytest.raises(SystemExit, match=f'in use by another trainer \\(pid {os.getpid()} '):
            train.main(TINY + ['--max-iters', '2', '--out-dir', str(tmp_path)])
    finally:
        first.close()
    assert not (tmp_path / 'log.jsonl').exists()     # refused before writing anything
    train.main(TINY + ['--max-iters', '2', '--out-dir', str(tmp_path)])  # free again


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    script = ('import sys, time, checkpoint; f = checkpoint.lock_out_dir(sys.argv[1]); '
              'print("locked", flush=True); time.sleep(120)')
    p = subprocess.Popen([sys.executable, '-c', script, str(tmp_path)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'locked'
    with pytest.raises(SystemExit, match=f'pid {p.pid}'):
        checkpoint.lock_out_dir(str(tmp_path))
    p.kill()                                          # SIGKILL: no cleanup code runs
    p.wait()
    checkpoint.lock_out_dir(str(tmp_path)).close()   # the OS released it


# ---- leftovers: scaling's reading, float16, the data configuration ----------------------------

def test_scaling_reads_a_broken_checkpoint_in_one_line(tmp_path):
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    (tmp_path / 'log.jsonl').write_text('')
    with pytest.raises(SystemExit, match="is not a readable checkpoint.*written by train.py$"):
        scaling.read_result(str(tmp_path))


def test_float16_trains_with_a_loss_scaler(tmp_path):
    train.main(TINY + ['--max-iters', '4', '--dtype', 'float16', '--out-dir', str(tmp_path)])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['scaler']['scale'] > 1                # scaled: float16 gradients don't underflow
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert all(l == l for l in log(tmp_path, 'train_loss').values())
    train.main(TINY + ['--max-iters', '6', '--dtype', 'float16', '--out-dir', str(tmp_path),
                       '--resume'])
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 6


def test_two_configurations_of_one_hub_dataset_never_share_a_folder():
    a = data.dataset_dir('org/corpus', 'gpt2', 'sample-10BT')
    b = data.dataset_dir('org/corpus', 'gpt2', 'sample-100BT')
    assert len({a, b, data.dataset_dir('org/corpus', 'gpt2')}) == 3
    assert 'sample-10BT' in a


# ---- a bounded set of matmul shapes: flat memory ---------------------------------------------

class MatmulShapes(TorchDispatchMode):
    """Records the shapes of every matmul with a vocabulary-wide operand (forward and backward)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split('.')[0] in ('mm', 'addmm'):
            shapes = tuple(tuple(a.shape) for a in args if torch.is_tensor(a))
            if any(self.vocab in s for s in shapes):
                self.shapes.add((func.__name__, shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('fused', [True, False])
def test_the_output_layer_sees_a_few_shapes_whatever_the_masked_count(fused):
    """MDLM's masked count changes every step; unbounded matmul shapes grow oneDNN's (CPU bf16)
    and CUDA's per-shape caches without end. Twelve steps, twelve masked counts: fused, chunks
    of 256 rows and a last one rounded to a multiple of 64; plain, rows rounded to a power of
    two up to 256, then to a multiple of 256 (a few shapes either way)."""
    K = 500
    net = DiT(get_config('tiny', mdlm.vocab_size(K)))
    V = net.cfg.padded_vocab
    args = make_args(vocab_size=K, fused=fused)
    x = torch.randint(0, K, (4, 256))
    spy = MatmulShapes(V)
    counts = set()
    for step in range(12):
        torch.manual_seed(step)
        u = torch.full((4,), 0.05 + 0.08 * step)     # a different masked count each step
        with spy:
            mdlm.train_loss(net, x, u, args, step, {}).backward()
        counts.add(int((mdlm.corrupt(x, mdlm.schedule(mdlm.EPS + (1 - mdlm.EPS) * u)[0], K)
                        == K).sum()))
    assert len(counts) >= 10                          # the row count did change every step
    rows = {n for _, shapes in spy.shapes for s in shapes for n in s if n not in (64, V)}
    if fused:  # chunks of 256 rows, the last one padded to a multiple of 64
        assert rows <= {64, 128, 192, 256}, sorted(spy.shapes)
    else:  # powers of two up to 256, then multiples of 256: here 6 of them
        assert rows <= {2 ** k for k in range(9)} | {256 * k for k in range(1, 5)}, rows
        assert len(rows) <= 6, rows
