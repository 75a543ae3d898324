"""eval_nll's estimators of the exact bound (MDLM, Eso-LM, Duo; MATH (10), (21), (33)): with the
exact denoiser of an enumerable toy they give the NLL (MDLM, Eso-LM) with no eps
allowance, their variance stays finite where the old 1/t-weighted estimates
blew up, and eval.py's 95% interval covers the exact value."""
import itertools
import math

import pytest
import torch

import duo
import esolm
import eval as evaluation
import mdlm
from test_duo import args_for as duo_args, exact_nelbo, noisy_oracle
from test_esolm import oracle as esolm_oracle
from test_mdlm import oracle as mdlm_oracle
from toy import conditionals, entropy, toy_distribution
from args import make_args

K, L = 3, 3


def method(name, alpha0, seqs, probs):
    """(module, exact model, args) for a method on the toy."""
    if name == 'mdlm':
        return mdlm, mdlm_oracle(seqs, probs, K), make_args(vocab_size=K, device='cpu')
    if name == 'esolm':
        args = make_args(vocab_size=K, alpha0=alpha0, iw_orders=0, device='cpu')
        return esolm, esolm_oracle(seqs, probs, K), args
    return duo, noisy_oracle(seqs, probs), duo_args(device='cpu')


def stratified(n, g):
    return (torch.rand(1, generator=g) + torch.arange(n)) / n


CASES = [('mdlm', 1.0), ('esolm', 1.0), ('esolm', 0.5), ('esolm', 0.25)]


@pytest.mark.parametrize('name,alpha0', CASES)
def test_estimate_of_the_exact_denoiser_is_the_nll(name, alpha0):
    """For the exact denoiser the bound is -log p(x) for every x (any-order chain
    rule), so each sequence, repeated, is estimated without the data's spread:
    the mean equals -log p(x) within 5 standard errors, with no eps allowance."""
    seqs, probs = toy_distribution(K, L, seed=1)
    algo, model, args = method(name, alpha0, seqs, probs)
    R = 2000
    x = seqs.repeat_interleave(R, 0)
    torch.manual_seed(0)
    u = stratified(R, torch.Generator().manual_seed(0)).repeat(len(seqs))  # stratified per sequence
    est, n = algo.eval_nll(model, x, u, args)
    assert n == L
    est = est.double().view(len(seqs), R)
    nll = -probs.log()
    mean, se = est.mean(1), est.std(1) / math.sqrt(R)
    assert ((mean - nll).abs() < 5 * se + 1e-9).all()
    # all of them at once, an error small against the NLL: a bias of a few % would show
    total_se = se.pow(2).sum().sqrt()
    assert abs(mean.sum() - nll.sum()) < 5 * total_se and total_se < 0.005 * nll.sum()


@pytest.mark.parametrize('name,alpha0', CASES[:3])
def test_estimate_is_bounded(name, alpha0):
    """No 1/t weight: every per-sequence estimate is at most alpha_0 L times the largest
    -log p(x_l | any context), even at the times nearest 0 (u -> 0 and u -> 1).
    The eps-truncated 1/t-weighted estimate reached 1000 times a token's NLL."""
    seqs, probs = toy_distribution(K, L, seed=2)
    algo, model, args = method(name, alpha0, seqs, probs)
    x = seqs.repeat(200, 1)
    torch.manual_seed(0)
    u = torch.cat([torch.full((len(x) // 2,), 1e-9), torch.full((len(x) - len(x) // 2,), 1 - 1e-9)])
    est, _ = algo.eval_nll(model, x, u, args)
    states = torch.tensor(list(itertools.product(range(K + 1), repeat=L)))
    # largest -log p(x_l | context)
    worst = -conditionals(seqs, probs, states, states < K, K).log().min()
    seq_part = 0 if alpha0 == 1 else L * worst  # Eso-LM's sequential term
    assert est.max() <= alpha0 * L * worst + seq_part + 1e-6
    assert (est >= 0).all()


def test_masked_subset_law():
    """k ~ P(Binomial(L, 1 - alpha_0) < k) / (L alpha_0) and a uniform k-subset."""
    L8, n = 8, 40000
    g = torch.Generator().manual_seed(0)
    for alpha0 in (1.0, 0.5):
        torch.manual_seed(1)
        zeros = torch.zeros(n, L8, dtype=torch.long)
        masked, k = mdlm.masked_subset(zeros, stratified(n, g), alpha0)
        assert (masked.sum(1) == k).all() and k.min() >= 1 and k.max() <= L8
        binom = torch.distributions.Binomial(L8, torch.tensor(1 - alpha0, dtype=torch.float64))
        pmf = [binom.log_prob(torch.tensor(float(j), dtype=torch.float64)).exp()
               for j in range(L8)]
        below = torch.stack(pmf).cumsum(0)
        pi = below / (L8 * alpha0)                       # P(Bin < k) / (L alpha_0), k = 1..L8
        assert abs(pi.sum().item() - 1) < 1e-9
        freq = torch.bincount(k - 1, minlength=L8).double() / n
        assert (freq - pi).abs().max() < 1e-3            # stratified: closer than sampling noise
        # every position alike
        assert ((masked.double().mean(0) - (k.double().mean() / L8)).abs() < 0.01).all()


def test_time_conditioned_mdlm_sees_t_given_k():
    """With --time-cond the network sees alpha_t = 1 - t with t ~ Beta(k, L - k + 1):
    E[t | k] = k / (L + 1); the estimate is unchanged (the oracle ignores sigma)."""
    seqs, probs = toy_distribution(K, L, seed=3)
    exact, seen = mdlm_oracle(seqs, probs, K), []

    def model(z, sigma=None, **kw):
        seen.append(((z == K).sum(1), sigma))
        return exact(z, **kw)
    n = 30000
    torch.manual_seed(0)
    x = seqs[torch.multinomial(probs, n, replacement=True)]
    est, _ = mdlm.eval_nll(model, x, torch.rand(n), make_args(vocab_size=K, time_cond=True))
    k, sigma = seen[0]
    t = 1 - torch.exp(-sigma.double())
    for j in range(1, L + 1):
        tj = t[k == j]
        assert abs(tj.mean() - j / (L + 1)) < 5 * tj.std() / math.sqrt(len(tj))
    assert abs(est.double().mean() - entropy(probs)) < 5 * est.double().std() / math.sqrt(n)


def duo_exact():
    seqs, probs = toy_distribution(K, L, seed=0)
    return seqs, probs, exact_nelbo(noisy_oracle(seqs, probs), seqs, probs)


def test_duo_estimate_is_the_nelbo_and_its_variance_stays_finite():
    """Duo: the estimate is unbiased for the exact NELBO (quadrature), which is >= the
    NLL; near t = 0 its spread stays small, where a redrawn token weighs ~1/t in the
    plain estimate (std ~ 1/sqrt(t))."""
    seqs, probs, exact = duo_exact()
    assert exact >= entropy(probs) - 1e-6
    model, args = noisy_oracle(seqs, probs), duo_args()
    S = 40000
    torch.manual_seed(0)
    x = seqs[torch.multinomial(probs, S, replacement=True)]
    est, _ = duo.eval_nll(model, x, stratified(S, torch.Generator().manual_seed(0)), args)
    assert abs(est.mean().item() - exact) < 5 * est.std().item() / math.sqrt(S)
    for t in (1e-4, 1e-6):
        u = torch.full((20000,), 1 - t, dtype=torch.float64)
        est, _ = duo.eval_nll(model, x[:20000], u, args)
        assert est.std() < 3 * math.log(1 / t)


@pytest.mark.parametrize('name,alpha0', [('mdlm', 1.0), ('esolm', 0.5), ('duo', 1.0)])
def test_eval_interval_covers_the_exact_value(name, alpha0):
    """40 independent evaluations, each of 30 batches of 16 sequences from the toy with
    antithetic times per batch (as eval.evaluate draws them), summarised by eval.py's
    normal 95% interval per token: at least 34 of the 40 cover the exact value."""
    seqs, probs = toy_distribution(K, L, seed=0)
    exact = duo_exact()[2] if name == 'duo' else entropy(probs)
    algo, model, args = method(name, alpha0, seqs, probs)
    runs, batches, B = 40, 30, 16
    g = torch.Generator().manual_seed(0)
    x = seqs[torch.multinomial(probs, runs * batches * B, replacement=True, generator=g)]
    u = ((torch.rand(runs * batches, 1, generator=g) + torch.arange(B)) / B).flatten()
    torch.manual_seed(0)
    est, n = algo.eval_nll(model, x, u, args)
    per_batch = (est.double() / n).view(runs, batches, B).mean(2)
    intervals = map(evaluation.summarize, per_batch.tolist())
    covered = sum(lo <= exact / L <= hi for _, _, (lo, hi) in intervals)
    assert covered >= 34


def test_duo_second_moment_stays_bounded_on_data_with_exact_zeros(monkeypatch):
    """Even-parity sequences (the others have probability 0) and their exact denoiser: once one
    token is redrawn, the clean tokens get probability O(t) and their terms grow like 1/t.
    E[J^2 | u] for the stratified u the estimator maps to a time, summed exactly over every
    (x, z_t) with q(z_t | x) at the time the network was given, stays bounded as u -> 1
    (t -> 0): E[J^2] is finite. With t = 1 - u and no weight it would grow like 1/t."""
    Kp, Lp = 2, 3
    seqs = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    probs = (seqs.sum(1) % 2 == 0).double()
    probs = probs / probs.sum()
    support = seqs[probs > 0]
    alphas = []

    def model(z_t, sigma=None, head=None, **kw):  # log p(x_l | z at the other positions)
        a = torch.exp(-sigma.double())[:, None, None]
        alphas.append(a[0, 0, 0])
        q = a * (seqs[None] == z_t[:, None]) + (1 - a) / Kp            # (B, N, L): q(z_l | x_l)
        out = torch.zeros(len(z_t), Lp, Kp, dtype=torch.float64)
        for l in range(Lp):
            w = probs * q.prod(-1) / q[..., l]
            out[:, l].scatter_add_(1, seqs[:, l].expand(len(z_t), -1), w)
        out = (out / out.sum(-1, keepdim=True)).log()
        return out if head is None else head(out)
    x = support.repeat_interleave(len(seqs), 0)            # every (x, z) pair
    z = seqs.repeat(len(support), 1)
    monkeypatch.setattr(duo, 'corrupt', lambda x_, alpha_t, K: z)
    args = duo_args(vocab_size=Kp)
    moments = []
    for u in (0.9, 0.99, 1 - 1e-4, 1 - 1e-6):
        est, _ = duo.eval_nll(model, x, torch.full((len(x),), u, dtype=torch.float64), args)
        a = alphas[-1]                                     # the time the network was given
        q = torch.where(z == x, a + (1 - a) / Kp, (1 - a) / Kp).prod(1)  # q(z_t | x)
        moments.append((q * est.double() ** 2).sum().item() / len(support))
    assert max(moments) < 2 * moments[0], moments
