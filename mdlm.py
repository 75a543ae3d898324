"""MDLM: masked diffusion language model (Sahoo et al. 2024; GUIDE §4).

Forward process: at time t in [0, 1] every token independently stays clean
with probability alpha_t and becomes [MASK] otherwise (the log-linear
schedule alpha_t = 1 - (1 - eps) t, so t is roughly the fraction masked).
The network x_theta(z_t) looks at the partly masked sequence and predicts,
at each masked position, a distribution over the clean token there. Two
rules (the SUBS parameterisation) make it a proper denoiser: it never
predicts [MASK] (zero masking: that logit is -inf), and a position that is
not masked keeps its token with probability 1 (carry-over), so only masked
positions carry a loss. The continuous-time NELBO is then a weighted masked
cross-entropy,

    NELBO(x) = E_t [ alpha'_t / (1 - alpha_t) * sum_{l: z_t^l = MASK} log x_theta(z_t)_l[x^l] ],

with weight -alpha'_t / (1 - alpha_t) = 1 / t for this schedule. Training by
default drops the weight (`--loss low_var`, the seed's choice: plain
cross-entropy on masked tokens); validation always reports the true NELBO,
so its perplexity is an upper bound. Sampling runs time backwards from the
all-[MASK] sequence: between t and s < t each masked token is revealed with
probability (alpha_s - alpha_t) / (1 - alpha_t) and drawn from x_theta;
revealed tokens never change. Without time conditioning x_theta depends only
on z_t, so a step that revealed nothing lets the next step reuse the last
network output (the cached sampler). Clean tokens given in advance (a
prompt, or any positions to infill) are just carried over, and text longer
than the training context is generated window by window, each window keeping
the tail of the previous one as its clean prefix.

The contract of ar.py (vocab_size, train_loss, eval_nll, sample); vocab_size(K) = K real tokens + [MASK], id K.
Pieces Eso-LM reuses: schedule, mask_tokens, masked_cross_entropy, loss_weight, masked_subset.
"""
import torch

from model import Loss, cross_entropy, flops_per_token, in_windows, sample_categorical, start_tokens, top_p_filter

EXACT = False  # eval_nll is the NELBO, an upper bound on the NLL
EPS = 1e-3     # alpha_1 = eps: the schedule stops just short of all-masked (GUIDE §1)


def add_args(parser):  # a parser or argument group; esolm.py reads --loss and --time-cond too
    parser.add_argument('--loss', choices=['low_var', 'elbo'], default='low_var',
                        help="training loss: low_var = cross-entropy on masked tokens (seed default), elbo = "
                             "the NELBO's alpha'/(1-alpha) weight; validation always reports the NELBO")
    parser.add_argument('--time-cond', action='store_true',
                        help='feed sigma_t = -log alpha_t to the network (off in the MDLM paper and the seed)')


def vocab_size(K):
    return K + 1  # ids 0..K-1 are tokens, K is [MASK]


# ---- forward process -------------------------------------------------------

def schedule(t, alpha0=1.0):
    """Log-linear schedule (GUIDE §1): alpha_t = alpha0 (1 - (1 - eps) t) and its
    derivative alpha'_t. MDLM uses alpha0 = 1; Eso-LM scales it by alpha_0."""
    return alpha0 * (1 - (1 - EPS) * t), -alpha0 * (1 - EPS) * torch.ones_like(t)


def mask_tokens(x, alpha_t, mask_id):
    """z_t ~ q(z_t | x): each token becomes [MASK] with probability 1 - alpha_t."""
    masked = torch.rand(x.shape, device=x.device) < 1 - alpha_t[:, None]
    return torch.where(masked, mask_id, x), masked


def time_sigma(alpha_t, args):
    """Time conditioning: sigma_t = -log alpha_t with --time-cond, else None (zeros)."""
    return -torch.log(alpha_t).float() if getattr(args, 'time_cond', False) else None


# ---- loss ------------------------------------------------------------------

def masked_cross_entropy(logits, targets, mask_id, grad=False):
    """-log x_theta(z_t)_l[x^l] for the selected (masked) positions, logits (N, V).
    SUBS zero masking: the [MASK] logit is -inf, so x_theta never predicts [MASK].
    (Carry-over: unmasked positions are never selected, so they cost nothing.)"""
    logits[:, mask_id] = float('-inf')  # in place: the output layer does not save its output
    return cross_entropy(logits, targets, grad)


def loss_weight(alpha_t, dalpha_t, args):
    """Per-sequence weight of the masked cross-entropy in training: the NELBO's
    -alpha'_t / (1 - alpha_t) (= 1/t here) with --loss elbo, or 1 (low_var)."""
    if getattr(args, 'loss', 'low_var') == 'elbo':
        return -dalpha_t / (1 - alpha_t)
    return torch.ones_like(alpha_t)


def masked_nll(model, x, masked, alpha_t, args, weight=None):
    """-log x_theta(z_t)_l[x^l] at the masked positions (N,), row-major, and the row of each;
    with a per-sequence weight (B,), their weighted sum instead: the training loss (the fused
    path needs the weights up front)."""
    rows, cols = masked.nonzero(as_tuple=True)    # row-major, the order of select= below
    z_t = torch.where(masked, args.vocab_size, x)
    loss = Loss(masked_cross_entropy, x[rows, cols], args.vocab_size, fused=getattr(args, 'fused', True),
                weight=None if weight is None else weight[rows])
    return model(z_t, sigma=time_sigma(alpha_t, args), select=masked, loss=loss), rows  # output layer at masks


def masked_losses(model, x, u, args, train=False):
    """One draw of the forward process and the network's loss on it: returns
    -log x_theta(z_t)_l[x^l] at the masked positions (N,), the row of each,
    and alpha_t, alpha'_t (B,); train=True: the training loss, per token."""
    t = EPS + (1 - EPS) * u                       # u: stratified uniforms from the trainer (GUIDE §1)
    alpha_t, dalpha_t = schedule(t)
    _, masked = mask_tokens(x, alpha_t, args.vocab_size)
    w = loss_weight(alpha_t, dalpha_t, args) / x.numel() if train else None  # per token, over B*L
    nll, rows = masked_nll(model, x, masked, alpha_t, args, w)
    return nll if train else (nll, rows, alpha_t, dalpha_t)


def train_loss(model, x, u, args, step, state):
    return masked_losses(model, x, u, args, train=True)


def mfu_flops(cfg, args):  # per token: the output layer runs at the masked positions, E[1 - alpha_t] = 1/2
    return flops_per_token(cfg, args.block_size, attention=True, out_share=0.5)


# ---- evaluation ------------------------------------------------------------

def masked_subset(x, u, alpha0=1.0):
    """k ~ pi(k) = P(Binomial(L, 1 - alpha0) < k) / (L alpha0), k = 1..L, by inverse CDF
    at the stratified u, and a uniform k-subset of each row: masked (B, L), k (B,)."""
    L, j, a0 = x.shape[1], torch.arange(x.shape[1] + 1, dtype=torch.float64), torch.tensor(alpha0, dtype=torch.float64)
    log_pmf = torch.lgamma(j[-1] + 1) - torch.lgamma(j + 1) - torch.lgamma(L - j + 1) \
        + torch.xlogy(j, 1 - a0) + torch.xlogy(L - j, a0)                  # log P(Binomial(L, 1 - alpha0) = j)
    cdf = log_pmf.exp().cumsum(0)[:L].cumsum(0) / (L * alpha0)     # sum_k P(Bin < k) = L alpha0
    k = (torch.searchsorted(cdf, u.double().cpu(), right=True) + 1).clamp(max=L).to(x.device)
    return torch.rand(x.shape, device=x.device).argsort(1).argsort(1) < k[:, None], k


@torch.no_grad()
def eval_nll(model, x, u, args):
    """An unbiased, finite-variance estimate of the exact NELBO per sequence, an upper
    bound on -log p(x) and equal to it for the exact denoiser. Without time conditioning
    the NELBO does not depend on the schedule: take alpha_t = 1 - t on (0, 1] (no eps,
    no prior term). With k ~ Binomial(L, t) masked, int_0^1 (1/t) P(k | t) dt = 1/k, so
        NELBO = sum_{k=1..L} E_{|S|=k} [ (1/k) sum_{l in S} -log x_theta(x_l | x outside S) ]:
    L/k times the masked cross-entropy of a uniform k-subset, k ~ U{1..L}, is unbiased and
    bounded (no 1/t weight). --time-cond: the network sees alpha_t = 1 - t, t ~ Beta(k, L-k+1)."""
    L = x.shape[1]
    masked, k = masked_subset(x, u)
    alpha_t = None
    if getattr(args, 'time_cond', False):  # t given k
        alpha_t = 1 - torch.distributions.Beta(k.double(), (L - k + 1).double()).sample().clamp(max=1 - 1e-12)
    nll, rows = masked_nll(model, x, masked, alpha_t, args)
    per_seq = torch.zeros(x.shape[0], device=x.device).index_add_(0, rows, nll.float())
    return L / k * per_seq, L


# ---- sampling --------------------------------------------------------------

@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Fill the positions of z (n, l) that are not kept ([MASK]) by ancestral sampling;
    kept tokens stay (carry-over), which is how prompts and infilling condition the
    sampler. T steps on t = linspace(1, 1e-5, T+1), then a noise-removal step to
    alpha = 1 that reveals whatever is still masked; report(z, nfe, masked) after
    each step that reveals a token. Returns (tokens, NFE)."""
    K, T = args.vocab_size, getattr(args, 'steps', None) or z.shape[1]
    cache, top_p = getattr(args, 'cache', True), getattr(args, 'top_p', 1.0)
    dtype = torch.float64 if getattr(args, 'float64', True) else torch.float32
    if cache and getattr(args, 'time_cond', False):
        raise ValueError('the cached sampler reuses x_theta across steps, which is only valid '
                         'without time conditioning: sample this --time-cond model without it (--no-cache)')
    z, masked = z.clone(), ~keep
    left = int(masked.sum())  # tokens still masked
    t = torch.cat([torch.linspace(1, 1e-5, T + 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    alphas = schedule(t)[0].tolist()  # eps at t = 1 ... exactly 1 at the final t = 0
    logits, nfe = None, 0
    for alpha_t, alpha_s in zip(alphas[:-1], alphas[1:]):
        if left == 0:
            break
        if logits is None:  # x_theta at the masked positions, (N, V) in row-major order of `masked`
            sigma = time_sigma(torch.full((z.shape[0],), alpha_t, device=z.device), args)
            logits = model(z, sigma=sigma, select=masked)[:, :K]  # drop [MASK] and padding: zero masking
            nfe += 1
        # q(z_s | z_t, x_theta) for a masked z_t (MDLM, SUBS reverse step): stay [MASK] with
        # prob (1 - alpha_s) / (1 - alpha_t), else a token from x_theta; drawn in two steps
        reveal = torch.rand(left, device=z.device, dtype=dtype) < (alpha_s - alpha_t) / (1 - alpha_t)
        revealed = int(reveal.sum())
        if revealed:
            probs = top_p_filter(logits[reveal].to(dtype).softmax(-1), top_p)
            where = masked.clone()
            where[masked] = reveal
            z[where] = sample_categorical(probs)
            masked, left = masked & ~where, left - revealed
            report(z, nfe, masked)
        if revealed or not cache:  # else z, hence x_theta(z), is unchanged: reuse it
            logits = None
    return z, nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """n sequences of `length` tokens. prompt (n, P): a clean prefix; fixed=(tokens, given), both
    (n, length): infilling, tokens clean where given. Beyond the context in windows, and callback
    (z, nfe, masked) after each step that reveals: model.in_windows."""
    z, keep = start_tokens(n, length, args.vocab_size, prompt, fixed, device)
    return in_windows(denoise, model, args, z, keep, callback)
