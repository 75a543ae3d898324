"""Downstream tasks (harness.py, eval.py --tasks): the conditional estimators against the exact
-log p(continuation | context) of an enumerable toy with the exact denoiser (MATH (39)-(41)), the
adapter's three requests on tiny checkpoints of every method (AR against an NLL computed here),
eval.py --tasks on the local tasks of tests/tasks/ for all four methods, and the one-line
refusal without lm_eval."""
import json
import math
import os
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import ar
import data
import duo
import esolm
import eval as evaluation
import harness
import mdlm
from args import make_args
from model import DiT, get_config
from test_duo import args_for as duo_args, noisy_oracle
from test_esolm import oracle as esolm_oracle
from test_mdlm import oracle as mdlm_oracle
from toy import toy_distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, 'tests', 'tasks')
METHODS = {'ar': ar, 'mdlm': mdlm, 'duo': duo, 'esolm': esolm}
K, L = 3, 3


def stratified(n, g):
    return (torch.rand(1, generator=g) + torch.arange(n)) / n


def selecting(net):
    """Duo's toy denoiser answers every position: keep the selected rows, then apply the
    output head, as model.py does."""
    def model(z, select=None, head=None, **kw):
        out = net(z, **kw)
        out = out if select is None else out[select]
        return out if head is None else head(out)
    return model


def toy_method(name, P, seqs, probs):
    if name == 'mdlm':
        return mdlm_oracle(seqs, probs, K), make_args(vocab_size=K)
    if name == 'duo':
        return selecting(noisy_oracle(seqs, probs, clean_prefix=P)), duo_args()
    alpha0 = float(name.split(':')[1])
    return esolm_oracle(seqs, probs, K), make_args(vocab_size=K, alpha0=alpha0, iw_orders=0)


@pytest.mark.parametrize('name', ['mdlm', 'duo', 'esolm:0.5', 'esolm:1.0'])
@pytest.mark.parametrize('P', [1, 2])
def test_conditional_estimate_of_the_exact_denoiser_is_the_conditional_nll(name, P):
    """With the exact denoiser of the toy (for Duo the leave-one-out posterior given a clean
    prefix, with which its NELBO is tight), each sequence's estimate of the NELBO of x_P.. given
    x_<P, repeated R times, has mean -log p(x_P.. | x_<P) within 5 standard errors; all
    sequences at once within 5 (a bias of a few % would show)."""
    seqs, probs = toy_distribution(K, L, seed=4)
    model, args = toy_method(name, P, seqs, probs)
    R = 4000 if name == 'duo' else 1000   # Duo's estimate spreads more (~7 nats a draw)
    torch.manual_seed(0)
    x = seqs.repeat_interleave(R, 0)
    u = stratified(R, torch.Generator().manual_seed(0)).repeat(len(seqs))
    est, _ = harness.ESTIMATORS[name.split(':')[0]](model, x, P, u, args)
    est = est.double().view(len(seqs), R)
    prefix = (seqs[:, None, :P] == seqs[None, :, :P]).all(-1).double() @ probs  # p(x_<P)
    exact = -(probs / prefix).log()                            # -log p(x_P.. | x_<P)
    mean = est.mean(1)
    se = est.std(1) / math.sqrt(R)
    assert ((mean - exact).abs() < 5 * se + 1e-9).all()
    total_se = se.pow(2).sum().sqrt()
    assert abs(mean.sum() - exact.sum()) < 5 * total_se + 1e-9   # C = 1, MDLM: exact, se 0
    assert total_se < 0.01 * exact.sum()


def test_the_context_is_never_corrupted_and_the_greedy_row_hides_the_continuation():
    """Every call keeps the context clean; the last row of the call hides every continuation
    token ([MASK] or, for Duo, alpha_1 = eps); is_greedy holds iff the argmax there is the
    continuation."""
    seqs, probs = toy_distribution(K, L, seed=4)
    for name in ['mdlm', 'duo', 'esolm:0.5']:
        net, args = toy_method(name, 1, seqs, probs)
        calls = []

        def model(*z, **kw):   # Eso-LM passes x=...
            calls.append((z[0] if z else kw['x'], kw))
            return net(*z, **kw)
        x = seqs[probs.argmax()].expand(8, -1)
        _, greedy = harness.ESTIMATORS[name.split(':')[0]](model, x, 1, torch.rand(8), args)
        for z, kw in calls:   # Eso-LM's input is sorted (its first L tokens: z_t or z_0)
            positions = kw.get('positions', torch.arange(L).expand(len(z), -1))[:, :L]
            assert (z[:, :L].gather(1, positions.argsort(1))[:, 0] == x[0, 0]).all()
        z, kw = calls[0]
        if name == 'mdlm':
            assert (z[-1, 1:] == K).all()
        if name == 'duo':
            assert torch.exp(-kw['sigma'][-1]).item() == pytest.approx(duo.EPS, rel=1e-6)
        assert isinstance(greedy, bool)
    # every toy sequence: is its continuation the argmax given x_0 with the rest masked?
    mdlm_net, args = toy_method('mdlm', 1, seqs, probs)
    expected = []
    for x in seqs:
        predicted = mdlm_net(torch.tensor([[x[0], K, K]]))[0, 1:, :K].argmax(-1)
        expected.append(bool((predicted == x[1:]).all()))
        _, greedy = harness.mdlm_nll(mdlm_net, x.expand(4, -1), 1, torch.rand(4), args)
        assert greedy == expected[-1]
    assert 0 < sum(expected) < len(seqs)


# ---- the adapter on tiny checkpoints ---------------------------------------------------------

def tiny_net(module, K, seed=0):
    torch.manual_seed(seed)
    model = DiT(get_config('tiny', module.vocab_size(K))).eval()
    for p in model.parameters():  # small random weights: varied, finite outputs
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Random tiny networks in checkpoints as train.py writes them (byte tokenizer, context 32,
    Eso-LM at alpha_0 = 0.5)."""
    tmp = tmp_path_factory.mktemp('harness')
    K = data.get_tokenizer('byte').vocab_size
    for name, module in METHODS.items():
        model = tiny_net(module, K)
        ckpt = {'model': model.state_dict(), 'config': asdict(model.cfg), 'algo': name,
                'step': 0, 'args': {'block_size': 32, 'alpha0': 0.5},
                'meta': {'tokenizer': 'byte', 'vocab_size': K}}
        torch.save(ckpt, tmp / f'{name}.pt')
    return tmp


def adapter(path, *flags):
    args, _ = evaluation.parse(['--ckpt', str(path), '--tasks', 'x', '--dtype', 'float32',
                                *flags])
    return harness.DLLM(args)


def request(kind, *arguments):
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def exact_ar(model, ids, start):
    """sum_{j >= start} log p(ids[j] | ids[:j]) and whether each is the argmax, written here."""
    logits = model(torch.tensor([ids[:-1]]), causal=True)[0, :, :257].double()
    logp = F.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    picked = logp[torch.arange(len(targets)), targets][start - 1:]
    return picked.sum().item(), bool((logp.argmax(-1) == targets)[start - 1:].all())


def test_ar_loglikelihood_is_the_exact_conditional_log_probability(ckpts):
    lm = adapter(ckpts / 'ar.pt')
    model = lm.model
    pairs = [('ROMEO: O my', ' love'), ('To be, or not ', 'to be'), ('', 'abc'),
             ('x' * 40, ' tail')]                                  # the last: over the context
    out = lm.loglikelihood([request('loglikelihood', c, t) for c, t in pairs])
    assert len(out) == len(pairs)
    for (context, continuation), (logp, greedy) in zip(pairs, out):
        whole = [256] + list((context.rstrip() + context[len(context.rstrip()):]
                              + continuation).encode())
        start = 1 + len(context.rstrip().encode())                 # trailing spaces: continuation
        ids = whole[-32:]                                          # the context cut from the left
        start -= len(whole) - len(ids)
        expected, argmax = exact_ar(model, ids, start)
        assert logp == pytest.approx(expected, abs=1e-4)
        assert greedy == argmax
    assert lm.summary() == {'mc_samples': 1}                      # exact: no Monte Carlo
    # is_greedy: the model's own argmax continuation, then one token changed
    ids = [256] + list(b'ROMEO')
    for _ in range(3):
        ids.append(int(model(torch.tensor([ids]), causal=True)[0, -1, :257].argmax()))
    assert lm.score(ids[:6], ids[6:])[1]
    for j in (6, 8):
        wrong = ids[:j] + [(ids[j] + 1) % 256] + ids[j + 1:]
        assert not lm.score(wrong[:6], wrong[6:])[1]


def test_ar_rolling_loglikelihood_sums_lm_evals_windows(ckpts):
    lm = adapter(ckpts / 'ar.pt')
    short = 'When forty winters shall besiege'   # 32 bytes and the start: 31, then 1 more
    long = short * 3                             # 96 bytes: 31 + 31 + 31 + 3
    out = lm.loglikelihood_rolling([request('loglikelihood_rolling', t) for t in (short, long)])
    tokens = list(short.encode())
    full = exact_ar(lm.model, [256] + tokens[:31], 1)[0] + exact_ar(lm.model, tokens, 31)[0]
    assert out[0] == pytest.approx(full, abs=1e-4)
    windows = [make_disjoint_window(w) for w in
               get_rolling_token_windows(list(long.encode()), 256, 31, 1)]
    assert len(windows) == 4
    expected = sum(exact_ar(lm.model, c + t, len(c))[0] for c, t in windows)
    assert out[1] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize('name', ['mdlm', 'duo', 'esolm'])
def test_diffusion_loglikelihood_is_a_finite_bound_with_its_standard_error(ckpts, name):
    lm = adapter(ckpts / f'{name}.pt', '--mc-samples', '6')
    reqs = [request('loglikelihood', 'ROMEO: O my', ' love'),
            request('loglikelihood', 'JULIET:', ' Good night, good night!')]
    out = lm.loglikelihood(reqs)
    assert len(out) == 2
    for logp, greedy in out:
        assert math.isfinite(logp) and logp < 0 and isinstance(greedy, bool)
    s = lm.summary()
    assert s['mc_samples'] == 6 and s['estimates'] == 2
    assert 0 < s['standard_error_mean'] <= s['standard_error_max'] < float('inf')
    # the bound per token is far above 0 for random weights, and grows with the continuation
    assert out[1][0] < out[0][0]


def test_generation_is_cut_at_stop_strings_and_end_of_text(ckpts):
    lm = adapter(ckpts / 'mdlm.pt')
    ids = list(b'hello. world') + [256] + list(b'after')
    assert lm.cut(ids, ['.']) == 'hello'
    assert lm.cut(ids, ['o', '.']) == 'hell'
    assert lm.cut(ids, []) == 'hello. world'
    assert lm.cut(ids, 'wor') == 'hello. '


@pytest.mark.parametrize('name', list(METHODS))
def test_generate_until_continues_the_context_for_every_method(ckpts, name):
    lm = adapter(ckpts / f'{name}.pt', '--length', '10', '--steps', '5')
    calls = []
    sampler = lm.algo.sample

    def recording(model, args, n, length, prompt, device):
        calls.append((args.steps, length, prompt))
        return sampler(model, args, n, length, prompt, device)
    lm.algo = type('algo', (), {'sample': staticmethod(recording)})
    reqs = [request('generate_until', 'ROMEO: O my', {'until': ['e', 'a'], 'max_gen_toks': 50}),
            request('generate_until', 'JULIET:', {'until': '\n'})]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert not any(s in out[0] for s in 'ea') and '\n' not in out[1]
    assert all(len(t.encode()) <= 10 * 3 for t in out)             # 10 bytes, some replaced
    steps, length, prompt = calls[0]
    assert steps == 5 and prompt[0].tolist() == [256] + list(b'ROMEO: O my')
    assert length == prompt.shape[1] + 10


# ---- eval.py --tasks -------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(METHODS))
def test_eval_runs_the_local_tasks(ckpts, name, tmp_path, monkeypatch, capsys):
    """A multiple-choice, a generation and a perplexity task from tests/tasks (YAML + JSONL)."""
    monkeypatch.chdir(ROOT)   # the tasks' data_files are relative to the repository's root
    out = tmp_path / 'results.json'
    results = evaluation.main(['--ckpt', str(ckpts / f'{name}.pt'), '--task-dir', TASKS,
                               '--tasks', 'tiny_choice,tiny_gen,tiny_ppl', '--mc-samples', '4',
                               '--steps', '4', '--length', '8', '--dtype', 'float32',
                               '--out', str(out)])
    saved = json.loads(out.read_text())
    assert set(saved['results']) == {'tiny_choice', 'tiny_gen', 'tiny_ppl'}
    assert 0 <= saved['results']['tiny_choice']['acc,none'] <= 1
    assert 0 <= saved['results']['tiny_gen']['exact_match,none'] <= 1
    assert math.isfinite(saved['results']['tiny_ppl']['bits_per_byte,none'])
    assert saved['n-samples']['tiny_choice']['effective'] == 3
    assert saved['dllm']['algo'] == name and results['dllm'] == saved['dllm']
    assert ('estimates' in saved['dllm']) == (name != 'ar')
    assert 'tiny_choice' in capsys.readouterr().out               # the table


def test_eval_writes_beside_the_checkpoint_and_refuses_bad_input(ckpts, monkeypatch):
    monkeypatch.chdir(ROOT)
    evaluation.main(['--ckpt', str(ckpts / 'ar.pt'), '--task-dir', TASKS, '--tasks',
                     'tiny_choice', '--dtype', 'float32', '--limit', '1'])
    saved = json.loads((ckpts / 'lm_eval-tiny_choice.json').read_text())
    assert saved['n-samples']['tiny_choice']['effective'] == 1
    with pytest.raises(SystemExit, match='--task-dir nowhere: no such folder'):
        evaluation.main(['--ckpt', str(ckpts / 'ar.pt'), '--task-dir', 'nowhere', '--tasks', 'x'])
    with pytest.raises(SystemExit, match='--mc-samples must be >= 1'):
        evaluation.main(['--ckpt', str(ckpts / 'ar.pt'), '--tasks', 'x', '--mc-samples', '0'])


def test_unknown_tasks_are_refused_after_the_full_index(monkeypatch):
    """A task missing from --task-dir is looked up in lm_eval's own index too (a stand-in here:
    the real one takes ~10 s to scan), and refused in one line if it is in neither."""
    built = []

    class Index:
        def __init__(self, include_path=None, include_defaults=True):
            built.append(include_defaults)
            self.all_tasks = ['tiny_choice'] + ['hellaswag'] * include_defaults
    monkeypatch.setattr(harness, 'TaskManager', Index)
    assert harness.task_manager(['tiny_choice'], TASKS).all_tasks == ['tiny_choice']
    assert built == [False]                                       # the local index sufficed
    assert 'hellaswag' in harness.task_manager(['tiny_choice', 'hellaswag'], TASKS).all_tasks
    with pytest.raises(SystemExit, match='unknown task.*no_such_task'):
        harness.task_manager(['hellaswag', 'no_such_task'], None)


def test_eval_tasks_refuses_in_one_line_without_lm_eval(ckpts, monkeypatch):
    for name in [m for m in sys.modules if m == 'lm_eval' or m.startswith('lm_eval.')]:
        monkeypatch.setitem(sys.modules, name, None)               # import lm_eval fails
    monkeypatch.delitem(sys.modules, 'harness')
    with pytest.raises(SystemExit) as e:
        evaluation.main(['--ckpt', str(ckpts / 'mdlm.pt'), '--tasks', 'hellaswag'])
    assert 'pip install lm-eval' in str(e.value) and '\n' not in str(e.value)


def test_registered_with_lm_eval(ckpts, monkeypatch):
    """lm_eval.simple_evaluate(model='dllm', model_args='ckpt=...,...') builds the adapter from
    eval.py's flags."""
    from lm_eval.evaluator import simple_evaluate
    monkeypatch.chdir(ROOT)
    results = simple_evaluate(model='dllm', model_args=f"ckpt={ckpts / 'duo.pt'},mc_samples=3,"
                              "dtype=float32", tasks=['tiny_choice'], limit=1, log_samples=False,
                              task_manager=harness.TaskManager(include_path=TASKS,
                                                               include_defaults=False))
    assert results['results']['tiny_choice']['sample_len'] == 1
