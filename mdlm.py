"""MDLM: masked diffusion language model (Sahoo et al. 2024; MATH §3).

Forward process: at time t in [0, 1] every token independently stays clean with probability
alpha_t and becomes [MASK] otherwise (the log-linear schedule alpha_t = 1 - (1 - eps) t, so t
is about the fraction masked). The network x_theta(z_t) looks at the partly masked sequence and
predicts, at each masked position, a distribution over the clean token there. Two rules (the
SUBS parameterisation) make it a proper denoiser: it never predicts [MASK] (zero masking), and
a position that is not masked keeps its token (carry-over), so only masked positions carry a
loss. The continuous-time NELBO is then a weighted masked cross-entropy, MATH (7):

    NELBO(x) = E_t [ -alpha'_t / (1 - alpha_t) * sum_{l: z_t^l = MASK} -log x_theta(z_t)_l[x_l] ]

with weight -alpha'_t / (1 - alpha_t) = 1/t. Training drops the weight by default (--loss
low_var, the seed's choice: plain cross-entropy on masked tokens); validation always reports
the NELBO, so its perplexity is an upper bound. Sampling runs time backwards from all-[MASK]:
between t and s < t each masked token is revealed with probability (alpha_s - alpha_t) /
(1 - alpha_t), drawn from x_theta; revealed tokens never change. Without time conditioning
x_theta depends only on z_t, so a step that revealed nothing lets the next step reuse the last
network output (the cached sampler). Clean tokens given in advance (a prompt, or any positions
to infill) are carried over. The contract: ar.py. Eso-LM (esolm.py) builds on this file.
"""
import torch

import fused
from model import cross_entropy, flops_per_token, generate, sample_categorical, top_p_filter

EXACT = False           # eval_nll is the NELBO, an upper bound on the NLL
VARIABLE_LENGTH = True
EPS = 1e-3              # alpha_1 = eps: the schedule stops just short of all-masked
T_LAST = 1e-5           # the samplers' last time before their noise-removal step, MATH (13)


def add_args(parser):  # esolm.py reads --loss and --time-cond too
    parser.add_argument('--loss', choices=['low_var', 'elbo'], default='low_var',
                        help="training loss: low_var = cross-entropy on masked tokens (the "
                             "seed's), elbo = with the NELBO's weight; validation: the NELBO")
    parser.add_argument('--time-cond', action='store_true',
                        help='feed sigma_t = -log alpha_t to the network (off in the MDLM paper '
                             'and the seed)')


def defaults(args, gpu):
    return {}


def check_args(args, training):
    pass  # the cached sampler checks --time-cond itself: it depends on --cache


def vocab_size(K):
    return K + 1  # ids 0..K-1 are tokens, K is [MASK]


def mask_id(K):
    return K      # [MASK]: the id after the K real tokens


# ---- forward process -------------------------------------------------------------------------

def schedule(t, alpha0=1.0):
    """The log-linear schedule alpha_t = alpha0 (1 - (1 - eps) t) and its derivative alpha'_t,
    MATH (3); MDLM and Duo use alpha0 = 1, Eso-LM its alpha_0, MATH (28)."""
    return alpha0 * (1 - (1 - EPS) * t), -alpha0 * (1 - EPS) * torch.ones_like(t)


def sigma_of(alpha_t):
    """What a time-conditioned network reads: sigma_t = -log alpha_t, MATH (3)."""
    return -torch.log(alpha_t).float()


def corrupt(x, alpha_t, K):
    """z_t ~ q(z_t | x): each token becomes [MASK] with probability 1 - alpha_t, MATH (5)."""
    masked = torch.rand(x.shape, device=x.device) < 1 - alpha_t[:, None]
    return torch.where(masked, mask_id(K), x)


# ---- loss ------------------------------------------------------------------------------------

def loss_weight(alpha_t, dalpha_t, args):
    """The weight of a sequence's masked cross-entropy: the NELBO's -alpha'_t / (1 - alpha_t)
    (= 1/t) with --loss elbo, MATH (7), or 1 with low_var, MATH (8). Eso-LM's too."""
    if args.loss == 'elbo':
        return -dalpha_t / (1 - alpha_t)
    return torch.ones_like(alpha_t)


def train_loss(model, x, u, args, step, state):
    """The NELBO's masked cross-entropy, weighted by -alpha'_t / (1 - alpha_t) (--loss elbo,
    MATH (7)) or by 1 (low_var, MATH (8)), summed and divided by the B L tokens."""
    K = args.vocab_size
    t = EPS + (1 - EPS) * u                               # MATH (4)
    alpha_t, dalpha_t = schedule(t)
    z_t = corrupt(x, alpha_t, K)
    masked = z_t == mask_id(K)                            # carry-over: the rest cost nothing
    sigma = sigma_of(alpha_t) if args.time_cond else None
    weight = loss_weight(alpha_t, dalpha_t, args)[:, None].expand_as(x)[masked]  # per token
    if args.fused:  # the same number without the (N, V) logits: fused.py
        head = fused.cross_entropy_head(x[masked], K, weight)
        return model(z_t, sigma=sigma, select=masked, head=head) / x.numel()
    logits = model(z_t, sigma=sigma, select=masked)       # at the masked positions (N, V)
    nll = cross_entropy(logits, x[masked], K)             # -log x_theta(z_t)_l[x_l], MATH (7)
    return (weight * nll).sum() / x.numel()


def mfu_flops(cfg, args):  # the output layer runs at the masked positions: E[1 - alpha_t] = 1/2
    return flops_per_token(cfg, args.block_size, attention=True, out_share=0.5)


# ---- evaluation ------------------------------------------------------------------------------

def masked_subset(x, u, alpha0=1.0):
    """k ~ pi(k) = P(Binomial(L, 1 - alpha0) < k) / (L alpha0), k = 1..L, by the inverse CDF
    at the stratified u, and a uniform k-subset of each row: masked (B, L), k (B,).
    alpha0 = 1 (MDLM): k ~ U{1..L}, MATH (10); Eso-LM: MATH (33)."""
    L = x.shape[1]
    j = torch.arange(L + 1, dtype=torch.float64)
    a0 = torch.tensor(alpha0, dtype=torch.float64)
    log_pmf = (torch.lgamma(j[-1] + 1) - torch.lgamma(j + 1) - torch.lgamma(L - j + 1)
               + torch.xlogy(j, 1 - a0) + torch.xlogy(L - j, a0))   # P(Binomial(L, 1-a0) = j)
    cdf = log_pmf.exp().cumsum(0)[:L].cumsum(0) / (L * alpha0)      # sum_k P(Bin < k) = L a0
    k = torch.searchsorted(cdf, u.double().cpu(), right=True) + 1
    k = k.clamp(max=L).to(x.device)
    rank = torch.rand(x.shape, device=x.device).argsort(1).argsort(1)  # a random order per row
    return rank < k[:, None], k


@torch.no_grad()
def eval_nll(model, x, u, args):
    """An unbiased, finite-variance estimate of the exact NELBO per sequence, MATH (9)-(10):
    L/k times the masked cross-entropy of a uniform k-subset, k ~ U{1..L}. An upper bound on
    -log p(x), equal to it for the exact denoiser (no eps, no prior term). --time-cond: the
    network sees alpha_t = 1 - t with t ~ Beta(k, L - k + 1), MATH (11)."""
    K = args.vocab_size
    L = x.shape[1]
    masked, k = masked_subset(x, u)
    z = torch.where(masked, mask_id(K), x)
    sigma = None
    if args.time_cond:  # t given k
        t = torch.distributions.Beta(k.double(), (L - k + 1).double()).sample()
        sigma = sigma_of(1 - t.clamp(max=1 - 1e-12))
    nll = masked_nll(model, args, x[masked], z, sigma=sigma, select=masked)
    return L / k * per_sequence(nll, masked), L


def masked_nll(model, args, targets, x, **inputs):
    """-log x_theta at the positions `select` picks from the input x (N,), without gradients;
    fused: the output layer CHUNK rows at a time, the same values. Eso-LM's too."""
    if args.fused:
        return model(x, **inputs, head=fused.Rows(cross_entropy, targets, args.vocab_size))
    return cross_entropy(model(x, **inputs), targets, args.vocab_size)


def per_sequence(nll, select):
    """Sum per-token values nll (N,), one per True entry of select (B, n), row by row: (B,)."""
    rows = select.nonzero()[:, 0]
    return torch.zeros(len(select), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


# ---- sampling --------------------------------------------------------------------------------

@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Fill the positions of z (n, l) that are not kept ([MASK]) by ancestral sampling, MATH
    (12)-(13); kept tokens stay (carry-over), which is how prompts and infilling condition the
    sampler. T steps on t = linspace(1, 1e-5, T+1), then a noise-removal step to alpha = 1
    that reveals whatever is still masked; report(z, nfe, masked) after each step that
    reveals a token. Returns (tokens, NFE)."""
    K = args.vocab_size
    T = args.steps or z.shape[1]
    dtype = torch.float64 if args.float64 else torch.float32
    if args.cache and args.time_cond:
        raise ValueError('the cached sampler reuses x_theta across steps, which is only valid '
                         'without time conditioning: sample this --time-cond model with '
                         '--no-cache')
    z = z.clone()
    masked = ~keep
    left = int(masked.sum())  # tokens still masked
    t = torch.linspace(1, T_LAST, T + 1, dtype=torch.float64)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    alphas = schedule(t)[0].tolist()  # eps at t = 1 ... exactly 1 at the final t = 0
    logits = None
    nfe = 0
    for alpha_t, alpha_s in zip(alphas[:-1], alphas[1:]):
        if left == 0:
            break
        if logits is None:  # x_theta's logits at the masked positions (N, K), row-major
            sigma = None
            if args.time_cond:
                alpha = torch.full((z.shape[0],), alpha_t, dtype=torch.float64, device=z.device)
                sigma = sigma_of(alpha)
            logits = model(z, sigma=sigma, select=masked)[:, :K]  # no [MASK]: zero masking
            nfe += 1
        # q(z_s | z_t = MASK, x_theta), MATH (12): stay masked w.p. (1 - alpha_s)/(1 - alpha_t),
        # else a token from x_theta; drawn in two steps
        p_reveal = (alpha_s - alpha_t) / (1 - alpha_t)
        reveal = torch.rand(left, device=z.device, dtype=dtype) < p_reveal
        revealed = int(reveal.sum())
        if revealed:
            probs = top_p_filter(logits[reveal].to(dtype).softmax(-1), args.top_p)
            where = masked.clone()
            where[masked] = reveal
            z[where] = sample_categorical(probs)
            masked = masked & ~where
            left -= revealed
            report(z, nfe, masked)
        if revealed or not args.cache:  # else z, hence x_theta(z), is unchanged: reuse it
            logits = None
    return z, nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """n sequences of `length` tokens. prompt (n, P): a clean prefix; fixed=(tokens, given), both
    (n, length): infilling, tokens clean where given. Beyond the context in windows, and
    callback(z, nfe, masked) after each step that reveals: model.generate."""
    return generate(denoise, model, args, n, length, prompt, device, fixed, callback)
