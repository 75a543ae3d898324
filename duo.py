"""Duo: uniform-state discrete diffusion and its Gaussian dual (Sahoo et al. 2025; GUIDE §5).

Forward process: at time t every token independently stays clean with
probability alpha_t and is otherwise replaced by a uniform draw over the K
real tokens (which may redraw itself), so q(z_t | x) = alpha_t e_x + (1 - alpha_t)/K
and the prior z_1 is uniform noise; there is no [MASK] token. Unlike MDLM
every position may be noisy, so the network sees no clean/noisy flag: it is
time-conditioned on sigma_t = -log alpha_t and outputs x_theta = softmax
(the "mean" parameterisation). Plugging x_theta for x into the exact
posterior q(z_s | z_t, x) gives the reverse step, and the continuous-time
NELBO has a closed form per token (Duo eq. 17) that is cheap: a few
elementwise passes over the logits, no one-hot over the vocabulary. Its
optimum at position l is p(x_l | the noisy tokens at the *other* positions).

The duality: a Gaussian latent w_t = atilde_t e_x + sqrt(1 - atilde_t^2) eps
gives, through argmax(w_t), exactly this uniform-state process with
alpha_t = T(atilde_t), the Diffusion Transformation Operator. Duo uses it
twice. Curriculum (--curriculum-steps N): for the first N steps the network
reads the soft, low-variance input softmax(w_t / tau) while the loss stays
the discrete ELBO at alpha_t = T(atilde_t). Discrete Consistency Distillation
(--distill-from CKPT): a student at time t is pulled towards a frozen teacher
at s = t - dt, both reading argmax of the *same* Gaussian trajectory, with dt
doubling each time the teacher is refreshed; the student then samples well
in a few steps.

The contract of ar.py (vocab_size, train_loss, eval_nll, sample); vocab_size(K) = K, no [MASK].
"""
import copy
import math
import os

import torch
import torch.nn.functional as F

from model import Loss, in_windows, sample_categorical, start_tokens, top_p_filter, unwrap

EXACT = False  # eval_nll is the NELBO, an upper bound on the NLL
EPS = 1e-3     # alpha_1 = eps (GUIDE §1)


def add_args(parser):  # parser: the 'duo options' group of train.py / sample.py
    parser.add_argument('--curriculum-steps', type=int, default=0,
                        help='train on the Gaussian relaxation for the first N steps (paper: 500k of 1M; default 0 = off)')
    parser.add_argument('--tau', type=float, default=1e-3, help='curriculum softmax temperature (default: 1e-3)')
    parser.add_argument('--gamma-min', type=float, default=None,
                        help='Gaussian trajectory: gamma = -log SNR at t = 0 (default: -3.55 curriculum, -4 distillation)')
    parser.add_argument('--gamma-max', type=float, default=None,
                        help='gamma at t = 1 (default: -1.85 curriculum, -1 distillation)')
    parser.add_argument('--distill-from', default=None, help='Duo checkpoint to distill (DCD); the student starts from it')
    parser.add_argument('--teacher-every', type=int, default=None, help='DCD: refresh the teacher every N steps (default: 10000)')
    parser.add_argument('--distill-T', type=int, default=None, help='DCD: dt = 2^round / T (default: 512)')
    parser.add_argument('--greedy-tail', action='store_true', help='sampling: noise removal takes argmax x_theta')


def vocab_size(K):
    return K


# ---- forward process -------------------------------------------------------

def schedule(t):
    """Log-linear schedule (GUIDE §1): alpha_t = 1 - (1 - eps) t and alpha'_t."""
    return 1 - (1 - EPS) * t, -(1 - EPS) * torch.ones_like(t)


def corrupt(x, alpha_t, K):
    """z_t ~ q(z_t | x): each token is replaced by a uniform draw with probability 1 - alpha_t."""
    noisy = torch.rand(x.shape, device=x.device) < 1 - alpha_t[:, None]
    return torch.where(noisy, torch.randint_like(x, K), x)


# ---- the Gaussian dual: alpha = T(atilde), Duo eq. 10 ----------------------

def dto_table(K, h=2e-3):
    """alpha = T(atilde) and d alpha / dm on the grid m = 0, h, 2h, ... up to where
    alpha = 1, with m = atilde / sqrt(1 - atilde^2) the latent's signal-to-noise:
      T = K/(K-1) [ int phi(u - m) Phi(u)^(K-1) du - 1/K ]
    i.e. P(argmax w = x) = alpha + (1 - alpha)/K: the clean coordinate, N(m, 1),
    beats the K-1 others. The trapezoid rule on the line is spectrally
    accurate here (smooth, fast-decaying integrand), so a coarse u-grid suffices."""
    m_max = math.sqrt(2 * math.log(K)) + 10           # past the max of K-1 normals: alpha = 1
    m = torch.arange(0, m_max + h, h, dtype=torch.float64)
    du = 0.02
    u = torch.arange(-12, m_max + 12, du, dtype=torch.float64)
    g = torch.exp((K - 1) * torch.special.log_ndtr(u)) * du  # Phi(u)^(K-1) du
    I, dI = [], []
    for mc in m.split(1024):
        d = u - mc[:, None]
        phi = torch.exp(-0.5 * d ** 2) / math.sqrt(2 * math.pi)
        I.append(phi @ g)               # int phi(u - m) Phi^(K-1) du
        dI.append((d * phi) @ g)        # its derivative in m
    alpha = ((K * torch.cat(I) - 1) / (K - 1)).clamp(0, 1).cummax(0).values  # rounding at the flat end
    return {'K': K, 'h': h, 'alpha': alpha, 'dalpha_dm': K * torch.cat(dI) / (K - 1)}


_TABLES = {}


def load_dto(K, device='cpu'):
    """The table for K: from memory, else cache/duo_dto_K<K>.pt, else computed
    (well under a second for K = 50257) and written there."""
    key = (K, str(device))
    if key not in _TABLES:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache', f'duo_dto_K{K}.pt')
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
    """alpha = T(atilde) and d alpha / d gamma, for gamma = -log SNR of the
    Gaussian latent: atilde^2 = sigmoid(-gamma), m = exp(-gamma / 2).
    Linear interpolation in the table (float64)."""
    table = load_dto(K, gamma.device)
    n = len(table['alpha'])
    m = torch.exp(-gamma.double() / 2).clamp(max=(n - 1) * table['h'])  # beyond the table alpha = 1
    pos = m / table['h']
    i = pos.floor().clamp(0, n - 2).long()
    frac = (pos - i).clamp(0, 1)
    lerp = lambda v: v[i] + frac * (v[i + 1] - v[i])
    return lerp(table['alpha']), lerp(table['dalpha_dm']) * (-m / 2)   # dm/dgamma = -m/2


def gaussian_latent(x, gamma, noise):
    """w = atilde e_x + sqrt(1 - atilde^2) eps, (B, L, K), for gamma (B,) and noise eps (B, L, K)."""
    atilde = torch.sigmoid(-gamma).sqrt().float()[:, None, None]
    w = (1 - atilde ** 2).sqrt() * noise
    return w.scatter_add_(-1, x[..., None], atilde.expand(*x.shape, 1).contiguous())


def gamma_range(args, distill=False):
    lo = args.gamma_min if getattr(args, 'gamma_min', None) is not None else (-4.0 if distill else -3.55)
    hi = args.gamma_max if getattr(args, 'gamma_max', None) is not None else (-1.0 if distill else -1.85)
    if not lo < hi:
        raise ValueError(f'need --gamma-min < --gamma-max, got {lo} and {hi}')
    return lo, hi


# ---- loss ------------------------------------------------------------------

def nelbo_per_token(logits, x, z, alpha_t, dalpha_t, K, grad=False):
    """Closed-form NELBO integrand per token (Duo eq. 17; GUIDE §5), in float32 at least. logits (N, V >= K)
    with -inf beyond K; x clean, z noisy tokens (N,); alpha_t, alpha'_t (N,). With xbar = K a x_theta + (1 - a)
    the loss needs only sum_j log xbar_j and xbar at z and x. Written with r = K a / (1 - a) and
    e_j = r x_theta_j =: exp(v_j): log xbar_j = log(1 - a) + softplus(v_j), kappa = (1 - a) / (K a + 1 - a)
    = 1 / (1 + r): no large constants cancel near a = 0 or 1.
    grad=True (the fused path, where logits is a scratch chunk it overwrites) also returns d f / d logits,
    f = C (term1 - term2), C = a'/(K a), by hand: dv_j / dlogit_k = [j=k] - x_theta_k,
    d softplus(v)/dv = sigmoid(v) =: s, d sigmoid(-v)/dv = -s (1 - s), so with
      g_j = df/dv_j = C (c s_j + [j=z] g_z + [j=x] g_x),  g_z = (r/a) s_z (1 - s_z) - (K c + r) s_z,  g_x = r s_x
      df/dlogit_k = g_k - (e_k / r) sum_j g_j = C e_k (Q - c s_k) + the [j=z], [j=x] parts,
    Q = (c sum_j e_j s_j - g_z - g_x) / r (from sum_j s_j = r - sum_j e_j s_j, as e_j - s_j = e_j s_j)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)   # float32, or float64 if given
    a, da, logits = alpha_t.to(dtype), dalpha_t.to(dtype), logits.to(dtype)
    r = K * a / (1 - a)
    l_z, l_x = logits.gather(-1, z[:, None])[:, 0], logits.gather(-1, x[:, None])[:, 0]
    m = logits.detach().amax(-1, keepdim=True)
    e = (logits.sub_(m) if grad else logits - m).exp_()  # exp(logit_j - max), in place on the fused path
    S = e.sum(-1, keepdim=True)
    e = e.mul_(r[:, None] / S) if grad else e * (r[:, None] / S)  # e_j = r x_theta_j
    soft = torch.log1p(e)                                # softplus(v_j) = log(xbar_j / (1 - a))
    v_z, v_x = (l - m[:, 0] - S[:, 0].log() + torch.log(r) for l in (l_z, l_x))
    y_z, y_x = F.softplus(v_z), F.softplus(v_x)
    same, kappa = x == z, 1 / (1 + r)
    c = torch.where(same, kappa, 1.0)                    # kappa [x==z] + [x!=z]
    term1 = (r / a) * (c - torch.sigmoid(-v_z))          # K (1/xbar_z_true - 1/xbar[z])
    offset = torch.where(same, -(K - 1) * kappa, 1 + r) * torch.log1p(r)  # ((K-1)k[x==z] - [x!=z]/k) log k
    term2 = -c * (soft.sum(-1) - K * y_z) - r * (y_x - y_z) + offset
    C = da / (K * a)
    if not grad:
        return C * (term1 - term2)                       # >= 0 (a' < 0)
    s = torch.div(e, torch.add(e, 1, out=soft), out=soft)  # s_j = sigmoid(v_j) = e_j / (1 + e_j), in soft's memory
    s_z, s_x = torch.sigmoid(v_z), torch.sigmoid(v_x)
    g_z, g_x = (r / a) * s_z * (1 - s_z) - (K * c + r) * s_z, r * s_x
    Q = (c * torch.einsum('nv,nv->n', e, s) - g_z - g_x) / r
    g = s.mul_(-(C * c)[:, None]).add_((C * Q)[:, None]).mul_(e)  # C e_k (Q - c s_k): no c e_k - c e_k cancels
    g.scatter_add_(-1, z[:, None], (C * g_z)[:, None]).scatter_add_(-1, x[:, None], (C * g_x)[:, None])
    return C * (term1 - term2), g


def nelbo_loss(x, z_t, alpha_t, dalpha_t, args, weight=None):
    """The Loss (model.py) of the NELBO integrand at every position of x, z_t (B, L)."""
    n = x.shape[1]
    return Loss(nelbo_per_token, x.flatten(), z_t.flatten(), alpha_t.repeat_interleave(n),
                dalpha_t.repeat_interleave(n), args.vocab_size, weight=weight, fused=getattr(args, 'fused', True))


def prior_kl(K):
    """KL(q(z_1 | x) || uniform) per token: the NELBO's prior term, with alpha_1 = eps."""
    a = EPS
    return (a + (1 - a) / K) * math.log(K * a + 1 - a) + (K - 1) / K * (1 - a) * math.log(1 - a)


def elbo_loss(model, x, t, args, weight=None, z_t=None):
    """The NELBO integrand per token (B, L) at times t (B,), at z_t ~ q(z_t | x) (drawn
    unless given), or with weight (a number) the training loss, weight x its sum."""
    alpha_t, dalpha_t = schedule(t)
    z_t = corrupt(x, alpha_t, args.vocab_size) if z_t is None else z_t
    out = model(z_t, sigma=-torch.log(alpha_t).float(), loss=nelbo_loss(x, z_t, alpha_t, dalpha_t, args, weight))
    return out if weight is not None else out.view(x.shape)


def curriculum_loss(model, x, u, args):
    """Discrete ELBO at alpha_t = T(atilde_t), the network reading the soft latent
    softmax(w_t / tau) (Duo: curriculum learning; GUIDE §5). t maps linearly to gamma in [gamma_min, gamma_max]."""
    K = args.vocab_size
    if args.tau <= 0:
        raise ValueError(f'--tau must be > 0, got {args.tau}')
    lo, hi = gamma_range(args)
    gamma = lo + (hi - lo) * (EPS + (1 - EPS) * u)
    alpha_t, dalpha_dgamma = gaussian_to_uniform(gamma, K)
    dalpha_t = dalpha_dgamma * (hi - lo)                 # d alpha / dt
    w = gaussian_latent(x, gamma, torch.randn(*x.shape, K, device=x.device))
    z_t = w.argmax(-1)                                   # the uniform-state latent it maps to
    loss = nelbo_loss(x, z_t, alpha_t, dalpha_t, args, weight=1 / x.numel())   # the mean per token
    return model((w / args.tau).softmax(-1), sigma=-torch.log(alpha_t).float(), loss=loss)


def distill_round(step, every):
    """DCD: the teacher is refreshed at steps 0, every, 2 every, ...; round n uses dt = 2^n / T."""
    return step // every  # every >= 1 and T >= 1: train.check_args


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
    """Discrete Consistency Distillation (Duo; GUIDE §5): KL(student(z_t) || teacher(z_s)),
    s = t - dt, with z_t, z_s the argmax of one Gaussian trajectory (shared eps)."""
    K = args.vocab_size
    dt = distill_dt(step, args.teacher_every, args.distill_T)
    lo, hi = gamma_range(args, distill=True)
    t = (EPS + (1 - EPS) * u + dt).clamp(max=1)
    s = t - dt
    alpha_t, _ = gaussian_to_uniform(lo + (hi - lo) * t, K)
    alpha_s, _ = gaussian_to_uniform(lo + (hi - lo) * s, K)
    noise = torch.randn(*x.shape, K, device=x.device)   # one eps for both times
    z_t = gaussian_latent(x, lo + (hi - lo) * t, noise).argmax(-1)
    z_s = gaussian_latent(x, lo + (hi - lo) * s, noise).argmax(-1)
    with torch.no_grad():
        target = teacher(model, state, step, args.teacher_every)(z_s, sigma=-torch.log(alpha_s).float())
    log_q = target[..., :K].float().log_softmax(-1)
    log_p = model(z_t, sigma=-torch.log(alpha_t).float())[..., :K].float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()   # KL(student || teacher) per token


def train_loss(model, x, u, args, step, state):
    if getattr(args, 'distill_from', None):
        return distill_loss(model, x, u, args, step, state)
    if step < getattr(args, 'curriculum_steps', 0):
        return curriculum_loss(model, x, u, args)
    return elbo_loss(model, x, EPS + (1 - EPS) * u, args, weight=1 / x.numel())  # the mean; GUIDE §1


# ---- evaluation ------------------------------------------------------------

@torch.no_grad()
def eval_nll(model, x, u, args):
    """An unbiased, finite-variance estimate of the NELBO per sequence (prior term included),
    an upper bound on -log p(x), tight for the leave-one-out denoiser; t = 1 - u over (0, 1].
    A token redrawn to another value (probability q_t = (1 - alpha_t)(K-1)/K ~ t) has an
    integrand ~ 1/t: infinite variance. So each sequence estimates, with weight 2 (a fair
    coin), either sum_l f_l [z_l = x_l] at z_t ~ q(z_t | x), or sum_l f_l [z_l != x_l] as
    L q_t f_j at a uniform position j conditioned to differ, which is bounded."""
    K, (B, L) = args.vocab_size, x.shape
    t = 1 - u.double()
    alpha_t = schedule(t)[0]
    noisy = torch.rand(B, device=x.device) < 0.5                       # which part this row estimates
    forced = noisy[:, None] & (torch.arange(L, device=x.device) == torch.randint(L, (B, 1), device=x.device))
    z_t = torch.where(forced, (x + torch.randint_like(x, 1, K)) % K, corrupt(x, alpha_t, K))
    q_t = (1 - alpha_t[:, None]) * (K - 1) / K
    w = 2 * torch.where(noisy[:, None], L * q_t * forced, z_t == x)
    return (w * elbo_loss(model, x, t, args, z_t=z_t)).sum(1) + L * prior_kl(K), L


# ---- sampling --------------------------------------------------------------

def posterior(p, z, alpha_t, alpha_s, K):
    """q(z_s | z_t = z, x = p) over the K tokens (GUIDE §5), with x_theta = p (..., K):
    [K a_t p e_z + (a_t/a_s - a_t) e_z + (a_s - a_t) p + (1 - a_t/a_s)(1 - a_s)/K] / [K a_t p_z + 1 - a_t]."""
    p_z = p.gather(-1, z[..., None])
    q = (alpha_s - alpha_t) * p + (1 - alpha_t / alpha_s) * (1 - alpha_s) / K
    q = q.scatter_add(-1, z[..., None], K * alpha_t * p_z + alpha_t / alpha_s - alpha_t)
    return q / (K * alpha_t * p_z + 1 - alpha_t)


@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Ancestral sampling from uniform noise as in the seed: T steps on t = linspace(1, 1e-5, T+1),
    each drawing z_s ~ q(z_s | z_t, x_theta(z_t)) (nucleus-filtered), then noise removal: one more
    call at t = 1e-5 and a draw at alpha_s = 1 (--greedy-tail: argmax x_theta). NFE = T + 1. Kept
    tokens are clamped at every step. report(z, nfe, noisy), noisy: tokens unlike argmax x_theta."""
    K, T = args.vocab_size, getattr(args, 'steps', None) or z.shape[1]
    top_p, greedy = getattr(args, 'top_p', 1.0), getattr(args, 'greedy_tail', False)
    dtype = torch.float64 if getattr(args, 'float64', True) else torch.float32
    z = torch.where(keep, z, torch.randint_like(z, K))  # the prior: uniform tokens
    alphas = schedule(torch.linspace(1, 1e-5, T + 1, dtype=torch.float64))[0].tolist() + [1.0]
    for i, (alpha_t, alpha_s) in enumerate(zip(alphas[:-1], alphas[1:])):
        sigma = torch.full((z.shape[0],), -math.log(alpha_t), device=z.device)
        p = model(z, sigma=sigma)[..., :K].to(dtype).softmax(-1)   # x_theta
        z_s = p.argmax(-1) if greedy and alpha_s == 1 else \
            sample_categorical(top_p_filter(posterior(p, z, alpha_t, alpha_s, K), top_p))
        z = torch.where(keep, z, z_s)
        report(z, i + 1, lambda: (z != p.argmax(-1)) & ~keep)   # no argmax unless traced
    return z, T + 1


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """n sequences of `length` tokens; prompt (n, P) and fixed=(tokens, given) as in
    mdlm.sample. Clamping the given tokens conditions only approximately: the network
    was not trained to know which tokens are clean. Beyond the context: model.in_windows."""
    z, keep = start_tokens(n, length, args.vocab_size, prompt, fixed, device)
    return in_windows(denoise, model, args, z, keep, callback)
