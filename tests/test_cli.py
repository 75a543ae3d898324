"""The trainer's promises to its user: no lost run, one-line refusals, the seed's recipe as
defaults."""
import os

import pytest
import torch

import ar
import config
import data
import duo
import eval as evaluate
import scaling
import train
from model import DiT, get_config
from test_train import TINY, log


# -- lost work -----------------------------------------------------------------

def test_a_run_is_never_replaced_without_overwrite(tmp_path, capsys):
    out = ['--out-dir', str(tmp_path / 'run')]
    train.main(TINY + ['--max-iters', '6'] + out)
    before = open(tmp_path / 'run' / 'log.jsonl').read()
    init = ['--init-from', str(tmp_path / 'run' / 'ckpt.pt')]
    distill = ['--algo', 'duo', '--distill-from', 'x.pt']
    refusal = 'holds a run.*--resume.*--overwrite.*another --out-dir'
    for again in ([], init, distill):
        with pytest.raises(SystemExit, match=refusal):
            train.main(TINY + ['--max-iters', '2'] + again + out)
    assert open(tmp_path / 'run' / 'log.jsonl').read() == before
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['step'] == 6
    train.main(TINY + ['--max-iters', '2', '--overwrite'] + out)  # starts over: a new log
    assert sorted(log(tmp_path / 'run', 'train_loss')) == [1, 2]
    with pytest.raises(SystemExit, match='pass one of them'):
        train.main(TINY + ['--resume', '--overwrite'] + out)


def test_a_non_finite_loss_before_any_checkpoint_names_none(tmp_path, monkeypatch):
    real_loss = ar.train_loss

    def nan_loss(m, x, u, a, step, s):
        return real_loss(m, x, u, a, step, s) * float('nan')

    monkeypatch.setattr(ar, 'train_loss', nan_loss)
    refusal = 'non-finite loss at step 0: stopping; no checkpoint was written$'
    with pytest.raises(SystemExit, match=refusal):
        train.main(TINY + ['--max-iters', '10', '--out-dir', str(tmp_path)])
    assert not os.path.exists(tmp_path / 'ckpt.pt')


# -- one line, before any work ---------------------------------------------------

@pytest.mark.parametrize('argv, says', [
    (['--micro-batch-size', '0'], '--micro-batch-size must be >= 1, got 0'),
    (['--batch-size', '0'], '--batch-size must be >= 1'),
    (['--block-size', '1'], '--block-size must be >= 2'),
    (['--eval-interval', '0'], '--eval-interval must be >= 1'),
    (['--ckpt-interval', '0'], '--ckpt-interval must be >= 1'),
    (['--log-interval', '0'], '--log-interval must be >= 1'),
    (['--eval-iters', '0'], '--eval-iters must be >= 1'),
    (['--max-iters', '-5'], '--max-iters must be >= 0'),
    (['--warmup-iters', '-1'], '--warmup-iters must be >= 0'),
    (['--flops', '0'], '--flops must be > 0'),
    (['--lr=-1e-3'], '--lr must be >= 0'),
    (['--lr', 'nan'], '--lr must be >= 0'),
    (['--min-lr', '-1'], '--min-lr must be >= 0'),
    (['--weight-decay', '-0.1'], '--weight-decay must be >= 0'),
    (['--grad-clip', '0'], '--grad-clip must be > 0'),
    (['--ema', '1'], r'--ema must be in \[0, 1\)'),
    (['--dropout', '1'], r'--dropout must be in \[0, 1\)'),
    (['--beta2', '1.5'], r'--beta2 must be in \[0, 1\)'),
    (['--ssl-ratio', '1.5'], r'--ssl-ratio must be in \[0, 1\]'),
    (['--algo', 'duo', '--teacher-every', '0'], '--teacher-every must be >= 1'),
    (['--algo', 'duo', '--distill-T', '0'], '--distill-T must be >= 1'),
    (['--algo', 'esolm', '--alpha0', '2'], r'--algo esolm: --alpha0 must be in \[0, 1\]'),
    (['--algo', 'esolm', '--alpha0', '0.5'], '--algo esolm: --alpha0 0.5 trains both parts'),
    (['--size', '7M'], "unknown size '7M'"),
])
def test_bad_flags_are_refused_at_parse_time(argv, says, tmp_path, monkeypatch):
    monkeypatch.setattr(train, 'setup', lambda *a: pytest.fail('work started'))
    with pytest.raises(SystemExit, match=says):
        train.main(TINY + ['--out-dir', str(tmp_path)] + argv)


def test_checkpoints_that_are_not_ours_get_one_line(tmp_path):
    train.main(TINY + ['--max-iters', '1', '--out-dir', str(tmp_path / 'run')])
    good = (tmp_path / 'run' / 'ckpt.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(good[:len(good) // 2])
    (tmp_path / 'text.pt').write_text('not a checkpoint')
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'other.pt')
    torch.save([1, 2], tmp_path / 'list.pt')
    for name in ('truncated', 'text', 'other', 'list'):
        says = (f"'{tmp_path / name}.pt' (is not a readable|holds no train.py) "
                f"checkpoint.*pass a ckpt.pt written by train.py$")
        with pytest.raises(SystemExit, match=says) as e:
            train.load_checkpoint(str(tmp_path / f'{name}.pt'))
        assert 'weights_only' not in str(e.value) and '\n' not in str(e.value)


def test_an_out_dir_that_cannot_be_written_is_refused_before_work(tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('')
    monkeypatch.setattr(train, 'setup', lambda *a: pytest.fail('work started'))
    with pytest.raises(SystemExit, match='cannot write to --out-dir .*file/run'):
        train.main(TINY + ['--out-dir', str(tmp_path / 'file' / 'run')])


@pytest.mark.parametrize('argv, says', [
    (['--batch-size', '0'], '--batch-size must be >= 1'),
    (['--block-size', '1'], '--block-size must be >= 2'),
    (['--max-batches', '0'], '--max-batches must be >= 1'),
    (['--repeats', '0'], '--repeats must be >= 1'),
])
def test_eval_flags_are_refused_before_loading(argv, says, monkeypatch):
    monkeypatch.setattr(evaluate, 'parse_with_checkpoint', lambda *a: pytest.fail('work started'))
    with pytest.raises(SystemExit, match=says):
        evaluate.main(['--ckpt', 'x.pt'] + argv)


@pytest.mark.parametrize('argv, says', [
    (['--sizes', 'tiny,7M,mini'], "unknown size '7M'"),
    (['--algos', 'ar,gpt'], "unknown algorithm 'gpt'"),
    (['--sizes', 'tiny,mini'], 'at least 3 sizes'),
    (['--sizes', 'tiny,mini,tiny'], 'at least 3 sizes'),
    (['--flops', '1e12,0'], '--flops: budgets must be > 0'),
    (['--flops', '1e12,-3e12'], '--flops: budgets must be > 0'),
])
def test_scaling_flags_are_refused_before_any_run(argv, says, tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, 'run_grid', lambda *a: pytest.fail('work started'))
    base = dict(zip(['--sizes', '--flops', '--algos'], ['tiny,mini,small', '1e12', 'ar']))
    base.update(zip(argv[::2], argv[1::2]))
    with pytest.raises(SystemExit, match=says):
        scaling.main([x for kv in base.items() for x in kv] + ['--out-dir', str(tmp_path)])


# -- the seed's recipe -----------------------------------------------------------

def test_distillation_defaults_are_the_seeds(monkeypatch):
    monkeypatch.setattr(config, 'ON_GPU', True)
    # distil_owt.sh
    a = train.parse_args(['--algo', 'duo', '--device', 'cuda', '--distill-from', 'base.pt'])
    got = (a.lr, a.min_lr, a.warmup_iters, a.batch_size, a.max_iters, a.ema, a.distill_T,
           a.teacher_every)
    assert got == (6e-5, 6e-5, 500, 128, 50_000, 0.999, 512, 10_000)
    largest_dt = max(duo.distill_dt(s, a.teacher_every, a.distill_T) for s in range(a.max_iters))
    assert largest_dt == 2 ** 4 / 512
    cpu = train.parse_args(['--algo', 'duo', '--distill-from', 'base.pt', '--device', 'cpu'])
    largest_dt = max(duo.distill_dt(s, cpu.teacher_every, cpu.distill_T)
                     for s in range(cpu.max_iters))
    assert largest_dt == 2 ** 4 / 512
    assert cpu.min_lr == cpu.lr
    mine = train.parse_args(['--algo', 'duo', '--device', 'cuda', '--distill-from', 'base.pt',
                             '--lr', '1e-4', '--ema', '0', '--max-iters', '7',
                             '--teacher-every', '3', '--batch-size', '64'])
    got = (mine.lr, mine.min_lr, mine.ema, mine.max_iters, mine.teacher_every, mine.batch_size)
    assert got == (1e-4, 1e-4, 0.0, 7, 3, 64)  # the user's flags win; constant lr follows theirs
    base = train.parse_args(['--algo', 'duo', '--device', 'cuda'])
    got = (base.lr, base.min_lr, base.ema, base.batch_size, base.max_iters)
    assert got == (2e-4, 2e-5, 0.0, 256, 100_000)


def test_dry_run_prints_the_resolved_values_and_epochs(capsys):
    train.main(['--algo', 'duo', '--distill-from', 'base.pt', '--tokenizer', 'byte', '--dry-run',
                '--lr', '1e-4'])
    out = dict(line.split(': ', 1) for line in capsys.readouterr().out.strip().splitlines())
    out = {k.strip(): v for k, v in out.items()}
    assert (out['lr'], out['min_lr'], out['ema'], out['teacher_every'], out['decay']) == \
        ('0.0001', '0.0001', '0.99', '100', 'all')
    n = data.num_tokens(data.prepare('shakespeare', 'byte'), 'train')
    assert float(out['epochs']) == pytest.approx(500 * 8 * 256 / n, rel=1e-3)
    train.main(['--dataset', 'not_prepared_here', '--tokenizer', 'byte', '--dry-run'])
    assert 'epochs: unknown' in capsys.readouterr().out


def test_gpu_plan_previewed_without_a_gpu(monkeypatch, capsys):
    """--device cuda --dry-run prints the GPU recipe on a machine without CUDA (the seed's
    distil_owt.sh: lr 6e-5, EMA 0.999, T 512, a teacher every 10,000 steps); without --dry-run
    it is refused."""
    monkeypatch.setattr(config, 'ON_GPU', False)
    train.main(['--algo', 'duo', '--distill-from', 'X', '--device', 'cuda', '--dry-run'])
    out = dict(line.split(': ', 1) for line in capsys.readouterr().out.strip().splitlines())
    out = {k.strip(): v for k, v in out.items()}
    got = [out[k] for k in ('lr', 'min_lr', 'ema', 'distill_T', 'teacher_every', 'warmup_iters',
                            'batch_size', 'max_iters', 'block_size', 'dtype', 'compile')]
    assert got == ['6e-05', '6e-05', '0.999', '512', '10000', '500', '128', '50000', '2048',
                   'bfloat16', 'True']
    with pytest.raises(SystemExit, match='no CUDA device here'):
        train.main(['--algo', 'duo', '--device', 'cuda'])


@pytest.mark.parametrize('n_train, says', [(300, True), (1000, False)])
def test_a_plan_that_reads_the_data_many_times_says_so(n_train, says, tmp_path, monkeypatch,
                                                        capsys):
    real = data.num_tokens

    def num_tokens(d, split):
        return n_train if split == 'train' else real(d, split)

    monkeypatch.setattr(data, 'num_tokens', num_tokens)
    # reads 10 x 4 x 32 = 1280 tokens
    train.main(TINY + ['--max-iters', '10', '--out-dir', str(tmp_path)])
    note = [line for line in capsys.readouterr().out.splitlines() if 'times' in line]
    assert len(note) == says and (not says or '4.3 times' in note[0] and '--dataset' in note[0])


@pytest.mark.parametrize('decay', ['all', 'matrices'])
def test_weight_decay_reaches_every_parameter_by_default(decay, tmp_path):
    argv = TINY + ['--out-dir', str(tmp_path), '--weight-decay', '0.1']
    if decay == 'matrices':
        argv += ['--decay', decay]
    net = DiT(get_config('tiny', 257))
    opt = train.make_optimizer(net, train.parse_args(argv))
    rate = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    assert len(rate) == len(list(net.parameters()))
    for name, p in net.named_parameters():
        expected = 0.1 if decay == 'all' or p.dim() >= 2 else 0.0  # the seed: gains and biases too
        assert rate[id(p)] == expected, name
    assert decay == 'all' or any(rate[id(p)] == 0.0 for p in net.parameters())


@pytest.mark.parametrize('algo, cut', [('ar', False), ('mdlm', True)])
def test_ssl_ratio_cuts_diffusion_batches_only(algo, cut, tmp_path):
    argv = TINY + ['--algo', algo, '--ssl-ratio', '1', '--out-dir', str(tmp_path)]
    run = train.setup(train.parse_args(argv))
    lengths = {train.get_batch(run, 'train', step, 0, 1)[0].shape[1] for step in range(20)}
    assert (lengths != {32}) == cut
