"""Evaluation against exact answers: eval.py's likelihood and confidence
interval, and sample.py's judge (generative perplexity, entropy, --steps list)."""
import argparse
import itertools
import json
import math

import numpy as np
import pytest
import torch

import ar
import data
import eval as evaluation
import mdlm
import sample
import train
from args import make_args
from checkpoint import load_model
from model import cross_entropy
from toy import conditionals, toy_distribution

K, L = 3, 3
TEXT = ('When forty winters shall besiege thy brow, and dig deep trenches in thy beauty\'s field, '
        'thy youth\'s proud livery so gazed on now, will be a tattered weed of small worth held. ')


def toy_stream(seqs, probs, n, seed=0):
    """n draws from the toy distribution, concatenated into one token stream."""
    g = torch.Generator().manual_seed(seed)
    rows = seqs[torch.multinomial(probs, n, replacement=True, generator=g)]
    return rows, rows.flatten().numpy()


def ar_oracle(seqs, probs):
    """Stand-in AR network: logits at l = log p(x_{l+1} | x_<=l), exact."""
    def model(x, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None,
              head=None):
        B, n = x.shape
        padded = torch.cat([x, torch.zeros(B, L - n, dtype=torch.long)], 1)
        out = torch.empty(B, n, K, dtype=torch.float64)
        for l in range(n):
            known = (torch.arange(L) <= l).expand(B, L)
            out[:, l] = conditionals(seqs, probs, padded, known, K)[:, l + 1]
        return out.log() if head is None else head(out.log())
    return model


def mdlm_oracle(seqs, probs):
    """Stand-in MDLM denoiser: log p(x_l | unmasked tokens), exact; [MASK] column finite."""
    states = torch.tensor(list(itertools.product(range(K + 1), repeat=L)))
    table = conditionals(seqs, probs, states, states < K, K).log()
    table = torch.cat([table, torch.full((len(states), L, 1), 5.0, dtype=table.dtype)], -1)
    base = (K + 1) ** torch.arange(L - 1, -1, -1)

    def model(z, sigma=None, select=None, head=None, **kw):
        out = table[(z * base).sum(-1)][select]
        return out if head is None else head(out)
    return model


def log_prob(seqs, probs, rows):
    """log p(row) for rows (n, L), from the table."""
    base = K ** torch.arange(L - 1, -1, -1)
    return probs[(rows * base).sum(-1)].log()


# ----------------------------------------------------------------------------
# eval.py: windows, the estimate and its confidence interval

def test_windows_are_consecutive_and_spread_evenly():
    stream = np.arange(1000)
    b = evaluation.windows(stream, 10, 4, max_batches=1000)  # all 100 windows
    assert b.shape == (25, 4, 10) and torch.equal(b.flatten(), torch.arange(1000))
    b = evaluation.windows(stream, 10, 4, max_batches=5)     # 20 of them, first and last included
    starts = b[:, :, 0].flatten()
    assert b.shape == (5, 4, 10) and starts[0] == 0 and starts[-1] == 990
    assert (starts.diff() > 0).all()
    with pytest.raises(SystemExit, match='lower --batch-size'):
        evaluation.windows(stream[:30], 10, 4, 5)


def test_evaluate_draws_antithetic_times():
    """u_i = (u + i) / B over each batch (MATH (4)), a fresh u for each batch and repeat."""
    seen = []

    def eval_nll(model, x, u, args):
        seen.append(u)
        return torch.zeros(len(x)), 1

    algo = argparse.Namespace(eval_nll=eval_nll)
    batches = torch.zeros(3, 8, 4, dtype=torch.long)
    evaluation.evaluate(None, algo, argparse.Namespace(device='cpu'), batches, repeats=2)
    assert len(seen) == 6
    for u in seen:
        assert 0 <= u[0] < 1 / 8 and torch.allclose(u - u[0], torch.arange(8) / 8, atol=1e-6)
    assert len({u[0].item() for u in seen}) == 6


def test_ar_estimate_is_the_exact_nll_of_the_windows():
    seqs, probs = toy_distribution(K, L, seed=3)
    rows, stream = toy_stream(seqs, probs, 64)
    batches = evaluation.windows(stream, L, 8, 100)
    args = make_args(device='cpu', vocab_size=K)
    per_batch = evaluation.evaluate(ar_oracle(seqs, probs), ar, args, batches)
    # AR scores x_2..x_L given x_1: -log p(x) + log p(x_1), per predicted token
    p1 = torch.zeros(K, dtype=torch.float64).index_add_(0, seqs[:, 0], probs)
    per_row = -(log_prob(seqs, probs, rows)) + p1[rows[:, 0]].log()
    exact = per_row.view(8, 8).sum(1) / (8 * (L - 1))
    assert np.allclose(per_batch, exact.numpy(), atol=1e-12)
    mean, se, (lo, hi) = evaluation.summarize(per_batch)
    assert mean == pytest.approx(exact.mean().item(), abs=1e-12)
    assert se == pytest.approx(exact.std().item() / math.sqrt(8), rel=1e-9)
    assert lo == pytest.approx(mean - 1.96 * se) and hi == pytest.approx(mean + 1.96 * se)


def test_mdlm_bound_and_its_interval_cover_the_exact_nll():
    torch.manual_seed(0)
    seqs, probs = toy_distribution(K, L, seed=4)
    rows, stream = toy_stream(seqs, probs, 4000)
    batches = evaluation.windows(stream, L, 40, 100)
    args = make_args(device='cpu', vocab_size=K)
    per_batch = evaluation.evaluate(mdlm_oracle(seqs, probs), mdlm, args, batches, repeats=2)
    mean, se, (lo, hi) = evaluation.summarize(per_batch)
    exact = -log_prob(seqs, probs, rows).mean().item() / L  # NLL per token of these very windows
    assert 0 < se < 0.02
    # unbiased for the NLL (one draw: 3 SE; coverage: tests/test_bounds.py)
    assert abs(mean - exact) < 3 * se
    # a wrong estimator (the low_var loss: weight 1 instead of 1/t) lands far outside it
    def low_var(model, x, u, a):
        t = mdlm.EPS + (1 - mdlm.EPS) * u
        masked = mdlm.corrupt(x, mdlm.schedule(t)[0], K) == K
        nll = cross_entropy(model(torch.where(masked, K, x), select=masked), x[masked], K)
        rows = masked.nonzero()[:, 0]
        return torch.zeros(x.shape[0], dtype=nll.dtype).index_add(0, rows, nll), x.shape[1]
    wrong, _, _ = evaluation.summarize(evaluation.evaluate(
        mdlm_oracle(seqs, probs), argparse.Namespace(eval_nll=low_var), args, batches))
    assert wrong < lo - 0.1


# ----------------------------------------------------------------------------
# checkpoints for the command-line tests: tiny AR and MDLM on a tiny local corpus

@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('eval')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, 'DATA_DIR', str(tmp / 'data'))
        for name, n in (('corpus', 12), ('other', 6)):
            (tmp / name).mkdir()
            for i in range(n):
                text = TEXT[i * 7 % 50:] * 2 if name == 'corpus' else TEXT.upper()
                (tmp / name / f'{i}.txt').write_text(text)
        common = ['--size', 'tiny', '--tokenizer', 'byte', '--dataset', str(tmp / 'corpus'),
                  '--block-size', '32', '--batch-size', '4', '--eval-iters', '1',
                  '--dtype', 'float32', '--device', 'cpu', '--no-compile', '--lr', '3e-3']
        train.main(common + ['--algo', 'ar', '--max-iters', '30', '--eval-interval', '30',
                             '--out-dir', str(tmp / 'ar')])
        train.main(common + ['--algo', 'mdlm', '--max-iters', '3', '--eval-interval', '3',
                             '--out-dir', str(tmp / 'mdlm')])
        yield tmp


def ar_nll_of_windows(ckpt_path, data_dir, block):
    """Independent check: ar.eval_nll over every window of the val split."""
    model, _ = load_model(ckpt_path, 'cpu')
    meta = data.load_meta(data_dir)
    val = np.fromfile(f'{data_dir}/val.bin', dtype=meta['dtype']).astype(np.int64)
    n = len(val) // block
    x = torch.from_numpy(val[:n * block]).view(n, block)
    nll, tokens = ar.eval_nll(model, x, None, make_args(vocab_size=257))
    return nll.sum().item() / (n * tokens), n


def test_eval_cli_ar_is_exact_and_zero_shot_is_the_same_command(ckpts, capsys, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(ckpts / 'data'))
    ckpt = str(ckpts / 'ar' / 'ckpt.pt')
    r = evaluation.main(['--ckpt', ckpt, '--batch-size', '1', '--max-batches', '100000', '--json'])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == r
    expected, n = ar_nll_of_windows(ckpt, data.dataset_dir(str(ckpts / 'corpus'), 'byte'), 32)
    assert r['exact'] and r['windows'] == n and r['nll'] == pytest.approx(expected, rel=1e-6)
    assert r['ppl'] == pytest.approx(math.exp(expected), rel=1e-6) and 'PPL <=' not in out
    assert r['ci95'][0] < r['nll'] < r['ci95'][1]
    zero = evaluation.main(['--ckpt', ckpt, '--dataset', str(ckpts / 'other'), '--batch-size', '1',
                            '--max-batches', '100000'])
    expected, _ = ar_nll_of_windows(ckpt, data.dataset_dir(str(ckpts / 'other'), 'byte'), 32)
    assert zero['dataset'] == str(ckpts / 'other')
    assert zero['nll'] == pytest.approx(expected, rel=1e-6)


def test_eval_cli_labels_diffusion_as_a_bound(ckpts, capsys, monkeypatch):
    monkeypatch.setattr(data, 'DATA_DIR', str(ckpts / 'data'))
    ckpt = str(ckpts / 'mdlm' / 'ckpt.pt')
    r = evaluation.main(['--ckpt', ckpt, '--max-batches', '2', '--batch-size', '2'])
    out = capsys.readouterr().out
    assert not r['exact'] and r['batches'] == 2 and 'NELBO' in out and 'PPL <= ' in out
    r2 = evaluation.main(['--ckpt', ckpt, '--max-batches', '2', '--batch-size', '2'])
    assert r2['nll'] == r['nll']  # seeded: the same draws
    with pytest.raises(SystemExit, match='--repeats'):
        evaluation.main(['--ckpt', ckpt, '--repeats', '0'])


# ----------------------------------------------------------------------------
# sample.py --judge: generative perplexity and entropy

def bigram_judge(P, tok, context):
    """A judge whose next-token law depends on the current token only: P[a, b]."""
    return evaluation.Judge('bigram', tok, lambda ids: P.log()[ids], context)


def test_judge_nll_is_exact_and_windowing_loses_nothing_for_a_bigram_judge():
    g = torch.Generator().manual_seed(0)
    P = torch.rand(5, 5, generator=g, dtype=torch.float64) + 0.1
    P /= P.sum(1, keepdim=True)
    tok = data.Tokenizer('toy', None, None, 5, 4)
    ids = torch.randint(0, 5, (3, 11), generator=g)
    start = 3
    exact = -sum(P[ids[b, j - 1], ids[b, j]].log().item()
                 for b in range(3) for j in range(start, 11))
    for context in (2, 3, 4, 100):
        nll, n = evaluation.judge_nll(bigram_judge(P, tok, context), ids, start)
        assert n == 3 * (11 - start) and nll == pytest.approx(exact, rel=1e-12), context


def test_unigram_entropy_in_nats():
    assert evaluation.unigram_entropy(torch.tensor([0, 0, 1, 1])) == pytest.approx(math.log(2))
    assert evaluation.unigram_entropy(torch.tensor([7, 7, 7])) == 0
    assert evaluation.unigram_entropy(torch.tensor([0, 1, 2, 3, 3, 3])) == pytest.approx(
        -(3 * (1 / 6) * math.log(1 / 6) + 0.5 * math.log(0.5)))


def test_score_with_the_exact_toy_judge_is_the_true_perplexity():
    seqs, probs = toy_distribution(K, L, seed=5)
    rows, _ = toy_stream(seqs, probs, 50)
    toy_tokenizer = data.Tokenizer('toy', None, None, K, 0)
    judge = evaluation.Judge('toy', toy_tokenizer, ar_oracle(seqs, probs), L)
    gen_ppl, entropy, n = evaluation.score(judge, rows, 1, judge.tokenizer)  # first token given
    p1 = torch.zeros(K, dtype=torch.float64).index_add_(0, seqs[:, 0], probs)
    nll = (-log_prob(seqs, probs, rows) + p1[rows[:, 0]].log()).sum().item()
    assert n == 50 * (L - 1) and gen_ppl == pytest.approx(math.exp(nll / n), rel=1e-10)
    expected = np.mean([evaluation.unigram_entropy(r[1:]) for r in rows])
    assert entropy == pytest.approx(expected)


def test_other_tokenizer_judge_retokenises_through_text():
    byte = data.get_tokenizer('byte')

    def encode(s):
        return [hash(s[i:i + 2]) % 90 for i in range(0, len(s), 2)]

    pairs = data.Tokenizer('pairs', encode, None, 100, 99)
    row = [256] + list(b'Hi') + list(b'ab cd') + [256] + list(b'e')
    assert evaluation.retokenize(row[:3], byte, pairs) == [99] + pairs.encode('Hi')
    expected = pairs.encode('ab cd') + [99] + pairs.encode('e')
    assert evaluation.retokenize(row[3:], byte, pairs) == expected
    uniform = evaluation.Judge('pairs', pairs, lambda ids: torch.zeros(*ids.shape, 100), 4)
    gen_ppl, _, n = evaluation.score(uniform, torch.tensor([row]), 3, byte)
    assert n == 3 + 1 + 1 and gen_ppl == pytest.approx(100)  # only the generated part is scored


def test_sample_cli_judge_steps_list_and_json(ckpts, capsys):
    judge = str(ckpts / 'ar' / 'ckpt.pt')
    tokens, nfe = sample.main(['--ckpt', str(ckpts / 'mdlm' / 'ckpt.pt'), '--judge', judge,
                               '--steps', '2,6', '--num-samples', '3', '--length', '20', '--json',
                               '--dtype', 'float32', '--show', '0'])
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    assert [r['steps'] for r in recs] == [2, 6] and all(r['nfe'] <= r['steps'] + 1 for r in recs)
    assert '| steps | nfe | seconds | gen_ppl | entropy_nats |' in out and '--- sample' not in out
    # same tokenizer: Gen PPL is exp of ar.eval_nll on the same tokens (the start token is context)
    model, _ = load_model(judge, 'cpu')
    nll, per_seq = ar.eval_nll(model, tokens, None, make_args(vocab_size=257))
    gen_ppl = math.exp(nll.sum().item() / (3 * per_seq))
    assert recs[-1]['gen_ppl'] == pytest.approx(gen_ppl, rel=1e-5)
    assert recs[-1]['judge_tokens'] == 3 * 19
    entropy = np.mean([evaluation.unigram_entropy(r[1:]) for r in tokens])
    assert recs[-1]['entropy_nats'] == pytest.approx(entropy)
    # a single --steps value keeps the plain (tokens, NFE) result and no table
    sample.main(['--ckpt', str(ckpts / 'mdlm' / 'ckpt.pt'), '--steps', '4', '--num-samples', '1',
                 '--length', '8'])
    assert '| steps' not in capsys.readouterr().out


def test_judge_errors_are_one_clear_line(ckpts, monkeypatch):
    # as where it is not installed
    monkeypatch.setitem(__import__('sys').modules, 'transformers', None)
    mdlm_ckpt = str(ckpts / 'mdlm' / 'ckpt.pt')
    cases = [('gpt2-large', 'pip install transformers'),
             (mdlm_ckpt, 'the judge must be an AR model'),
             (str(ckpts / 'nothing.pt'), 'no checkpoint at')]
    for judge, says in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(['--ckpt', mdlm_ckpt, '--judge', judge, '--num-samples', '1',
                         '--length', '8'])
        msg = str(e.value)
        assert says in msg and '\n' not in msg, msg
    with pytest.raises(SystemExit, match='comma-separated list'):
        sample.main(['--ckpt', mdlm_ckpt, '--steps', '8,x'])
