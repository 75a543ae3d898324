"""The training loop against values computed here: the times it draws, the
gradient the optimizer receives (accumulation, clipping), the learning-rate
schedule, the EMA, the split it validates on, --ssl-ratio and best_val on resume.
One short in-process run records what the loop hands the method and the optimizer."""
import os

import numpy as np
import pytest
import torch

import ar
import train
from model import DiT
from test_train import TINY, log

STEPS, WARMUP, LR, MIN_LR = 11, 3, 1e-3, 1e-4


def recorded_run(out_dir, *extra):
    """train.main on the tiny AR model, global batch 4 in two micro-steps of 2; returns
    the run, each train_loss call (step, x, u), each eval_nll call's x, and at each
    optimizer step the lr, weights before it and gradients it receives."""
    calls, evals, steps, runs = [], [], [], []
    real_setup, real_loss, real_eval = train.setup, ar.train_loss, ar.eval_nll

    def setup(args):
        run = real_setup(args)
        runs.append(run)
        real_step = run.opt.step

        def step(*a, **k):
            named = list(run.raw.named_parameters())
            steps.append(dict(lr=[g['lr'] for g in run.opt.param_groups],
                              weights={n: p.detach().clone() for n, p in named},
                              grads={n: p.grad.clone() for n, p in named}))
            return real_step(*a, **k)
        run.opt.step = step
        return run

    def train_loss(model, x, u, a, step, state):
        calls.append(dict(step=step, x=x.clone(), u=u.clone()))
        return real_loss(model, x, u, a, step, state)

    def eval_nll(model, x, u, a):
        evals.append(x.clone())
        return real_eval(model, x, u, a)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, 'setup', setup)
        mp.setattr(ar, 'train_loss', train_loss)
        mp.setattr(ar, 'eval_nll', eval_nll)
        train.main(TINY + ['--micro-batch-size', '2', '--out-dir', str(out_dir), *extra])
    return runs[0], calls, evals, steps


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('loop')
    trainer, calls, evals, steps = recorded_run(
        out, '--max-iters', str(STEPS), '--warmup-iters', str(WARMUP), '--lr', str(LR),
        '--min-lr', str(MIN_LR), '--grad-clip', '1e9', '--ema', '0.9', '--eval-interval', '5')
    return trainer, calls, evals, steps, torch.load(out / 'ckpt.pt', weights_only=True)


def direct_gradient(trainer, weights, x):
    """d/dW of the mean next-token loss over the whole global batch x, computed here."""
    net = DiT(trainer.cfg)
    net.load_state_dict(weights)
    ar.train_loss(net, x, None, trainer.args, 0, {}).backward()
    return {n: p.grad for n, p in net.named_parameters()}


def test_times_are_antithetic_over_the_global_batch(run):
    _, calls, _, _, _ = run
    for step in range(STEPS):
        u = torch.cat([c['u'] for c in calls if c['step'] == step])  # micro-steps in slice order
        assert len(u) == 4 and 0 <= u[0] < 0.25
        assert torch.allclose(u - u[0], torch.arange(4) / 4, atol=1e-6), step  # u_i = (u + i) / n
    assert len({round(c['u'][0].item(), 6) for c in calls[::2]}) == STEPS  # a fresh u every step


def test_gradient_is_the_mean_over_the_global_batch(run):
    trainer, calls, _, steps, _ = run
    for step in (0, 4):
        x = torch.cat([c['x'] for c in calls if c['step'] == step])
        expected = direct_gradient(trainer, steps[step]['weights'], x)
        for name, g in steps[step]['grads'].items():
            assert torch.allclose(g, expected[name], rtol=1e-4, atol=1e-7), (step, name)


def test_gradient_is_clipped_to_the_max_norm(tmp_path):
    trainer, calls, _, steps = recorded_run(tmp_path, '--max-iters', '2', '--grad-clip', '0.05',
                                            '--eval-iters', '1')
    for step in range(2):
        x = torch.cat([c['x'] for c in calls if c['step'] == step])
        expected = direct_gradient(trainer, steps[step]['weights'], x)
        norm = torch.cat([g.flatten() for g in expected.values()]).norm().item()
        assert norm > 0.5  # clipping is active: the gradient received is rescaled to norm 0.05
        for name, g in steps[step]['grads'].items():
            clipped = expected[name] * 0.05 / norm
            assert torch.allclose(g, clipped, rtol=1e-4, atol=1e-8), (step, name)


def test_learning_rate_warmup_and_cosine(run):
    _, _, _, steps, _ = run
    # linear warmup over 3 steps to 1e-3, then cosine to 1e-4 over the 8 steps left:
    # lr = 1e-4 + 0.5 (1 + cos(pi (step - 3) / 8)) 9e-4
    expected = {0: 1e-3 / 3, 1: 2e-3 / 3, 2: 1e-3, 3: 1e-3, 5: 8.681981e-4, 7: 5.5e-4,
                9: 2.318019e-4, 10: 1.342542e-4}
    for step, lr in expected.items():
        assert steps[step]['lr'] == pytest.approx([lr, lr], rel=1e-6), step


def test_ema_follows_the_weights_with_decay_0_9(run):
    _, _, _, steps, ckpt = run
    ema = dict(steps[0]['weights'])  # a copy of the initial weights
    for k in range(1, STEPS + 1):
        w = steps[k]['weights'] if k < STEPS else ckpt['model']
        ema = {n: 0.9 * e + 0.1 * w[n] for n, e in ema.items()}  # ema <- decay ema + (1 - decay) w
    for name, e in ema.items():
        assert torch.allclose(ckpt['ema'][name], e, rtol=1e-5, atol=1e-7), name


def test_validation_reads_the_val_split(run):
    trainer, _, evals, _, _ = run
    assert len(evals) == 2 * 4  # eval_iters 2 at steps 0, 5, 10 and 11

    def text(ids):  # token ids as characters: a window is a substring
        return ''.join(map(chr, ids))

    splits = {}
    for s in ('train', 'val'):
        ids = np.fromfile(os.path.join(trainer.data_dir, f'{s}.bin'), dtype=trainer.meta['dtype'])
        splits[s] = text(ids.tolist())
    rows = [text(r) for r in torch.cat(evals).tolist()]
    assert all(r in splits['val'] for r in rows) and not any(r in splits['train'] for r in rows)


def test_ssl_ratio_cuts_that_fraction_of_training_batches():
    run = train.setup(train.parse_args(TINY + ['--algo', 'mdlm', '--ssl-ratio', '0.1']))
    lengths = [train.get_batch(run, 'train', step, 0, 1)[0].shape[1] for step in range(1000)]
    # a cut to a length in [2, 32] leaves 32 with prob 1/31
    cut = sum(n < 32 for n in lengths) / 1000
    assert 0.1 * 30 / 31 - 0.05 < cut < 0.1 * 30 / 31 + 0.05  # 5 sigma = 0.047
    assert min(lengths) >= 2 and len(set(lengths)) > 20
    # never val
    assert all(train.get_batch(run, 'val', i, 0, 1)[0].shape[1] == 32 for i in range(100))


def test_resume_restores_best_val(tmp_path, monkeypatch, capsys):
    """The best validation loss so far survives a resume, here one seen before the checkpoint."""
    val_at = {0: 9.0, 2: 1.0, 4: 5.0, 6: 3.0}
    monkeypatch.setattr(train, 'evaluate', lambda run: val_at[run.step])
    args = TINY + ['--eval-interval', '2', '--out-dir', str(tmp_path)]
    train.main(args + ['--max-iters', '4'])
    train.main(args + ['--max-iters', '6', '--resume'])  # evaluates at 4 and 6 only
    assert log(tmp_path, 'val_loss') == val_at
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['best_val_loss'] == 1.0
    assert 'best val loss 1.0000' in capsys.readouterr().out.splitlines()[-1]
