"""MDLM against exact answers on an enumerable toy, and its sampler's contracts."""
import argparse
import itertools
import math

import pytest
import torch

import ar
import mdlm
from model import DiT, get_config
from toy import conditionals, entropy, toy_distribution, total_variation
from args import make_args


def oracle(seqs, probs, K):
    """A stand-in network: at every position, log p(x_l | the unmasked tokens of z),
    exact (the Bayes-optimal denoiser), looked up in a table over all (K+1)^L
    inputs. The [MASK] column gets a large finite logit, so a loss or sampler
    that forgets zero masking is caught."""
    L = seqs.shape[1]
    states = torch.tensor(list(itertools.product(range(K + 1), repeat=L)))
    table = conditionals(seqs, probs, states, states < K, K).log()              # (S, L, K)
    table = torch.cat([table, torch.full((len(states), L, 1), 5.0, dtype=table.dtype)], -1)
    base = (K + 1) ** torch.arange(L - 1, -1, -1)

    def model(z, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None,
              head=None):
        assert not causal and mask is None and cache is None and positions is None
        out = table[(z * base).sum(-1)]
        out = out if select is None else out[select]
        return out if head is None else head(out)
    return model


def recorder(model, calls):
    """Wraps a network and records every call's input and keyword arguments."""
    def rec(z, **kw):
        calls.append((z.clone(), kw))
        return model(z, **kw)
    return rec


def tiny_dit(K, seed=0):
    torch.manual_seed(seed)
    model = DiT(get_config('tiny', mdlm.vocab_size(K))).eval()
    for p in model.parameters():  # leave the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.3)
    return model


def marginals(seqs, probs, K):
    """p(x_l = k) for every position: (L, K)."""
    return torch.stack([torch.zeros(K, dtype=torch.float64).index_add_(0, seqs[:, l], probs)
                        for l in range(seqs.shape[1])])


# ----------------------------------------------------------------------------
# loss

@pytest.mark.parametrize('K, L', [(3, 2), (3, 5)])
def test_nelbo_of_exact_denoiser_is_the_entropy(K, L):
    """Masked diffusion's bound is tight for the exact denoiser: the Monte Carlo
    NELBO equals H(p) up to its standard error (eval_nll has no eps truncation)."""
    torch.manual_seed(0)
    seqs, probs = toy_distribution(K, L, seed=3)
    model, args = oracle(seqs, probs, K), make_args(vocab_size=K, loss='low_var')
    R, B = 32, 16384  # R independent replicates, each with antithetic times over its batch
    means = []
    for _ in range(R):
        x = seqs[torch.multinomial(probs, B, replacement=True)]
        u = (torch.rand(1) / B + torch.arange(B) / B) % 1  # MATH (4): stratified times
        nll, n = mdlm.eval_nll(model, x, u, args)
        assert n == L and nll.shape == (B,)
        means.append(nll.double().mean())
    means = torch.stack(means)
    nelbo, se = means.mean().item(), (means.std() / math.sqrt(R)).item()
    H = entropy(probs)
    assert abs(nelbo - H) < 4 * se, (nelbo, H, se)
    assert se < 0.004 * H  # the test is sharp: a wrong weight (e.g. 1, or 1/(1-t)) is far off


def test_low_var_and_elbo_differ_only_by_the_weight():
    """Same batch, times and masks: low_var = CE on masked tokens, elbo = the same
    terms weighted by -alpha'_t/(1-alpha_t) = 1/t."""
    K = 11
    net, calls = tiny_dit(K), []
    model = recorder(net, calls)
    x = torch.randint(0, K, (4, 32))
    u = torch.tensor([0.1, 0.4, 0.6, 0.9])
    args = make_args(vocab_size=K, loss='low_var', time_cond=False)
    torch.manual_seed(5)
    low = mdlm.train_loss(model, x, u, args, 0, {})
    args.loss = 'elbo'
    torch.manual_seed(5)
    elbo = mdlm.train_loss(model, x, u, args, 0, {})
    z, kw = calls[0]
    masked = z == K
    assert all(torch.equal(c[0], z) for c in calls)                   # same z_t each time
    assert torch.equal(kw['select'], masked) and kw['sigma'] is None  # output layer only at masks
    assert torch.equal(z[~masked], x[~masked]) and 20 < masked.sum() < 108
    t = 1e-3 + (1 - 1e-3) * u
    with torch.no_grad():  # the cross-entropy over the K real tokens, from scratch
        logp = net(z)[..., :K].log_softmax(-1).gather(-1, x[..., None])[..., 0]
    ce = torch.where(masked, -logp, 0.0)
    assert torch.allclose(low, ce.sum() / x.numel(), rtol=1e-5)
    assert torch.allclose(elbo, (ce.sum(1) / t).sum() / x.numel(), rtol=1e-5)


def test_time_conditioning_passes_sigma():
    K, calls = 5, []
    args = make_args(vocab_size=K, loss='low_var', time_cond=True)
    u = torch.tensor([0.2, 0.7])
    mdlm.train_loss(recorder(tiny_dit(K), calls), torch.randint(0, K, (2, 8)), u, args, 0, {})
    t = 1e-3 + (1 - 1e-3) * u
    assert torch.allclose(calls[0][1]['sigma'], -torch.log(1 - (1 - 1e-3) * t))


# ----------------------------------------------------------------------------
# sampling

def test_samplers_reproduce_the_distribution():
    """Exact denoiser: with T >> L the ancestral sampler draws from p; a prompt
    gives the conditional; the cached sampler too; and T = 1 reveals everything
    at once, i.e. draws from the product of the marginals (a wrong answer the
    test can tell apart)."""
    K, L, S = 3, 3, 20000
    seqs, probs = toy_distribution(K, L, seed=2)
    model = oracle(seqs, probs, K)
    args = make_args(vocab_size=K, steps=500, cache=False, top_p=1.0, float64=True)
    torch.manual_seed(0)
    x, nfe = mdlm.sample(model, args, S, L)
    assert nfe <= 501
    # TV of an exact sampler with S draws over 27 cells is ~0.012; the sampler's own
    # error (two tokens revealed in one step) is ~L^2/T
    assert total_variation(x, seqs, probs) < 0.03
    first = seqs[torch.multinomial(probs, S, replacement=True), :1]   # X_1 from its marginal
    x, _ = mdlm.sample(model, args, S, L, prompt=first)
    assert torch.equal(x[:, :1], first) and total_variation(x, seqs, probs) < 0.03
    # product of marginals: the one-step sampler's target, and far from p
    m = marginals(seqs, probs, K)
    product = m[0][seqs[:, 0]] * m[1][seqs[:, 1]] * m[2][seqs[:, 2]]
    assert total_variation(x, seqs, product) > 0.1
    args.steps = 1
    x, nfe = mdlm.sample(model, args, S, L)
    assert total_variation(x, seqs, product) < 0.03 and total_variation(x, seqs, probs) > 0.1
    # the cached sampler, in small batches so that most steps reveal nothing
    args.steps, args.cache, n = 300, True, 20
    batches = [mdlm.sample(model, args, n, L) for _ in range(200)]
    x = torch.cat([b[0] for b in batches])
    assert total_variation(x, seqs, probs) < 0.06  # ~0.027 expected at 4000 draws
    assert all(b[1] <= n * L for b in batches) and sum(b[1] for b in batches) < 200 * 300 / 3


def test_top_p_keeps_only_the_nucleus():
    """T = 1 from all-[MASK]: each token comes from its marginal; top-p -> 0 keeps the mode."""
    K, L = 3, 3
    seqs, probs = toy_distribution(K, L, seed=2)
    args = make_args(vocab_size=K, steps=1, cache=True, top_p=1e-9, float64=True)
    torch.manual_seed(0)
    x, nfe = mdlm.sample(oracle(seqs, probs, K), args, 50, L)
    assert torch.equal(x, marginals(seqs, probs, K).argmax(-1).expand(50, L)) and nfe == 1


def test_cached_equals_uncached_and_tokens_are_kept():
    K, n, length = 40, 3, 24
    net = tiny_dit(K)
    prompt = torch.randint(0, K, (n, 4))
    keep = torch.zeros(n, length, dtype=torch.bool)
    keep[:, 15:18] = True  # infill around positions 15-17
    tokens = torch.randint(0, K, (n, length))
    args = make_args(vocab_size=K, steps=64, cache=True, top_p=0.9, float64=True)
    out = {}
    for cache in (True, False):
        calls = []
        args.cache = cache
        torch.manual_seed(1)
        sampled = mdlm.sample(recorder(net, calls), args, n, length, prompt, fixed=(tokens, keep))
        out[cache] = sampled, calls
    (a, nfe_a), calls_a = out[True]
    (b, nfe_b), calls_b = out[False]
    assert torch.equal(a, b)
    assert nfe_a == len(calls_a) < nfe_b == len(calls_b) <= 65
    assert torch.equal(a[:, :4], prompt) and torch.equal(a[keep], tokens[keep])
    assert a.min() >= 0 and a.max() < K  # [MASK] never emitted
    # revealed tokens never change: every network input agrees with the output where clean
    for z, kw in calls_b:
        assert torch.equal(z[z != K], b[z != K]) and torch.equal(kw['select'], z == K)
    masked = [(z == K).sum().item() for z, _ in calls_b]
    assert masked == sorted(masked, reverse=True) and masked[0] == n * (length - 7)


def test_reveals_per_step_follow_the_schedule():
    """Between t and s each masked token is revealed with probability (alpha_s - alpha_t) /
    (1 - alpha_t) = (t - s) / t on t = linspace(1, 1e-5, T + 1): the number revealed at each
    step is binomial given those still masked. (An exact denoiser samples exactly under any
    schedule, so the samplers' distribution tests cannot see a wrong one.)"""
    K, T, n, length, calls = 5, 8, 4000, 4, []

    def uniform(z, sigma=None, select=None, **kw):
        return torch.zeros(int(select.sum()), K + 1)

    args = make_args(vocab_size=K, steps=T, cache=False, top_p=1.0, float64=True)
    torch.manual_seed(0)
    mdlm.sample(recorder(uniform, calls), args, n, length)
    # still masked at each step
    masked = [int((z == K).sum()) for z, _ in calls] + [0] * (T + 2 - len(calls))
    t = torch.linspace(1, 1e-5, T + 1, dtype=torch.float64).tolist()
    assert len(calls) >= T and masked[0] == n * length
    for i in range(T):
        p, m = (t[i] - t[i + 1]) / t[i], masked[i]
        assert abs(m - masked[i + 1] - m * p) < 5 * math.sqrt(m * p * (1 - p)) + 1, i


def test_noise_removal_fills_what_is_left(monkeypatch):
    """Force every reveal draw to fail: only the final step to alpha = 1 reveals,
    so the output is still complete; the cached sampler then needs one call."""
    K, calls = 7, []
    rand = torch.rand
    monkeypatch.setattr(torch, 'rand', lambda *a, **kw: torch.full_like(rand(*a, **kw), 1 - 1e-12))
    args = make_args(vocab_size=K, steps=10, cache=True, top_p=1.0, float64=True)
    x, nfe = mdlm.sample(recorder(tiny_dit(K), calls), args, 2, 12)
    assert nfe == 1 and x.max() < K
    args.cache = False
    x, nfe = mdlm.sample(tiny_dit(K), args, 2, 12)
    assert nfe == 11 and x.max() < K


def test_cache_is_refused_with_time_conditioning():
    args = make_args(vocab_size=5, steps=4, cache=True, time_cond=True)
    with pytest.raises(ValueError, match='time'):
        mdlm.sample(tiny_dit(5), args, 2, 8)
    args.cache = False  # the plain ancestral sampler passes sigma_t = -log alpha_t
    calls = []
    torch.manual_seed(0)
    x, nfe = mdlm.sample(recorder(tiny_dit(5), calls), args, 2, 8)
    assert nfe == len(calls) and x.max() < 5
    assert abs(calls[0][1]['sigma'][0].item() + math.log(1e-3)) < 1e-5  # t = 1: alpha = eps


def test_semi_autoregressive_beyond_the_context(monkeypatch):
    K, n, context, stride, length = 20, 2, 16, 6, 40
    windows, calls = [], []
    denoise = mdlm.denoise

    def recording_denoise(model, args, z, *a):
        windows.append(z.clone())
        return denoise(model, args, z, *a)

    monkeypatch.setattr(mdlm, 'denoise', recording_denoise)
    args = make_args(vocab_size=K, steps=8, cache=True, top_p=1.0, float64=True,
                     block_size=context, stride=stride)
    prompt = torch.randint(0, K, (n, 3))
    keep = torch.zeros(n, length, dtype=torch.bool)
    keep[:, 30] = True  # a token fixed in a later window
    tokens = torch.randint(0, K, (n, length))
    torch.manual_seed(0)
    x, nfe = mdlm.sample(recorder(tiny_dit(K), calls), args, n, length, prompt,
                         fixed=(tokens, keep))
    assert x.shape == (n, length) and x.max() < K and nfe == len(calls)
    assert torch.equal(x[:, :3], prompt) and torch.equal(x[:, 30], tokens[:, 30])
    assert all(z.shape[1] <= context for z, _ in calls)
    # a first window of `context`, then windows whose first context - stride tokens
    # are the tail of the text so far, followed by `stride` new positions
    assert [w.shape[1] for w in windows] == [16, 16, 16, 16, 16]
    assert torch.equal(windows[0][:, :3], prompt) and (windows[0][:, 3:] == K).all()
    keep_len = context - stride
    for w, start in zip(windows[1:], [16, 22, 28, 34]):
        assert torch.equal(w[:, :keep_len], x[:, start - keep_len:start])
        new = torch.full((n, stride), K)
        if start <= 30 < start + stride:
            new[:, 30 - start] = tokens[:, 30]
        assert torch.equal(w[:, keep_len:], new)


def test_bad_input_and_contract():
    K = 5
    args = make_args(vocab_size=K, steps=4, cache=True, block_size=8, stride=8)
    model = tiny_dit(K)
    with pytest.raises(ValueError, match='stride'):
        mdlm.sample(model, args, 2, 20)
    with pytest.raises(ValueError, match='prompt'):
        mdlm.sample(model, args, 2, 8, prompt=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='ids'):
        mdlm.sample(model, args, 2, 8, prompt=torch.full((2, 2), K))
    assert mdlm.vocab_size(K) == K + 1 and mdlm.EXACT is False
    parser = argparse.ArgumentParser()
    ar.add_args(parser)
    mdlm.add_args(parser)
    a = parser.parse_args([])
    assert a.loss == 'low_var' and a.time_cond is False
    assert parser.parse_args(['--loss', 'elbo', '--time-cond']).time_cond is True
