"""Duo against exact answers: the closed-form loss against the reverse-rate ELBO
written from the process definition, the Bayes-optimal denoiser of an
enumerable toy (NELBO = entropy, sampler -> data), the Gaussian transformation
operator against closed forms and Monte Carlo, and the distillation mechanics."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import duo
from args import make_args
from model import DiT, get_config
from toy import entropy, toy_distribution, total_variation

K, L = 3, 3


def noisy_oracle(seqs, probs, leave_one_out=True, clean_prefix=0):
    """Exact x_theta of the toy under the uniform-state process at alpha = exp(-sigma):
    leave_one_out: p(x_l | z at the other positions) (the ELBO optimum);
    else the full posterior p(x_l | z), which also conditions on z_l.
    The first clean_prefix positions are known clean (a prompt)."""
    def model(z, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None,
              head=None):
        a = torch.exp(-sigma.double())[:, None, None]
        q = a * (seqs[None] == z[:, None]) + (1 - a) / K                 # (B, N, L): q(z_l | x_l)
        q[..., :clean_prefix] = (seqs[None] == z[:, None])[..., :clean_prefix].double()
        logq = q.log()
        out = torch.zeros(z.shape[0], L, K, dtype=torch.float64)
        for l in range(L):
            w = probs * torch.exp(logq.sum(-1) - (logq[..., l] if leave_one_out else 0))
            out[:, l].scatter_add_(1, seqs[:, l].expand(z.shape[0], -1), w)
        out = (out / out.sum(-1, keepdim=True)).log()
        return out if head is None else head(out)
    return model


def args_for(**kw):
    return make_args(**{**dict(vocab_size=K, steps=16, cache=False, teacher_every=10,
                                distill_T=512), **kw})


def random_dit(vocab, seed=0):
    torch.manual_seed(seed)
    model = DiT(get_config('tiny', vocab))
    for p in model.parameters():  # leave the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.3)
    return model


# ----------------------------------------------------------------------------
# the closed-form loss

def reverse_rate_integrand(logits, x, z, a, da, K):
    """The ELBO integrand written from the rates (see the test below): the generalized KL
    sum_{y != z} R_theta - R_x log R_theta + R_x log R_x - R_x of the reverse rates z -> y."""
    beta = -da / a

    def marg(v):  # q_t(. | v)
        return a[:, None] * v + (1 - a[:, None]) / K

    def rate(m):  # reverse rates z -> y
        return beta[:, None] / K * m / m.gather(1, z[:, None])

    R_x, R_theta = rate(marg(F.one_hot(x, K).double())), rate(marg(logits.double().softmax(-1)))
    off = F.one_hot(z, K) == 0
    return ((R_theta - R_x * R_theta.log() + R_x * R_x.log() - R_x) * off).sum(1)


def test_closed_form_equals_reverse_rate_elbo():
    """Uniform-state chain: forward rate y -> z is beta/K (beta = -alpha'/alpha), so
    q_t(. | x) = alpha e_x + (1 - alpha)/K. Reverse rate z -> y: R(y -> z) q_t(y)/q_t(z),
    with x (true) or x_theta plugged into q_t (model). The ELBO integrand is the
    generalized KL sum_{y != z} R_theta - R_x log R_theta + R_x log R_x - R_x."""
    g = torch.Generator().manual_seed(0)
    K5, N = 5, 400
    logits = torch.randn(N, K5, generator=g, dtype=torch.float64) * 2
    x = torch.randint(0, K5, (N,), generator=g)
    z = torch.where(torch.rand(N, generator=g) < 0.5, x, torch.randint(0, K5, (N,), generator=g))
    t = torch.rand(N, generator=g, dtype=torch.float64)
    a, da = duo.schedule(t)
    # the rates generate the marginals: d/dt q_t = q_t Q_t
    h = 1e-6

    def marg(v, a):
        return a[:, None] * v + (1 - a[:, None]) / K5

    onehot = F.one_hot(x, K5).double()
    beta = -da / a
    eye = torch.eye(K5, dtype=torch.float64)
    Q = beta[:, None, None] / K5 * (torch.ones(K5, K5, dtype=torch.float64) - K5 * eye)
    dq = (marg(onehot, duo.schedule(t + h)[0]) - marg(onehot, duo.schedule(t - h)[0])) / (2 * h)
    assert torch.allclose(dq, (marg(onehot, a)[:, None] @ Q)[:, 0], atol=1e-8)
    brute = reverse_rate_integrand(logits, x, z, a, da, K5)
    closed = duo.nelbo_integrand(logits, x, z, a, da, K5)
    assert torch.allclose(closed, brute, rtol=1e-10, atol=1e-12)
    assert (closed >= 0).all()


def test_closed_form_is_safe_in_float32_at_gpt2_vocab():
    g = torch.Generator().manual_seed(0)
    Kg, V, N = 50257, 50304, 16
    logits = torch.randn(N, V, generator=g) * 3
    logits[:, Kg:] = float('-inf')  # padded columns, as the network returns them
    x = torch.randint(0, Kg, (N,), generator=g)
    logits[torch.arange(N // 2), x[:N // 2]] += 20  # some confident predictions
    z = torch.where(torch.arange(N) % 2 == 0, x, torch.randint(0, Kg, (N,), generator=g))
    for alpha in [1e-6, 1e-3, 0.5, 0.999, 1 - 1e-6]:
        a, da = torch.full((N,), alpha), torch.full((N,), -(1 - duo.EPS))
        f32 = duo.nelbo_integrand(logits, x, z, a, da, Kg)
        f64 = duo.nelbo_integrand(logits.double(), x, z, a.double(), da.double(), Kg)
        assert torch.isfinite(f32).all() and f32.dtype == torch.float32
        assert torch.allclose(f32.double(), f64, rtol=1e-5, atol=0.1), alpha
        assert (f64 >= 0).all()


# ----------------------------------------------------------------------------
# exact toy: the ELBO optimum is the leave-one-out posterior

def expected_integrand(model, seqs, probs, t):
    """E_{x, z_t} [ sum_l loss ] at time t, by enumeration of all (x, z_t) pairs."""
    N = len(seqs)
    x, z = seqs.repeat_interleave(N, 0), seqs.repeat(N, 1)
    a, da = duo.schedule(torch.tensor(t, dtype=torch.float64))
    q_zx = torch.where(z == x, a + (1 - a) / K, (1 - a) / K).prod(1)
    logits = model(z, sigma=torch.full((len(z),), -math.log(a), dtype=torch.float64))
    n = len(z) * L
    loss = duo.nelbo_integrand(logits.flatten(0, 1), x.flatten(), z.flatten(),
                               a.expand(n), da.expand(n), K).view(-1, L).sum(1)
    return (probs.repeat_interleave(N) * q_zx * loss).sum().item()


def quadrature(t_min=0.0, panels=12, nodes=12):
    """Nodes and weights of Gauss-Legendre on geometric panels over [t_min, 1] (the
    integrand grows like log(1/t) at 0)."""
    nodes, weights = np.polynomial.legendre.leggauss(nodes)
    edges = [t_min] + list(np.geomspace(max(t_min, 1e-7), 1, panels))
    return [(lo + (hi - lo) * (node + 1) / 2, (hi - lo) / 2 * w)
            for lo, hi in zip(edges[:-1], edges[1:]) for node, w in zip(nodes, weights)]


def exact_nelbo(model, seqs, probs, t_min=0.0):
    """The NELBO by quadrature over t, plus the prior term."""
    integral = sum(w * expected_integrand(model, seqs, probs, t) for t, w in quadrature(t_min))
    return integral + L * duo.prior_kl(K)


def test_nelbo_of_the_leave_one_out_posterior_is_the_entropy():
    seqs, probs = toy_distribution(K, L, seed=0)
    H = entropy(probs)
    exact = exact_nelbo(noisy_oracle(seqs, probs), seqs, probs)
    assert abs(exact - H) / H < 1e-5  # tight: the reverse process is exact
    # training's times [eps, 1] drop a log(1/t)-growing piece near t = 0: a bit below H
    truncated = exact_nelbo(noisy_oracle(seqs, probs), seqs, probs, t_min=duo.EPS)
    assert -0.006 < (truncated - H) / H < -0.003
    # the full posterior (conditions on z_l too) is not the optimum: +49%
    full = exact_nelbo(noisy_oracle(seqs, probs, leave_one_out=False), seqs, probs)
    assert 0.45 < (full - H) / H < 0.53
    # eval_nll's Monte Carlo estimate is unbiased for the exact value
    torch.manual_seed(0)
    S = 30000
    x = seqs[torch.multinomial(probs, S, replacement=True)]
    u = (torch.rand(1) + torch.arange(S)) / S
    seen = []
    oracle = noisy_oracle(seqs, probs)

    def recording(z, sigma, **kw):
        seen.append(sigma)
        return oracle(z, sigma, **kw)

    nll, n = duo.eval_nll(recording, x, u, args_for())
    assert n == L
    assert abs(nll.mean().item() - exact) < 4 * nll.std().item() / math.sqrt(S)
    # ... with times over all of (0, 1], t = (1 - u)^2, not training's [eps, 1]
    alpha = duo.schedule((1 - u.double()) ** 2)[0]
    assert torch.allclose(seen[0].double(), -alpha.log(), rtol=1e-4, atol=1e-7)
    assert seen[0].min() < 1e-4


def test_training_loss_estimates_the_nelbo_over_its_times():
    """train_loss at fixed times t (its own draws of z_t) against the exact integrand per token,
    both integrated over training's [eps, 1] by the same quadrature, for a batch holding each
    toy sequence in proportion to its probability: agree within 5 standard errors (~1%), so
    a loss 5% off or a corruption that never draws some token fails."""
    seqs, probs = toy_distribution(K, L, seed=0)
    oracle = noisy_oracle(seqs, probs)
    counts = (probs * 2000).round().long()
    x, weights = seqs.repeat_interleave(counts, 0), counts / counts.sum()
    torch.manual_seed(0)
    estimate, variance, exact = 0.0, 0.0, 0.0
    for t, w in quadrature(duo.EPS, panels=7, nodes=4):
        u = torch.full((len(x),), (t - duo.EPS) / (1 - duo.EPS))  # t = eps + (1 - eps) u
        draws = torch.tensor([duo.train_loss(oracle, x, u, args_for(), 0, {}).item()
                              for _ in range(4)])
        estimate += w * draws.mean().item()
        variance += w ** 2 * draws.double().var().item() / 4
        exact += w * expected_integrand(oracle, seqs, weights, t) / L
    assert abs(estimate - exact) < 5 * math.sqrt(variance) < 0.025 * exact
    # the z_t it feeds the network: q(z_t | x) = alpha_t e_x + (1 - alpha_t) / K, every token drawn
    seen = []

    def recording(z, sigma=None, **kw):
        seen.append(z)
        return oracle(z, sigma)

    duo.train_loss(recording, x, torch.full((len(x),), 0.5), args_for(), 0, {})
    a = 1 - (1 - duo.EPS) * (duo.EPS + (1 - duo.EPS) * 0.5)
    for k in range(K):
        z = seen[0][x == k]
        for j in range(K):
            p = a * (j == k) + (1 - a) / K
            freq = (z == j).double().mean().item()
            assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(z)), (k, j)


def test_prior_term_is_the_kl_to_uniform():
    for Kp in (2, 3, 50257):
        # q(z_1 | x = 0), alpha_1 = eps
        q = torch.full((Kp,), (1 - duo.EPS) / Kp, dtype=torch.float64)
        q[0] += duo.EPS
        kl = (q * (q * Kp).log()).sum().item()
        assert duo.prior_kl(Kp) == pytest.approx(kl, rel=1e-9, abs=1e-15)


def sampler_law(model, seqs, T):
    """The exact law of the sampler (no sampling noise): T steps from t = 1 to 1e-5,
    then noise removal to alpha = 1; propagate the distribution over all K^L
    states through the product-form transition kernel."""
    N = len(seqs)
    law = torch.full((N,), 1 / N, dtype=torch.float64)  # uniform prior
    alphas = duo.schedule(torch.linspace(1, 1e-5, T + 1, dtype=torch.float64))[0].tolist() + [1.0]
    for a_t, a_s in zip(alphas[:-1], alphas[1:]):
        p = model(seqs, sigma=torch.full((N,), -math.log(a_t), dtype=torch.float64)).exp()
        q = duo.posterior(p, seqs, a_t, a_s, K)  # (N, L, K)
        M = torch.ones(N, N, dtype=torch.float64)
        for l in range(L):
            M = M * q[:, l][:, seqs[:, l]]
        law = law @ M
    return law


def test_sampler_of_the_leave_one_out_posterior_converges_to_the_data():
    seqs, probs = toy_distribution(K, L, seed=0)

    def tv(law):
        return 0.5 * (law - probs).abs().sum().item()

    good = [tv(sampler_law(noisy_oracle(seqs, probs), seqs, T)) for T in (16, 128, 1024)]
    assert good[0] < 0.035 and good[1] < 0.005 and good[2] < 0.0007   # shrinking like 1/T
    assert good[0] > 5 * good[1] > 25 * good[2]
    bad = [tv(sampler_law(noisy_oracle(seqs, probs, leave_one_out=False), seqs, T))
           for T in (16, 128, 1024)]
    assert min(bad) > 0.2  # the full posterior stays wrong however many steps
    # sample() draws from that law
    torch.manual_seed(0)
    samples, nfe = duo.sample(noisy_oracle(seqs, probs), args_for(steps=16), 20000, L)
    assert nfe == 16 + 1  # T steps and the noise removal call
    law = sampler_law(noisy_oracle(seqs, probs), seqs, 16)
    assert total_variation(samples, seqs, law) < 0.025  # sampling noise ~0.015


def test_prompt_is_kept_and_the_rest_is_conditional():
    seqs, probs = toy_distribution(K, L, seed=3)
    torch.manual_seed(0)
    S = 10000
    first = seqs[torch.multinomial(probs, S, replacement=True), :1]  # x_1 from its marginal
    oracle = noisy_oracle(seqs, probs, clean_prefix=1)
    samples, nfe = duo.sample(oracle, args_for(steps=16), S, L, prompt=first)
    assert torch.equal(samples[:, :1], first) and nfe == 17
    # measured 0.020; an oracle blind to the clean prompt gives 0.11, overwriting x_1
    # of unconditional samples 0.34
    assert total_variation(samples, seqs, probs) < 0.05


def test_greedy_tail_top_p_and_nfe():
    # x_theta at position l: 0.6 on l mod K, 0.25 and 0.15 on the others
    pattern = torch.arange(6) % K

    def model(z, sigma=None, **kw):
        p = torch.empty(z.shape[0], z.shape[1], K, dtype=torch.float64)
        for shift, mass in enumerate((0.6, 0.25, 0.15)):
            p[:, torch.arange(z.shape[1]), (pattern[:z.shape[1]] + shift) % K] = mass
        return p.log()

    torch.manual_seed(0)
    out, nfe = duo.sample(model, args_for(steps=4, greedy_tail=True), 500, 6)
    assert nfe == 4 + 1 and (out == pattern).all()  # noise removal: one more call, argmax x_theta
    out, _ = duo.sample(model, args_for(steps=4), 500, 6)
    assert not (out == pattern).all()
    # one step from t = 1 to 1e-5: q(z_s) is x_theta up to 0.3%; the nucleus 0.7 keeps 0.6 and 0.25;
    # the noise removal from alpha = 1 - 1e-5 to 1 keeps z with probability ~1
    out, nfe = duo.sample(model, args_for(steps=1, top_p=0.7), 4000, 6)
    assert nfe == 2
    assert ((out - pattern) % K != 2).all()
    assert 0.68 < (out == pattern).double().mean().item() < 0.73  # 0.6 / 0.85 = 0.706


# ----------------------------------------------------------------------------
# the Gaussian dual: alpha = T(atilde)

def test_transformation_operator():
    gammas = torch.linspace(-8, 6, 301, dtype=torch.float64)
    m = torch.exp(-gammas / 2)  # atilde / sqrt(1 - atilde^2)
    # K = 2: P(m + e1 > e2) = Phi(m / sqrt 2), so alpha = 2 Phi(m/sqrt 2) - 1 = erf(m / 2)
    alpha2, dalpha2 = duo.gaussian_to_uniform(gammas, 2)
    assert torch.allclose(alpha2, torch.erf(m / 2), atol=1e-6)
    expected = torch.exp(-m ** 2 / 4) / math.sqrt(math.pi) * (-m / 2)
    assert torch.allclose(dalpha2, expected, atol=1e-6)
    for Kt in (5, 50257):
        alpha, dalpha = duo.gaussian_to_uniform(gammas, Kt)
        # monotone in gamma (= in atilde)
        assert (alpha.diff() <= 0).all() and (dalpha <= 1e-12).all()
        # atilde = 0, 1
        ends, _ = duo.gaussian_to_uniform(torch.tensor([float('inf'), float('-inf')]), Kt)
        assert abs(ends[0].item()) < 1e-12 and abs(ends[1].item() - 1) < 1e-12
        above = duo.gaussian_to_uniform(gammas + 1e-4, Kt)[0]
        below = duo.gaussian_to_uniform(gammas - 1e-4, Kt)[0]
        fd = (above - below) / 2e-4
        assert torch.allclose(dalpha, fd, atol=1e-3)
    # K = 5: Monte Carlo P(argmax w = x) = alpha + (1 - alpha)/K, the other tokens uniform
    torch.manual_seed(0)
    S, K5 = 200000, 5
    for gamma in (-3.0, -0.5, 1.0):
        g = torch.full((S // 100,), gamma)
        x = torch.randint(0, K5, (S // 100, 100))
        zt = duo.gaussian_latent(x, g, torch.randn(S // 100, 100, K5)).argmax(-1)
        hit = (zt == x).double().mean().item()
        alpha = duo.gaussian_to_uniform(torch.tensor([gamma], dtype=torch.float64), K5)[0].item()
        assert abs(hit - (alpha + (1 - alpha) / K5)) < 4 * math.sqrt(hit * (1 - hit) / S)
        miss = (zt - x)[zt != x] % K5  # offsets 1..K-1 equally likely
        counts = torch.bincount(miss, minlength=K5)[1:].double()
        n = counts.sum()
        assert ((counts / n - 1 / (K5 - 1)).abs() < 4 * math.sqrt(3 / 16 / n)).all()


def test_transformation_table_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(duo, '__file__', str(tmp_path / 'duo.py'))
    monkeypatch.setattr(duo, '_TABLES', {})
    first, _ = duo.gaussian_to_uniform(torch.tensor([-1.0, 0.0]), 7)
    assert (tmp_path / 'cache' / 'duo_dto_K7.pt').exists()
    monkeypatch.setattr(duo, '_TABLES', {})
    monkeypatch.setattr(duo, 'dto_table', lambda *a, **k: pytest.fail('recomputed instead of read'))
    again, _ = duo.gaussian_to_uniform(torch.tensor([-1.0, 0.0]), 7)
    assert torch.equal(first, again)


# ----------------------------------------------------------------------------
# curriculum and distillation on a tiny network

class Recorder(torch.nn.Module):
    """Wraps a DiT and records every input; copies (the teacher) record too."""
    calls = []

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma=None, **kw):
        Recorder.calls.append((x.detach().clone(), sigma.detach().clone(), torch.is_grad_enabled(),
                               id(self)))
        return self.net(x, sigma=sigma, **kw)


def test_curriculum_feeds_soft_latents_then_switches_to_the_elbo():
    V = 20
    model = Recorder(random_dit(V))
    args = args_for(vocab_size=V, curriculum_steps=5, tau=0.1)
    x = torch.randint(0, V, (4, 8))
    u = (torch.rand(1) + torch.arange(4)) / 4
    Recorder.calls.clear()
    loss = duo.train_loss(model, x, u, args, 4, {})
    loss.backward()
    soft, sigma, _, _ = Recorder.calls[-1]
    assert soft.shape == (4, 8, V) and soft.dtype.is_floating_point and torch.isfinite(loss)
    assert torch.allclose(soft.sum(-1), torch.ones(4, 8))
    # sigma = -log T(atilde) with gamma linear in t over [-3.55, -1.85]
    gamma = -3.55 + 1.7 * (duo.EPS + (1 - duo.EPS) * u)
    alpha = duo.gaussian_to_uniform(gamma.double(), V)[0]
    assert torch.allclose(sigma.double(), -alpha.log(), atol=1e-5)
    duo.train_loss(model, x, u, args, 5, {})  # step N: the plain discrete ELBO on token ids
    assert Recorder.calls[-1][0].dtype == torch.long
    duo.eval_nll(model, x, u, args)
    assert Recorder.calls[-1][0].dtype == torch.long


def test_curriculum_loss_is_the_discrete_elbo_at_the_transformed_alpha():
    """The value: the reverse-rate integrand at z_t = argmax w_t, alpha_t = T(atilde_t) and
    alpha'_t = d alpha / d gamma x d gamma / dt (finite differences here), averaged per token."""
    V, B, n = 6, 8, 40
    torch.manual_seed(0)
    x = torch.randint(0, V, (B, n))
    u = (torch.rand(1) + torch.arange(B)) / B
    logits = torch.randn(B, n, V, dtype=torch.float64)
    seen = []

    def model(w, sigma=None, head=None, **kw):
        seen.append(w)
        return logits if head is None else head(logits)

    loss = duo.train_loss(model, x, u, args_for(vocab_size=V, curriculum_steps=1, tau=0.1), 0, {})
    z = seen[0].argmax(-1)  # softmax(w / tau) keeps the argmax of w
    # linear in t over [gamma_min, gamma_max]
    gamma = -3.55 + 1.7 * (duo.EPS + (1 - duo.EPS) * u.double())

    def alpha(g):
        return duo.gaussian_to_uniform(g, V)[0]

    dalpha = (alpha(gamma + 1e-3) - alpha(gamma - 1e-3)) / 2e-3 * 1.7
    expected = reverse_rate_integrand(logits.flatten(0, 1), x.flatten(), z.flatten(),
                                      alpha(gamma).repeat_interleave(n),
                                      dalpha.repeat_interleave(n), V).mean()
    assert (z != x).any() and loss.item() == pytest.approx(expected.item(), rel=1e-3)


def test_distillation_loss_is_kl_of_student_to_teacher():
    V = 4
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, V, generator=g) * 3
    teacher = torch.randn(2, 3, V, generator=g) * 0.3

    def student_net(z, sigma=None, **kw):
        return student

    def teacher_net(z, sigma=None, **kw):  # this round's teacher
        return teacher

    state = {'teacher': teacher_net, 'teacher_round': 0}
    args = args_for(vocab_size=V, distill_from='ckpt.pt', teacher_every=10, distill_T=4)
    x = torch.randint(0, V, (2, 3), generator=g)
    loss = duo.train_loss(student_net, x, torch.tensor([0.2, 0.7]), args, 0, state)
    p, q = student.log_softmax(-1), teacher.log_softmax(-1)

    def kl(a, b):  # KL(a || b) per token
        return (a.exp() * (a - b)).sum(-1).mean().item()

    assert loss.item() == pytest.approx(kl(p, q), rel=1e-5) and abs(kl(p, q) - kl(q, p)) > 0.3


def test_distillation_schedule():
    assert [duo.distill_round(s, 3) for s in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    dts = [duo.distill_dt(s, 3, 512) for s in (0, 2, 3, 6, 9)]
    assert dts == [1 / 512, 1 / 512, 2 / 512, 4 / 512, 8 / 512]
    assert duo.distill_dt(100, 3, 512) == 1.0  # capped


def test_distillation_mechanics():
    V, every = 12, 3
    torch.manual_seed(1)
    net = DiT(get_config('tiny', V))
    torch.nn.init.normal_(net.out.weight, std=0.2)  # not the zero init: outputs depend on the input
    model = Recorder(net)
    args = args_for(vocab_size=V, distill_from='ckpt.pt', teacher_every=every, distill_T=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (16, 16), generator=g)
    u = (torch.rand(1, generator=g) + torch.arange(16)) / 16
    state, losses = {}, []
    previous = None  # the teacher's weights one step earlier
    for step in range(2 * every):
        Recorder.calls.clear()
        # the same noise within a round: the loss is a function of the weights
        torch.manual_seed(step // every)
        loss = duo.train_loss(model, x, u, args, step, state)
        teacher_weights = [p.clone() for p in state['teacher'].parameters()]
        if step % every == 0:  # refreshed exactly now: the teacher is the current student
            assert all(torch.equal(a, b) for a, b in zip(teacher_weights, net.parameters()))
        else:                  # and frozen in between
            assert all(torch.equal(a, b) for a, b in zip(teacher_weights, previous))
        previous = teacher_weights
        assert all(not p.requires_grad for p in state['teacher'].parameters())
        # the student sees z_t, the teacher z_s (no grad), argmax of one trajectory:
        # the clean coordinate's lead only grows from t to s, the others' noise is shared,
        # so z_s is z_t or x, and z_t = x implies z_s = x
        (z_s, sig_s, grad_s, _), (z_t, sig_t, grad_t, _) = Recorder.calls
        assert not grad_s and grad_t and (sig_s < sig_t).all()
        assert ((z_s == z_t) | (z_s == x)).all() and (z_s[z_t == x] == x[z_t == x]).all()
        assert (z_s != z_t).any() and (z_t != x).any()
        # s = t - dt, dt = 2^round / T
        dt = duo.distill_dt(step, every, args.distill_T)
        t = (duo.EPS + (1 - duo.EPS) * u + dt).clamp(max=1)
        for sig, time in ((sig_t, t), (sig_s, t - dt)):
            alpha = duo.gaussian_to_uniform((-4 + 3 * time).double(), V)[0]
            assert torch.allclose(sig.double(), -alpha.log(), atol=1e-5)
        assert torch.isfinite(loss) and loss.item() >= 0
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r in range(2):  # falls within each round
        assert losses[r * every] > losses[r * every + 1] > losses[r * every + 2]


def test_the_nucleus_filters_x_theta_not_the_posterior():
    """With many steps the one-step posterior puts most of its mass on "stay at z_t"; a nucleus
    of the posterior would keep only that and freeze the tokens until the noise removal. A
    nucleus of x_theta (the reference code's) keeps the chain moving and near the data."""
    seqs, probs = toy_distribution(K, L, seed=0)
    frames = []

    def keep_frames(z, nfe, noisy):
        frames.append(z.clone())
    torch.manual_seed(0)
    x, _ = duo.sample(noisy_oracle(seqs, probs), args_for(steps=256, top_p=0.9), 4000, L,
                      callback=keep_frames)
    moved = (frames[128] != frames[256]).double().mean().item()   # steps T/2 .. T
    assert moved > 0.2, moved                                       # frozen: 0.000
    assert total_variation(x, seqs, probs) < 0.15                   # frozen: ~0.36
