"""Eso-LM against exact answers on an enumerable toy, its masks, and its KV cache."""
import argparse
import importlib
import itertools
import math

import numpy as np
import pytest
import torch

import esolm
from model import DiT, get_config
from toy import conditionals, toy_distribution, total_variation
from args import make_args

K, L = 3, 3


def diffusion_nll(model, x, masked, K, fused=True):
    """sum over the masked tokens of -log x_theta(x_l | z_t), per sequence (B,)."""
    inputs, targets = esolm.diffusion_inputs(x, masked, K)
    nll = esolm.masked_nll(model, make_args(vocab_size=K, fused=fused), targets, **inputs)
    return esolm.per_sequence(nll, inputs['select'])


def sequential_nll(model, x, masked, order, K, fused=True):
    """sum over the tokens masked in z_0 of -log x_theta(x_l | z_0, x before l) (B,)."""
    inputs, targets = esolm.sequential_inputs(x, masked, order, K)
    nll = esolm.masked_nll(model, make_args(vocab_size=K, fused=fused), targets, **inputs)
    return esolm.per_sequence(nll, masked)


def oracle(seqs, probs, K):
    """A stand-in network that respects attention: the output for a query at
    rotary position p is log p(x_p | the non-[MASK] tokens among the keys that
    query may attend to), exact. Handles causal=True, a boolean mask, explicit
    positions, select, and a KVCache (it keeps the committed ids and positions
    on the cache object). The [MASK] column gets a large finite logit, so a
    loss or sampler that forgets zero masking is caught."""
    L = seqs.shape[1]

    def model(x, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None,
              head=None):
        B, n = x.shape
        assert positions is not None and sigma is None
        if cache is not None:  # queries see every committed key and are causal among themselves
            if not hasattr(cache, 'ids'):
                cache.ids = torch.zeros(B, cache.max_len, dtype=torch.long)
                cache.pos = torch.zeros(B, cache.max_len, dtype=torch.long)
            cache.ids[:, cache.len:cache.len + n] = x
            cache.pos[:, cache.len:cache.len + n] = positions
            ids, pos = cache.ids[:, :cache.len + n], cache.pos[:, :cache.len + n]
            see = torch.arange(cache.len + n) <= cache.len + torch.arange(n)[:, None]
            cache.len += n
        else:
            ids, pos = x, positions
            see = mask if mask is not None else torch.ones(n, n, dtype=torch.bool)
            if causal:
                see = see & torch.ones(n, n, dtype=torch.bool).tril()
        see = see.expand(B, n, ids.shape[1])
        out = torch.full((B, n, K + 1), 5.0, dtype=torch.float64)
        for q in range(n):
            clean = see[:, q] & (ids != K)
            clean_ids = torch.where(clean, ids, -1)
            tokens = torch.full((B, L), -1).scatter_reduce(1, pos, clean_ids, 'amax')
            cond = conditionals(seqs, probs, tokens.clamp(min=0), tokens >= 0, K)  # (B, L, K)
            out[:, q, :K] = cond[torch.arange(B), positions[:, q]].log()
        out = out if select is None else out[select]
        return out if head is None else head(out)
    return model


def recorder(model, calls):
    """Wraps a network: records each call's input and keywords, and the full logits."""
    def rec(x, **kw):
        select, head = kw.pop('select', None), kw.pop('head', None)
        out = model(x, **kw)
        calls.append((x.clone(), kw, out))
        out = out if select is None else out[select]
        return out if head is None else head(out)
    return rec


def tiny_dit(K, seed=0, std=0.3):
    torch.manual_seed(seed)
    model = DiT(get_config('tiny', esolm.vocab_size(K))).eval()
    for p in model.parameters():  # leave the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=std)
    return model


def log_marginal(seqs, probs, x, S):
    """log p(x_S) for each row of x (B, L), S a tuple of positions."""
    known = torch.zeros(L, dtype=torch.bool)
    known[list(S)] = True
    agree = ((seqs[None] == x[:, None]) | ~known).all(-1)
    return (agree * probs).sum(-1).log()


def expected_log_marginal(seqs, probs, x, a):
    """M(a) = E_{S ~ each position kept w.p. a} log p(x_S), exact, per row of x."""
    total = torch.zeros(len(x), dtype=torch.float64)
    for S in itertools.chain.from_iterable(itertools.combinations(range(L), r)
                                           for r in range(L + 1)):
        total += a ** len(S) * (1 - a) ** (L - len(S)) * log_marginal(seqs, probs, x, S)
    return total


def expected_nelbo(seqs, probs, x, alpha0):
    """E[NELBO(x)] for the exact denoiser, per row. The sequential term is
    -log p(x) + M(alpha_0); over u ~ U[0,1) (t in [eps, 1]) the diffusion term is
    (M(alpha_{t=1}) - M(alpha_{t=eps})) / (1 - eps): the any-order chain rule
    telescopes, leaving the eps truncation at both ends."""
    eps = esolm.EPS

    def alpha(t):
        return alpha0 * (1 - (1 - esolm.EPS) * t)

    def M(a):
        return expected_log_marginal(seqs, probs, x, a)

    diffusion = (M(alpha(1.0)) - M(alpha(eps))) / (1 - eps)
    return -log_marginal(seqs, probs, x, range(L)) + M(alpha0) + diffusion


def all_masks():
    return torch.tensor(list(itertools.product([False, True], repeat=L)))


# ----------------------------------------------------------------------------
# loss

@pytest.mark.parametrize('alpha0', [1.0, 0.5, 0.0])
def test_nelbo_of_exact_conditionals_is_the_nll(alpha0):
    """Exact expectations, no Monte Carlo: every mask enumerated, the t integral by
    Gauss-Legendre (the integrand is a polynomial of degree L-1 in u). Per
    sequence, the NELBO of the exact conditionals must be -log p(x) up to the
    eps truncation, which is computed exactly too."""
    seqs, probs = toy_distribution(K, L, seed=1)
    model, eps = oracle(seqs, probs, K), esolm.EPS
    masks = all_masks()
    nodes, weights = [torch.tensor(v) for v in np.polynomial.legendre.leggauss(4)]
    u, wu = (nodes + 1) / 2, weights / 2                                     # quadrature on [0, 1]
    nelbo = torch.zeros(len(seqs), dtype=torch.float64)
    for m in masks:
        mask = m.expand(len(seqs), L)
        n_masked = int(m.sum())
        if alpha0 > 0:  # diffusion term: E_u [ -alpha'/(1-alpha) E_{z_t} sum_masked -log x_theta ]
            for uj, wj in zip(u, wu):
                a = alpha0 * (1 - (1 - eps) * (eps + (1 - eps) * uj))
                p_mask = a ** (L - n_masked) * (1 - a) ** n_masked
                nll = diffusion_nll(model, seqs, mask, K)
                nelbo += wj * p_mask * alpha0 * (1 - eps) / (1 - a) * nll
        if alpha0 < 1:
            # sequential term: E_{z_0} sum_masked -log x_theta(x_l | clean, masked before l)
            p_mask = alpha0 ** (L - n_masked) * (1 - alpha0) ** n_masked
            order = esolm.sort_order(mask, masked_left_to_right=True)
            nelbo += p_mask * sequential_nll(model, seqs, mask, order, K)
    expected = expected_nelbo(seqs, probs, seqs, alpha0)
    assert torch.allclose(nelbo, expected, rtol=0, atol=1e-9), (nelbo - expected).abs().max()
    nll = -probs.log()
    assert ((nelbo - nll).abs() <= 3 * eps * nll).all()  # and that is the NLL, but for O(eps)


@pytest.mark.parametrize('alpha0', [1.0, 0.5])
def test_eval_nll_and_train_loss_estimate_the_nelbo(alpha0):
    """End to end (masks drawn inside, the true weight): the Monte Carlo mean of
    eval_nll, and of the elbo training loss times L, match the exact expected
    NELBO of the exact conditionals within their standard error."""
    torch.manual_seed(0)
    seqs, probs = toy_distribution(K, L, seed=1)
    model = oracle(seqs, probs, K)
    split = 1.0 if alpha0 == 1 else 0.5
    args = make_args(vocab_size=K, alpha0=alpha0, batch_split=split, loss='elbo', iw_orders=0)
    R, B = 8, 2048
    evals, trains = [], []
    for _ in range(R):
        x = seqs[torch.multinomial(probs, B, replacement=True)]
        u = ((torch.rand(1) + torch.arange(B)) / B).double()  # MATH (4): stratified times
        nll, n = esolm.eval_nll(model, x, u, args)
        assert n == L and nll.shape == (B,)
        evals.append(nll.mean())
        trains.append(esolm.train_loss(model, x, u, args, 0, {}) * L)
    expected = (probs * expected_nelbo(seqs, probs, seqs, alpha0)).sum()
    for est in (torch.stack(evals), torch.stack(trains)):
        se = est.std() / math.sqrt(R)
        assert abs(est.mean() - expected) < 4 * se + 1e-3, (est.mean(), expected, se)
        assert se < 0.02 * expected  # sharp enough: a wrong weight or masking rate is far off


def test_alpha0_zero_is_the_ar_loss():
    """At alpha_0 = 0 every token is masked in z_0 and the order is left to right:
    the NELBO is the exact AR negative log-likelihood, deterministically."""
    seqs, probs = toy_distribution(K, L, seed=2)
    model = oracle(seqs, probs, K)
    args = make_args(vocab_size=K, alpha0=0.0, batch_split=0.0, loss='low_var')
    nll, n = esolm.eval_nll(model, seqs, torch.rand(len(seqs)), args)
    assert n == L and torch.allclose(nll, -probs.log(), rtol=0, atol=1e-12)
    loss = esolm.train_loss(model, seqs, torch.rand(len(seqs)), args, 0, {})
    assert abs(loss.item() - (-probs.log()).mean().item() / L) < 1e-12


@pytest.mark.parametrize('alpha0', [1.0, 0.5, 0.0])
def test_importance_weighted_bound_of_exact_conditionals_is_the_nll(alpha0):
    """For exact conditionals p(x | order) = p(x) for every order, so the bound is tight."""
    torch.manual_seed(0)
    seqs, probs = toy_distribution(K, L, seed=3)
    args = make_args(vocab_size=K, alpha0=alpha0, iw_orders=3)
    nll, n = esolm.eval_nll(oracle(seqs, probs, K), seqs, torch.rand(len(seqs)), args)
    assert n == L and torch.allclose(nll, -probs.log(), rtol=0, atol=1e-9)


def test_importance_weighted_bound_tightens_with_more_orders():
    """With a real (imperfect) network: -log of the mean likelihood over orders is at
    most the mean of -log (Jensen), and here strictly below it."""
    torch.manual_seed(0)
    model = tiny_dit(7)
    x = torch.randint(0, 7, (4, 6))
    args = make_args(vocab_size=7, alpha0=0.5, iw_orders=1)
    torch.manual_seed(1)
    one = torch.stack([esolm.eval_nll(model, x, None, args)[0] for _ in range(16)], 1)
    args.iw_orders = 16
    torch.manual_seed(1)
    many = esolm.eval_nll(model, x, None, args)[0]
    assert torch.allclose(many, -(-one).logsumexp(1) + math.log(16), atol=1e-5)  # same 16 orders
    assert (many < one.mean(1) - 1e-3).all()


def test_batch_split_keeps_the_times_stratified():
    """The trainer's u ascends over a micro-batch; the diffusion rows (half of them
    here) must still get times spread over [0, 1), not only the first half."""
    torch.manual_seed(0)
    Kb, B, n = 5, 8, 400
    calls = []
    args = make_args(vocab_size=Kb, alpha0=0.5, batch_split=0.5, loss='low_var')
    u = (torch.rand(1) + torch.arange(B)) / B
    esolm.train_loss(recorder(tiny_dit(Kb), calls), torch.randint(0, Kb, (B, n)), u, args, 0, {})
    (z, kw, _), (z0x, kw0, _) = calls
    assert z.shape == (B // 2, n) and kw['causal']
    assert z0x.shape == (B // 2, 2 * n) and kw0['mask'].shape == (2 * n, 2 * n)
    # masked = 1 - alpha_0 (1 - t), about
    t = ((z == Kb).float().mean(1) - (1 - args.alpha0)) / args.alpha0
    assert t.max() > 0.6 and t.min() < 0.3  # u[:4] would give t < 0.5 only


# ----------------------------------------------------------------------------
# what each position may see

def test_sequential_mask_entries():
    """MATH (31), entry by entry: z_0 query i sees itself and x keys j < i; x query i
    sees x keys j <= i; x never sees z_0."""
    n = 5
    m = esolm.sequential_mask(n, 'cpu')
    for q, k in itertools.product(range(2 * n), repeat=2):
        if q < n:
            expected = (k == q) or (k >= n and k - n < q)
        else:
            expected = k >= n and k - n <= q - n
        assert m[q, k].item() == expected, (q, k)


def test_sequential_loss_sees_no_later_token_and_no_other_z0_token():
    """With a real network: the logits of masked z_0 position i change when an x
    token before i (in the order) changes, and not when x at or after i, or z_0
    elsewhere, changes."""
    Kb, n = 11, 6
    model = tiny_dit(Kb, std=0.1)  # small weights: attention does not saturate, every key matters
    torch.manual_seed(1)
    x = torch.randint(0, Kb, (1, n))
    order = torch.randperm(n)[None]
    sorted_masked = torch.tensor([[False, True, False, True, True, True]])
    masked = sorted_masked.gather(1, order.argsort(1))  # at original positions

    def logits(x, masked):
        calls = []
        sequential_nll(recorder(model, calls), x, masked, order, Kb)
        return calls[0][2][0, :n, :Kb]  # z_0 rows, in sorted order (padding columns are -inf)

    base = logits(x, masked)
    for i in (1, 3, 5):            # masked z_0 positions (sorted index)
        for j in range(n):         # change x at sorted position j
            x2 = x.clone()
            x2[0, order[0, j]] = (x2[0, order[0, j]] + 1) % Kb
            diff = (logits(x2, masked)[i] - base[i]).abs().max()
            assert diff > 1e-4 if j < i else diff < 1e-6, (i, j, diff)
        for j in range(n):         # unmask/mask another z_0 token: the x stream is the same
            if j != i:
                m2 = masked.clone()
                m2[0, order[0, j]] = ~m2[0, order[0, j]]
                assert (logits(x, m2)[i] - base[i]).abs().max() < 1e-6, (i, j)


def test_diffusion_loss_cannot_see_masked_tokens():
    """z_t hides masked tokens: changing x there leaves every logit unchanged;
    changing a clean token does not (the check can fail)."""
    Kb, n = 11, 8
    model = tiny_dit(Kb, std=0.1)
    torch.manual_seed(1)
    x = torch.randint(0, Kb, (2, n))
    masked = torch.rand(2, n) < 0.5
    masked[:, 0], masked[:, 1] = True, False

    def logits(x):
        calls = []
        torch.manual_seed(2)  # the same random order each time
        diffusion_nll(recorder(model, calls), x, masked, Kb)
        (z, kw, out), = calls
        assert kw['causal'] and (z == Kb).sum() == masked.sum()
        return out[..., :Kb]
    base = logits(x)
    assert (logits(torch.where(masked, (x + 1) % Kb, x)) - base).abs().max() < 1e-6
    x2 = x.clone()
    x2[:, 1] = (x2[:, 1] + 1) % Kb
    assert (logits(x2) - base).abs().max() > 1e-4


# ----------------------------------------------------------------------------
# sampler

@pytest.mark.parametrize('alpha0', [1.0, 0.5, 0.0])
def test_sampler_reproduces_the_distribution(alpha0):
    torch.manual_seed(0)
    seqs, probs = toy_distribution(K, L, seed=4)
    S = 20000
    args = make_args(vocab_size=K, alpha0=alpha0, steps=1000, cache=True, top_p=1.0, float64=True)
    samples, nfe = esolm.sample(oracle(seqs, probs, K), args, S, L)
    assert nfe <= L
    # TV of an exact sampler with S draws over 27 cells is ~0.015; a wrong one is far above
    assert total_variation(samples, seqs, probs) < 0.03
    if alpha0 == 1:  # one step: all tokens at once, independently - the product of marginals
        args.steps = 1
        samples, nfe = esolm.sample(oracle(seqs, probs, K), args, S, L)
        assert nfe == 1 and total_variation(samples, seqs, probs) > 0.06


def test_sampler_with_prompt_reproduces_the_distribution():
    """Prompt tokens come first in the order and are kept: with X_1 drawn from its
    marginal as the prompt, the samples follow the joint."""
    torch.manual_seed(0)
    seqs, probs = toy_distribution(K, L, seed=5)
    S = 20000
    first = seqs[torch.multinomial(probs, S, replacement=True), :1]
    args = make_args(vocab_size=K, alpha0=0.5, steps=500, cache=True, top_p=1.0, float64=True)
    samples, nfe = esolm.sample(oracle(seqs, probs, K), args, S, L, prompt=first)
    assert torch.equal(samples[:, :1], first) and nfe <= L - 1
    assert total_variation(samples, seqs, probs) < 0.03


def test_diffusion_counts_follow_the_reverse_process():
    """Each of n masked tokens is revealed during the diffusion phase with
    probability (alpha_0 - alpha_1) / (1 - alpha_1), whatever the number of steps."""
    torch.manual_seed(0)
    n, alpha0 = 40, 0.5
    p = (alpha0 - alpha0 * esolm.EPS) / (1 - alpha0 * esolm.EPS)
    for steps in (1, 7, 100):
        D = torch.tensor([float(sum(esolm.unmask_counts(n, steps, alpha0)[0])) for _ in range(400)])
        assert abs(D.mean() - n * p) < 4 * math.sqrt(n * p * (1 - p) / 400)
        assert abs(D.var() / (n * p * (1 - p)) - 1) < 0.3   # binomial spread, not a fixed count

    # two steps at alpha_0 = 1: the first reveals Binomial(n, q)
    def a(t):
        return 1 - (1 - esolm.EPS) * t

    q = (a(0.5) - a(1)) / (1 - a(1))
    first = torch.tensor([float(esolm.unmask_counts(n, 2, 1.0)[0][0]) for _ in range(400)])
    assert abs(first.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / 400)
    counts, left = esolm.unmask_counts(n, 10, 1.0)
    assert left == 0 and sum(counts) == n and len(counts) <= 10 and min(counts) > 0


@pytest.mark.parametrize('alpha0', [1.0, 0.5, 0.0])
def test_kv_cache_sampling_equals_full_recompute(alpha0):
    """Same seed, same tokens and NFE, in both phases; with the cache each call runs
    only the tokens decided last step plus those decided now."""
    Kb, n, length, P = 50, 3, 40, 5
    model = tiny_dit(Kb)
    prompt = torch.randint(0, Kb, (n, P))
    args = make_args(vocab_size=Kb, alpha0=alpha0, steps=25, cache=True, top_p=0.9, float64=True)
    calls = []
    torch.manual_seed(1)
    a, nfe_a = esolm.sample(recorder(model, calls), args, n, length, prompt)
    args.cache = False
    torch.manual_seed(1)
    b, nfe_b = esolm.sample(model, args, n, length, prompt)
    assert torch.equal(a, b) and nfe_a == nfe_b == len(calls)
    assert torch.equal(a[:, :P], prompt) and (a < Kb).all()
    # width of each cached call = (decided last step) + (decided now); masks are only at the end
    k_prev, decided = P, []
    for z, kw, out in calls:
        k_now = int((z == Kb).sum(1)[0])
        assert z.shape[1] == k_prev + k_now
        assert (z[:, k_prev:] == Kb).all() and (z[:, :k_prev] < Kb).all()
        decided.append(kw['positions'][:, k_prev:])
        k_prev = k_now
    decided = torch.cat(decided, 1)  # positions in the order they were decided: each once
    assert torch.equal(decided.sort(1).values, torch.arange(P, length).expand(n, -1))
    if alpha0 == 0:  # pure AR: one token per call, left to right
        assert nfe_a == length - P and torch.equal(decided, torch.arange(P, length).expand(n, -1))
    if alpha0 == 1:
        assert nfe_a <= args.steps


# ----------------------------------------------------------------------------
# contract

def test_flags_and_errors():
    parser = argparse.ArgumentParser()
    for name in ('ar', 'mdlm', 'duo', 'esolm'):  # flag names must not clash across methods
        importlib.import_module(name).add_args(parser.add_argument_group(name))
    args = parser.parse_args(['--alpha0', '0.25', '--batch-split', '0.5', '--iw-orders', '4'])
    assert (args.alpha0, args.batch_split, args.iw_orders, args.loss) == (0.25, 0.5, 4, 'low_var')
    assert esolm.vocab_size(50257) == 50258 and not esolm.EXACT
    x, u = torch.zeros(4, 3, dtype=torch.long), torch.rand(4)
    bad_args = [(dict(alpha0=1.5), '--alpha0'),
                (dict(alpha0=0.5, batch_split=1.0), '--batch-split'),
                (dict(alpha0=1.0, batch_split=0.5), '--batch-split'),
                (dict(alpha0=0.0, batch_split=1.0), '--batch-split'),
                (dict(alpha0=0.5, batch_split=0.1), '--micro-batch-size'),
                (dict(time_cond=True), '--time-cond')]
    for bad, needle in bad_args:
        a = make_args(**{**dict(vocab_size=3, alpha0=1.0, batch_split=1.0, loss='low_var'), **bad})
        with pytest.raises(ValueError, match=needle):
            esolm.check_args(a, training=True)
            esolm.train_loss(lambda *a, **k: None, x, u, a, 0, {})
    prompt = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match='prompt'):
        esolm.sample(None, make_args(vocab_size=3), 2, 4, prompt=prompt)
