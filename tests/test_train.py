"""The trainer end to end on a tiny model: learning, resume, DDP, errors."""
import argparse
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ar
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--algo', 'ar', '--size', 'tiny', '--tokenizer', 'byte', '--block-size', '32',
        '--batch-size', '4', '--micro-batch-size', '4', '--eval-iters', '2',
        '--eval-interval', '10', '--log-interval', '1', '--dtype', 'float32', '--device', 'cpu',
        '--no-compile', '--lr', '3e-3']


def log(out_dir, key):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r['step']: r[key] for r in map(json.loads, f) if key in r}


def run(*argv):
    """Run a script in a subprocess: (return code, stdout, stderr)."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}  # a missing dataset fails at once, without retries
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    return p.returncode, p.stdout, p.stderr


def test_loss_falls(tmp_path):
    train.main(TINY + ['--max-iters', '60', '--eval-interval', '60', '--out-dir', str(tmp_path)])
    val = log(tmp_path, 'val_loss')
    assert abs(val[0] - math.log(257)) < 0.05  # zero-initialised output: uniform at the start
    assert val[60] < val[0] - 1.5


class Preempted(Exception):
    pass


def rows(out_dir):
    """The log as (step, keys) per row: what a reader of log.jsonl sees."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [(r['step'], sorted(k for k in r if k not in ('tok_per_s', 'mfu')))
                for r in map(json.loads, f)]


@pytest.mark.parametrize('algo', ['ar', 'mdlm'])
def test_resume_equals_the_uninterrupted_run(algo, tmp_path, monkeypatch):
    """Preempted at step 13, resumed from the step-10 checkpoint: the same losses, as
    randomness is a function of (seed, step, slice); evaluations (every 7) fall between
    checkpoints."""
    args = TINY + ['--algo', algo, '--max-iters', '20', '--ckpt-interval', '10',
                   '--eval-interval', '7', '--ema', '0.9']
    train.main(args + ['--out-dir', str(tmp_path / 'a')])
    method = importlib.import_module(algo)
    real_loss = method.train_loss

    def dies_at_step_13(model, x, u, a, step, state):
        if step == 13:
            raise Preempted
        return real_loss(model, x, u, a, step, state)
    monkeypatch.setattr(method, 'train_loss', dies_at_step_13)
    with pytest.raises(Preempted):
        train.main(args + ['--out-dir', str(tmp_path / 'b')])
    monkeypatch.setattr(method, 'train_loss', real_loss)
    with open(tmp_path / 'b' / 'log.jsonl', 'a') as f:
        f.write('{"step": 13, "train_lo')  # a row cut short by the kill
    train.main(args + ['--out-dir', str(tmp_path / 'b'), '--resume'])  # continues from step 10
    assert rows(tmp_path / 'b') == rows(tmp_path / 'a')  # the log reads as one run
    a, b = log(tmp_path / 'a', 'train_loss'), log(tmp_path / 'b', 'train_loss')
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    a, b = log(tmp_path / 'a', 'val_loss'), log(tmp_path / 'b', 'val_loss')
    assert sorted(a) == sorted(b) == [0, 7, 14, 20]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    # the checkpoint holds plain data only
    ckpt = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 20 and ckpt['algo'] == algo and ckpt['ema'] is not None


def test_resume_auto(tmp_path, capsys):
    args = TINY + ['--max-iters', '10', '--out-dir', str(tmp_path), '--resume', 'auto']
    train.main(args)  # nothing there: a fresh run
    i = args.index('--max-iters')
    train.main(args[:i] + ['--max-iters', '15'] + args[i + 2:])
    assert 'resumed' in capsys.readouterr().out and max(log(tmp_path, 'train_loss')) == 15
    with pytest.raises(SystemExit, match='another run'):
        train.main(args + ['--seed', '5'])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = ar.train_loss

    def explodes(model, x, u, a, step, state):
        loss = real_loss(model, x, u, a, step, state)
        return loss * float('nan') if step == 5 else loss
    monkeypatch.setattr(ar, 'train_loss', explodes)
    with pytest.raises(SystemExit, match='non-finite loss at step 5.*step 3'):
        train.main(TINY + ['--max-iters', '10', '--ckpt-interval', '3', '--out-dir', str(tmp_path)])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def rank_val(argv, ckpt, rank, world):
    """The validation loss that rank `rank` of `world` computes on its rows, before the
    all-reduce."""
    run = train.setup(train.parse_args(argv))
    run.rank = rank
    run.args = argparse.Namespace(**{**vars(run.args), 'world_size': world})
    run.model.load_state_dict(ckpt['model'])
    return train.evaluate(run)


def test_ddp_two_ranks_equal_one_rank_with_two_micro_steps(tmp_path):
    """MDLM, whose noise must be a function of (seed, step, slice) too; an evaluation between
    steps."""
    common = TINY + ['--algo', 'mdlm', '--micro-batch-size', '2', '--max-iters', '3',
                     '--eval-interval', '2']
    # the last flag wins
    rc, out, err = run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                       'train.py', *common, '--out-dir', str(tmp_path / 'ddp'))
    assert rc == 0, err[-2000:]
    train.main(common + ['--out-dir', str(tmp_path / 'one')])
    ddp, one = log(tmp_path / 'ddp', 'train_loss'), log(tmp_path / 'one', 'train_loss')
    assert sorted(ddp) == [1, 2, 3]
    for step in ddp:
        assert ddp[step] == pytest.approx(one[step], abs=1e-5)
    # the validation loss is the mean over both ranks' rows (all-reduced), not rank 0's
    ckpt = torch.load(tmp_path / 'ddp' / 'ckpt.pt', weights_only=True)
    argv = common + ['--out-dir', str(tmp_path / 'x')]
    local = [rank_val(argv, ckpt, rank, 2) for rank in (0, 1)]
    assert abs(local[0] - local[1]) > 1e-3  # so rank 0 alone would be caught below
    assert log(tmp_path / 'ddp', 'val_loss')[3] == pytest.approx(sum(local) / 2, abs=1e-6)


@pytest.mark.parametrize('argv, says', [
    (['--size', '7M'], "unknown size '7M'"),
    (['--algo', 'gpt'], "unknown algorithm 'gpt'"),
    (['--dataset', 'no/such_dataset_here_xyz'], "cannot load dataset"),
    (['--batch-size', '6', '--micro-batch-size', '4'], 'not divisible'),
])
def test_bad_input_exits_with_one_clear_line(argv, says, tmp_path):
    rc, out, err = run('train.py', *TINY, '--max-iters', '1', '--out-dir', str(tmp_path), *argv)
    assert rc != 0
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_from_another_algorithm_is_refused(tmp_path):
    train.main(TINY + ['--max-iters', '2', '--out-dir', str(tmp_path / 'ar')])
    other = [a if a != 'ar' else 'mdlm' for a in TINY]
    with pytest.raises(SystemExit, match='checkpoint of --algo ar'):
        train.main(other + ['--max-iters', '2', '--out-dir', str(tmp_path / 'x'),
                            '--init-from', str(tmp_path / 'ar' / 'ckpt.pt')])


def test_flops_budget_sets_the_steps(capsys):
    train.main(['--algo', 'ar', '--size', '19M', '--block-size', '2048', '--batch-size', '256',
                '--flops', '6e18', '--dry-run'])
    out = capsys.readouterr().out
    # 19M with GPT-2's 50257 tokens, counted as the seed does: 66,911,328 FLOPs per token of
    # matmuls + 137,136.125 of the rest (test_model.py) = 67,048,112.125, so
    # 6e18 / (3 x 67048112.125 x 2048 x 256) = 56894.9 steps
    assert int(out.split('steps: ')[1].split()[0]) == 56894


def test_sample_cli(tmp_path, capsys):
    train.main(TINY + ['--max-iters', '5', '--out-dir', str(tmp_path)])
    ckpt = str(tmp_path / 'ckpt.pt')
    a, nfe = sample.main(['--ckpt', ckpt, '--num-samples', '2', '--length', '24',
                          '--prompt', 'To be', '--dtype', 'float32'])
    out = capsys.readouterr().out
    assert a.shape == (2, 24) and nfe == 24 - 6 and 'NFE 18' in out and 'To be' in out
    b, _ = sample.main(['--ckpt', ckpt, '--num-samples', '2', '--length', '24', '--prompt', 'To be',
                        '--dtype', 'float32', '--no-cache'])
    assert torch.equal(a, b)
