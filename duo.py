"""Duo: uniform-state discrete diffusion and its Gaussian dual (Sahoo et al. 2025; MATH §4).

Forward process: at time t every token independently stays clean with probability alpha_t and
is otherwise replaced by a uniform draw over the K real tokens (which may redraw itself), so
q(z_t | x) = alpha_t e_x + (1 - alpha_t)/K and the prior z_1 is uniform noise; there is no
[MASK] token. Unlike MDLM every position may be noisy, so the network sees no clean/noisy flag:
it is time-conditioned on sigma_t = -log alpha_t and outputs x_theta = softmax (the "mean"
parameterisation). Plugging x_theta for x into the exact posterior q(z_s | z_t, x) gives the
reverse step, and the continuous-time NELBO has a closed form per token (Duo eq. 17, MATH (16))
that needs only xbar = K alpha_t x_theta + (1 - alpha_t) at z, at x and summed in log. Its
optimum at position l is p(x_l | the noisy tokens at the *other* positions), MATH (20).

The duality, MATH (24)-(27): argmax of a Gaussian latent w_t is exactly this process at
alpha_t = T(atilde_t). Duo uses it for a curriculum (--curriculum-steps: the network reads the
soft softmax(w_t / tau), the loss stays the discrete NELBO) and for consistency distillation
(--distill-from: a student at t pulled towards a frozen teacher at s = t - dt on the same
Gaussian trajectory), after which it samples well in a few steps. The contract: ar.py.
"""
import copy
import math
import os

import torch

import fused
from mdlm import EPS, T_LAST, schedule, sigma_of
from model import (flops_per_token, generate, log_softmax, sample_categorical, top_p_filter,
                   unwrap)

EXACT = False           # eval_nll is the NELBO, an upper bound on the NLL
VARIABLE_LENGTH = True


def add_args(parser):
    parser.add_argument('--curriculum-steps', type=int, default=0,
                        help='train on the Gaussian relaxation for the first N steps (paper: '
                             '500k of 1M; default 0 = off)')
    parser.add_argument('--tau', type=float, default=1e-3,
                        help='curriculum softmax temperature (default: 1e-3)')
    parser.add_argument('--gamma-min', type=float,
                        help='Gaussian trajectory: gamma = -log SNR at t = 0 (default: -3.55 '
                             'for the curriculum, -4 for distillation)')
    parser.add_argument('--gamma-max', type=float,
                        help='gamma at t = 1 (default: -1.85 curriculum, -1 distillation)')
    parser.add_argument('--distill-from', help='Duo checkpoint to distill (DCD); the student '
                                               'starts from it')
    parser.add_argument('--teacher-every', type=int,
                        help='DCD: refresh the teacher every N steps (default: 10000; CPU 100)')
    parser.add_argument('--distill-T', type=int, help='DCD: dt = 2^round / T (default: 512)')
    parser.add_argument('--greedy-tail', action='store_true',
                        help='sampling: the noise removal takes argmax x_theta')


def defaults(args, gpu):
    """The Gaussian trajectory's range, and with --distill-from the seed's distil_owt.sh:
    lr 6e-5 constant after 500 warmup steps, batch 128, 50k steps, EMA 0.999, T = 512, a
    teacher every 10k steps. A CPU keeps the five teacher rounds, dt <= 2^4 / T."""
    if not args.distill_from:
        return dict(gamma_min=-3.55, gamma_max=-1.85)
    lr = args.lr
    if lr is None:
        lr = 6e-5 if gpu else 3e-4
    return dict(init_from=args.distill_from, gamma_min=-4.0, gamma_max=-1.0, lr=lr, min_lr=lr,
                batch_size=128 if gpu else 8, max_iters=50_000 if gpu else 500,
                warmup_iters=500 if gpu else 10, ema=0.999 if gpu else 0.99,
                teacher_every=10_000 if gpu else 100, distill_T=512)


def check_args(args, training):
    if not training:
        return
    if args.tau <= 0:
        raise ValueError(f'--tau must be > 0, got {args.tau}')
    if args.curriculum_steps < 0:
        raise ValueError(f'--curriculum-steps must be >= 0, got {args.curriculum_steps}')
    if not args.gamma_min < args.gamma_max:
        raise ValueError(f'need --gamma-min < --gamma-max, got {args.gamma_min} and '
                         f'{args.gamma_max}')
    for flag, value in (('--teacher-every', args.teacher_every), ('--distill-T', args.distill_T)):
        if value is not None and value < 1:
            raise ValueError(f'{flag} must be >= 1, got {value}')


def vocab_size(K):
    return K


# ---- forward process -------------------------------------------------------------------------

def corrupt(x, alpha_t, K):
    """z_t ~ q(z_t | x): each token is replaced by a uniform draw w.p. 1 - alpha_t, MATH (14)."""
    redrawn = torch.rand(x.shape, device=x.device) < 1 - alpha_t[:, None]
    return torch.where(redrawn, torch.randint_like(x, K), x)


# ---- loss ------------------------------------------------------------------------------------

def nelbo_integrand(logits, x, z_t, alpha_t, dalpha_t, K):
    """Duo's closed-form NELBO integrand per token (Duo eq. 17), MATH (15)-(16): logits
    (..., V), and x, z_t, alpha_t, alpha'_t of the same shape (...). >= 0. In float32 at least,
    float64 if alpha_t is (evaluation)."""
    x_theta = log_softmax(logits, K).exp()
    x_theta = x_theta.to(torch.promote_types(x_theta.dtype, alpha_t.dtype))
    a = alpha_t.to(x_theta.dtype)
    da = dalpha_t.to(x_theta.dtype)
    xbar = K * a[..., None] * x_theta + (1 - a[..., None])            # MATH (15)
    log_xbar = torch.log(xbar)
    xbar_z = xbar.gather(-1, z_t[..., None])[..., 0]
    log_xbar_z = log_xbar.gather(-1, z_t[..., None])[..., 0]
    log_xbar_x = log_xbar.gather(-1, x[..., None])[..., 0]
    same = x == z_t
    xbar_true_z = 1 - a + K * a * same                                # xbar at z with e_x
    kappa = (1 - a) / (K * a + 1 - a)
    c = torch.where(same, kappa, 1.0)
    r = K * a / (1 - a)
    A = K * (1 / xbar_true_z - 1 / xbar_z)                            # the 1/xbar term
    B = c * (log_xbar.sum(-1) - K * log_xbar_z)                       # the log-sum term
    C = r * (log_xbar_x - log_xbar_z) * ~same                         # the true-token term
    offset = torch.where(same, (K - 1) * kappa, -1 / kappa) * torch.log(kappa)
    return da / (K * a) * (A + B + C - offset)


def elbo_loss(model, inputs, x, z_t, alpha_t, dalpha_t, args):
    """The training loss: the NELBO integrand, MATH (16), averaged over the B L tokens, one time
    per sequence, MATH (18). The network reads `inputs`: z_t, or the curriculum's soft latent."""
    K = args.vocab_size
    a = alpha_t[:, None].expand_as(x)                                 # one per token
    da = dalpha_t[:, None].expand_as(x)
    if args.fused:  # the same number without the (B, L, V) logits: fused.py, MATH (17)
        head = fused.duo_nelbo_head(x.flatten(), z_t.flatten(), a.flatten(), da.flatten(), K, 1)
        return model(inputs, sigma=sigma_of(alpha_t), head=head) / x.numel()
    logits = model(inputs, sigma=sigma_of(alpha_t))
    return nelbo_integrand(logits, x, z_t, a, da, K).sum() / x.numel()


def train_loss(model, x, u, args, step, state):
    """The NELBO, MATH (16)-(18), at t from u; the first --curriculum-steps the Gaussian
    relaxation, MATH (26); with --distill-from, consistency distillation, MATH (27) (below)."""
    if args.distill_from:
        return distill_loss(model, x, u, args, step, state)
    if step < args.curriculum_steps:
        return curriculum_loss(model, x, u, args)
    t = EPS + (1 - EPS) * u                                            # MATH (4)
    alpha_t, dalpha_t = schedule(t)                                    # MATH (3)
    z_t = corrupt(x, alpha_t, args.vocab_size)
    return elbo_loss(model, z_t, x, z_t, alpha_t, dalpha_t, args)


def mfu_flops(cfg, args):
    return flops_per_token(cfg, args.block_size, attention=True)


# ---- the Gaussian dual: curriculum and distillation, alpha = T(atilde) -----------------------

def dto_table(K, h=2e-3):
    """alpha = T(atilde) and d alpha / dm on the grid m = 0, h, 2h, ... up to where alpha = 1,
    with m = atilde / sqrt(1 - atilde^2) the latent's signal-to-noise, MATH (25):
      T = K/(K-1) [ int phi(u - m) Phi(u)^(K-1) du - 1/K ],
    i.e. P(argmax w = x) = alpha + (1 - alpha)/K: the clean coordinate, N(m, 1), beats the K-1
    others. The trapezoid rule on the line is spectrally accurate here (a smooth, fast-decaying
    integrand), so a coarse u-grid suffices."""
    m_max = math.sqrt(2 * math.log(K)) + 10           # past the max of K-1 normals: alpha = 1
    m = torch.arange(0, m_max + h, h, dtype=torch.float64)
    du = 0.02
    u = torch.arange(-12, m_max + 12, du, dtype=torch.float64)
    g = torch.exp((K - 1) * torch.special.log_ndtr(u)) * du  # Phi(u)^(K-1) du
    integral = []
    derivative = []
    for mc in m.split(1024):
        d = u - mc[:, None]
        phi = torch.exp(-0.5 * d ** 2) / math.sqrt(2 * math.pi)
        integral.append(phi @ g)                       # int phi(u - m) Phi^(K-1) du
        derivative.append((d * phi) @ g)               # its derivative in m
    alpha = (K * torch.cat(integral) - 1) / (K - 1)
    alpha = alpha.clamp(0, 1).cummax(0).values        # rounding at the flat end
    return {'K': K, 'h': h, 'alpha': alpha, 'dalpha_dm': K * torch.cat(derivative) / (K - 1)}


_TABLES = {}


def load_dto(K, device='cpu'):
    """The table for K: from memory, else cache/duo_dto_K<K>.pt, else computed (well under a
    second for K = 50257) and written there."""
    key = (K, str(device))
    if key not in _TABLES:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache',
                            f'duo_dto_K{K}.pt')
        if os.path.exists(path):
            table = torch.load(path, weights_only=True)
        else:
            table = dto_table(K)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f'{path}.{os.getpid()}.tmp'
            torch.save(table, tmp)
            os.replace(tmp, path)   # atomic: parallel ranks never read half a file
        _TABLES[key] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in table.items()}
    return _TABLES[key]


def gaussian_to_uniform(gamma, K):
    """alpha = T(atilde) and d alpha / d gamma for gamma = -log SNR of the Gaussian latent:
    atilde^2 = sigmoid(-gamma), m = exp(-gamma / 2), MATH (24). Linear interpolation in the
    table (float64)."""
    table = load_dto(K, gamma.device)
    n = len(table['alpha'])
    m = torch.exp(-gamma.double() / 2).clamp(max=(n - 1) * table['h'])  # beyond: alpha = 1
    pos = m / table['h']
    i = pos.floor().clamp(0, n - 2).long()
    frac = (pos - i).clamp(0, 1)
    alpha = table['alpha'][i] + frac * (table['alpha'][i + 1] - table['alpha'][i])
    slope = table['dalpha_dm'][i] + frac * (table['dalpha_dm'][i + 1] - table['dalpha_dm'][i])
    return alpha, slope * (-m / 2)                     # dm / dgamma = -m / 2


def gaussian_latent(x, gamma, noise):
    """w = atilde e_x + sqrt(1 - atilde^2) eps (B, L, K), gamma (B,), noise eps (B, L, K)."""
    atilde = torch.sigmoid(-gamma).sqrt().float()[:, None, None]
    w = (1 - atilde ** 2).sqrt() * noise
    return w.scatter_add(-1, x[..., None], atilde.expand(*x.shape, 1))


def curriculum_loss(model, x, u, args):
    """The discrete NELBO at alpha_t = T(atilde_t), the network reading the soft latent
    softmax(w_t / tau), MATH (26); gamma is linear in t over [gamma_min, gamma_max]."""
    K = args.vocab_size
    lo, hi = args.gamma_min, args.gamma_max
    gamma = lo + (hi - lo) * (EPS + (1 - EPS) * u)
    alpha_t, dalpha_dgamma = gaussian_to_uniform(gamma, K)
    dalpha_t = dalpha_dgamma * (hi - lo)                               # d alpha / dt
    w = gaussian_latent(x, gamma, torch.randn(*x.shape, K, device=x.device))
    z_t = w.argmax(-1)                                   # the uniform-state latent it maps to
    return elbo_loss(model, (w / args.tau).softmax(-1), x, z_t, alpha_t, dalpha_t, args)


def distill_round(step, every):
    """DCD: the teacher is refreshed at steps 0, every, 2 every, ...; round n: dt = 2^n / T."""
    return step // every


def distill_dt(step, every, T):
    return min(2 ** distill_round(step, every) / T, 1.0)


def teacher(model, state, step, every):
    """The frozen teacher of this round: a copy of the student taken when the round began."""
    n = distill_round(step, every)
    if state.get('teacher_round') != n:
        state['teacher'] = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        state['teacher_round'] = n
    return state['teacher']


def distill_loss(model, x, u, args, step, state):
    """Discrete Consistency Distillation, MATH (27): KL(student(z_t) || teacher(z_s)) per
    token, s = t - dt, with z_t, z_s the argmax of one Gaussian trajectory (a shared eps)."""
    K = args.vocab_size
    lo, hi = args.gamma_min, args.gamma_max
    dt = distill_dt(step, args.teacher_every, args.distill_T)
    t = (EPS + (1 - EPS) * u + dt).clamp(max=1)
    s = t - dt
    alpha_t, _ = gaussian_to_uniform(lo + (hi - lo) * t, K)
    alpha_s, _ = gaussian_to_uniform(lo + (hi - lo) * s, K)
    noise = torch.randn(*x.shape, K, device=x.device)   # one eps for both times
    z_t = gaussian_latent(x, lo + (hi - lo) * t, noise).argmax(-1)
    z_s = gaussian_latent(x, lo + (hi - lo) * s, noise).argmax(-1)
    with torch.no_grad():
        log_q = log_softmax(teacher(model, state, step, args.teacher_every)(
            z_s, sigma=sigma_of(alpha_s)), K)
    log_p = log_softmax(model(z_t, sigma=sigma_of(alpha_t)), K)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()   # KL(student || teacher)


# ---- evaluation ------------------------------------------------------------------------------

def prior_kl(K):
    """KL(q(z_1 | x) || uniform) per token, with alpha_1 = eps: the prior term, MATH (19)."""
    a = EPS
    return ((a + (1 - a) / K) * math.log(K * a + 1 - a)
            + (K - 1) / K * (1 - a) * math.log(1 - a))


@torch.no_grad()
def eval_nll(model, x, u, args):
    """An unbiased estimate of the NELBO per sequence with finite variance for any denoiser,
    MATH (21): t = v^2, v = 1 - u in (0, 1], weight dt/dv = 2v, so the O(1/t) integrand of a
    token redrawn to another value (probability O(t)) enters as O(1/v) with probability O(v^2).
    Plus the prior term, MATH (18)-(19). An upper bound on -log p(x), tight for the
    leave-one-out denoiser."""
    K = args.vocab_size
    L = x.shape[1]
    v = (1 - u.double()).clamp(min=1e-6)   # t >= 1e-12: alpha_t < 1 in float64
    alpha_t, dalpha_t = schedule(v ** 2)
    z_t = corrupt(x, alpha_t, K)
    a = alpha_t[:, None].expand_as(x)
    da = dalpha_t[:, None].expand_as(x)
    sigma = sigma_of(alpha_t)
    if args.fused:  # the same values, CHUNK rows of logits at a time
        rows = fused.Rows(nelbo_integrand, x.flatten(), z_t.flatten(), a.flatten(), da.flatten(), K)
        f = model(z_t, sigma=sigma, head=rows).view(x.shape)
    else:
        f = nelbo_integrand(model(z_t, sigma=sigma), x, z_t, a, da, K)
    return 2 * v * f.sum(1) + L * prior_kl(K), L


# ---- sampling --------------------------------------------------------------------------------

def posterior(p, z, alpha_t, alpha_s, K):
    """q(z_s | z_t = z, x = p) over the K tokens with x_theta = p (..., K), MATH (22):
    [K a_t p_z e_z + (a_t/a_s - a_t) e_z + (a_s - a_t) p + (1 - a_t/a_s)(1 - a_s)/K]
    / [K a_t p_z + 1 - a_t]."""
    p_z = p.gather(-1, z[..., None])
    q = (alpha_s - alpha_t) * p + (1 - alpha_t / alpha_s) * (1 - alpha_s) / K
    q = q.scatter_add(-1, z[..., None], K * alpha_t * p_z + alpha_t / alpha_s - alpha_t)
    return q / (K * alpha_t * p_z + 1 - alpha_t)


@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Ancestral sampling from uniform noise, MATH (22)-(23): T steps on t = linspace(1, 1e-5,
    T+1), each drawing z_s ~ q(z_s | z_t, x_theta(z_t)) (x_theta nucleus-filtered), then the noise
    removal: one more call at t = 1e-5 and a draw at alpha_s = 1 (--greedy-tail: argmax
    x_theta). NFE = T + 1. Kept tokens are clamped at every step. report(z, nfe, noisy),
    noisy: the tokens unlike argmax x_theta."""
    K = args.vocab_size
    T = args.steps or z.shape[1]
    dtype = torch.float64 if args.float64 else torch.float32
    z = torch.where(keep, z, torch.randint_like(z, K))  # the prior: uniform tokens
    t = torch.linspace(1, T_LAST, T + 1, dtype=torch.float64)
    alphas = schedule(t)[0].tolist() + [1.0]
    for i, (alpha_t, alpha_s) in enumerate(zip(alphas[:-1], alphas[1:])):
        alpha = torch.full((z.shape[0],), alpha_t, dtype=torch.float64, device=z.device)
        sigma = sigma_of(alpha)
        x_theta = model(z, sigma=sigma)[..., :K].to(dtype).softmax(-1)
        if args.greedy_tail and alpha_s == 1:
            z_s = x_theta.argmax(-1)
        else:  # the nucleus filters x_theta, not the posterior (mostly "stay at z_t")
            q = posterior(top_p_filter(x_theta, args.top_p), z, alpha_t, alpha_s, K)
            z_s = sample_categorical(q)
        z = torch.where(keep, z, z_s)
        report(z, i + 1, lambda: (z != x_theta.argmax(-1)) & ~keep)   # no argmax unless traced
    return z, T + 1


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """n sequences of `length` tokens; prompt (n, P) and fixed=(tokens, given) as in
    mdlm.sample. Clamping the given tokens conditions only approximately: the network was not
    trained to know which tokens are clean. Beyond the context: model.generate."""
    return generate(denoise, model, args, n, length, prompt, device, fixed, callback)
