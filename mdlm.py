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

Same four functions as ar.py, duo.py and esolm.py:
  vocab_size(K)                     K real tokens + [MASK] (id K)
  train_loss(model, x, u, args, step, state) -> scalar, mean per token
  eval_nll(model, x, u, args)       -> (NELBO per sequence (B,), tokens per sequence)
  sample(model, args, n, length, prompt=None, device='cpu') -> (tokens (n, length), NFE)
Pieces Eso-LM reuses: schedule, mask_tokens, time_sigma, masked_cross_entropy,
loss_weight.
"""
import torch

from model import Loss, cross_entropy, flops_per_token, sample_categorical, top_p_filter

EXACT = False  # eval_nll is the NELBO, an upper bound on the NLL
EPS = 1e-3     # alpha_1 = eps: the schedule stops just short of all-masked (GUIDE §1)


def add_args(parser):  # a parser or argument group; esolm.py reads --loss and --time-cond too
    parser.add_argument('--loss', choices=['low_var', 'elbo'], default='low_var',
                        help="training loss: low_var = cross-entropy on masked tokens (seed default), elbo = "
                             "the NELBO's alpha'/(1-alpha) weight; validation always reports the NELBO")
    parser.add_argument('--time-cond', action='store_true',
                        help='feed sigma_t = -log alpha_t to the network (off in the MDLM paper and the seed)')
    parser.add_argument('--stride', type=int, default=None,
                        help='sampling beyond the training context: new tokens per window (default: half of it)')


def vocab_size(K):
    return K + 1  # ids 0..K-1 are tokens, K is [MASK]


# ----------------------------------------------------------------------------
# forward process

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


# ----------------------------------------------------------------------------
# loss

def masked_cross_entropy(logits, targets, mask_id, grad=False):
    """-log x_theta(z_t)_l[x^l] for the selected (masked) positions, logits (N, V).
    SUBS zero masking: the [MASK] logit is -inf, so x_theta never predicts [MASK].
    (Carry-over: unmasked positions are never selected, so they cost nothing.)"""
    logits[:, mask_id] = float('-inf')  # in place: the output layer does not save its output
    return cross_entropy(logits, targets, grad)


def loss_weight(alpha_t, dalpha_t, args, elbo=False):
    """Per-sequence weight of the masked cross-entropy: the NELBO's
    -alpha'_t / (1 - alpha_t) (= 1/t here), or 1 for the low_var training loss."""
    if elbo or getattr(args, 'loss', 'low_var') == 'elbo':
        return -dalpha_t / (1 - alpha_t)
    return torch.ones_like(alpha_t)


def masked_losses(model, x, u, args, train=False):
    """One draw of the forward process and the network's loss on it: returns
    -log x_theta(z_t)_l[x^l] at the masked positions (N,), the row of each,
    and alpha_t, alpha'_t (B,). train=True: the training loss instead, their sum
    weighted by loss_weight, per token (the fused path needs the weights up front)."""
    t = EPS + (1 - EPS) * u                       # u: stratified uniforms from the trainer (GUIDE §1)
    alpha_t, dalpha_t = schedule(t)
    z_t, masked = mask_tokens(x, alpha_t, args.vocab_size)
    rows, cols = masked.nonzero(as_tuple=True)    # row-major, the order of select= below
    w = loss_weight(alpha_t, dalpha_t, args)[rows] / x.numel() if train else None  # per token, over B*L
    nll = model(z_t, sigma=time_sigma(alpha_t, args), select=masked,  # output layer only where masked
                loss=Loss(masked_cross_entropy, x[rows, cols], args.vocab_size, weight=w,
                          fused=getattr(args, 'fused', True)))
    return nll if train else (nll, rows, alpha_t, dalpha_t)


def train_loss(model, x, u, args, step, state):
    return masked_losses(model, x, u, args, train=True)


def mfu_flops(cfg, args):  # per token: the output layer runs at the masked positions, E[1 - alpha_t] = 1/2
    return flops_per_token(cfg, args.block_size, attention=True, out_share=0.5)


# ----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def eval_nll(model, x, u, args):
    """Monte Carlo NELBO per sequence, one t per sequence: always the true
    alpha'/(1-alpha) weight, whatever --loss trained the model."""
    nll, rows, alpha_t, dalpha_t = masked_losses(model, x, u, args)
    per_seq = torch.zeros(x.shape[0], device=x.device).index_add_(0, rows, nll.float())
    return loss_weight(alpha_t, dalpha_t, args, elbo=True) * per_seq, x.shape[1]


# ----------------------------------------------------------------------------
# sampling

@torch.no_grad()
def denoise(model, z, args):
    """Fill every [MASK] of z (n, l) by ancestral sampling; other tokens are kept
    (carry-over), which is how prompts and infilling condition the sampler.
    T steps on t = linspace(1, 1e-5, T+1), then a noise-removal step to
    alpha = 1 that reveals whatever is still masked. Returns (tokens, NFE)."""
    K, T = args.vocab_size, getattr(args, 'steps', None) or z.shape[1]
    cache, top_p = getattr(args, 'cache', True), getattr(args, 'top_p', 1.0)
    dtype = torch.float64 if getattr(args, 'float64', True) else torch.float32
    if cache and getattr(args, 'time_cond', False):
        raise ValueError('the cached sampler reuses x_theta across steps, which is only valid '
                         'without time conditioning: sample this --time-cond model without it (--no-cache)')
    z, masked = z.clone(), z == K
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
        if revealed or not cache:  # else z, hence x_theta(z), is unchanged: reuse it
            logits = None
    return z, nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None):
    """n sequences of `length` tokens. prompt (n, P): a clean prefix, kept.
    fixed=(tokens, given), both (n, length): infilling, the tokens where
    `given` is True are clean and kept. Longer than the training context
    (args.block_size), it samples semi-autoregressively in windows of
    block_size tokens: the first window, then repeatedly the last
    block_size - new tokens so far as a clean prefix and new <= args.stride
    fresh positions. args.steps (T) is per window; NFE counts them all."""
    K = args.vocab_size
    z = torch.full((n, length), K, dtype=torch.long, device=device)
    keep = torch.zeros(n, length, dtype=torch.bool, device=device)
    if prompt is not None:
        if prompt.dim() != 2 or prompt.shape[0] != n or prompt.shape[1] > length:
            raise ValueError(f'prompt must be (n={n}, P <= length={length}), got {tuple(prompt.shape)}')
        z[:, :prompt.shape[1]], keep[:, :prompt.shape[1]] = prompt, True
    if fixed is not None:
        tokens, given = fixed[0].to(device), fixed[1].to(device)
        if tokens.shape != (n, length) or given.shape != (n, length):
            raise ValueError(f'fixed=(tokens, given) must both be (n={n}, length={length})')
        z, keep = torch.where(given, tokens, z), keep | given
    if ((z[keep] < 0) | (z[keep] >= K)).any():
        raise ValueError(f'prompt and fixed tokens must be ids in [0, {K}), the real vocabulary')
    context = getattr(args, 'block_size', None) or length
    if length <= context:
        return denoise(model, z, args)
    stride = getattr(args, 'stride', None) or context // 2
    if not 0 < stride < context:
        raise ValueError(f'--stride must be in [1, block_size - 1] = [1, {context - 1}], got {stride}')
    out, nfe = denoise(model, z[:, :context], args)
    while out.shape[1] < length:
        new = min(stride, length - out.shape[1])
        window = torch.cat([out[:, out.shape[1] - (context - new):], z[:, out.shape[1]:out.shape[1] + new]], 1)
        window, calls = denoise(model, window, args)
        out, nfe = torch.cat([out, window[:, -new:]], 1), nfe + calls
    return out, nfe
