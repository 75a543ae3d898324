"""Eso-LM: masked diffusion and autoregression in one causal network (GUIDE §6).

Sahoo et al., "Esoteric Language Models" (arXiv 2506.01928), variant (B).
A sequence is generated in two phases. First masked diffusion, from the
all-[MASK] sequence at t = 1 down to t = 0, with the schedule
alpha_t = alpha_0 (1 - (1 - eps) t): it reveals about a fraction alpha_0 of
the tokens, at random positions, several per step. Then an autoregressive
phase fills the rest left to right, one per step. alpha_0 = 1 is MDLM-like,
alpha_0 = 0 is AR.

The trick that makes both phases causal, so that both decode with a KV cache:
every sequence is processed in a *sorted order*, clean tokens first and masked
tokens after, each token keeping its own rotary position. Under causal
attention over that order a masked token sees every clean token and no other
masked token's identity (what an MDLM denoiser sees), and a token, once
decided, never changes, so its keys and values are computed once. The sampler
simply decides the sorted sequence left to right, a block of tokens per step.

The NELBO splits at t = 0, where z_0 ~ q(z_0 | x) still has a fraction
1 - alpha_0 of the tokens masked:
  -log p(x) <= E_t [-alpha'_t / (1 - alpha_t) sum_{l masked in z_t} -log x_theta(x_l | z_t)]  diffusion
             + E_z0 [sum_{l masked in z_0} -log x_theta(x_l | z_0, x before l)]              sequential
The diffusion term is MDLM's NELBO with a schedule that stops at alpha_0
instead of 1, computed causally over [clean (random order), masked (random
order)]. The sequential term uses the order [clean (random), masked (left to
right)] and one pass over the input [z_0, x] of length 2L with the attention
mask of GUIDE §6, so that every masked z_0 token sees the clean tokens and the
true tokens before it, all at once (teacher forcing). Training gives a
fraction --batch-split of the batch the diffusion loss and the rest the
sequential one. The network never sees the time (--time-cond is refused): a
cached key must stay valid at every later step.

The contract of ar.py (vocab_size, train_loss, eval_nll, sample); vocab_size(K) = K real tokens + [MASK], id K.
"""
import math

import torch

from mdlm import loss_weight, mask_tokens, masked_cross_entropy, masked_subset, schedule, vocab_size  # noqa: F401
from model import KVCache, Loss, flops_per_token, in_windows, sample_categorical, start_tokens, top_p_filter

EXACT = False  # eval_nll is the NELBO (or an importance-weighted bound), not the exact NLL
EPS = 1e-3     # the same eps as MDLM (mdlm.schedule uses it)


def add_args(parser):  # a parser or argument group; --loss (and --time-cond) belong to mdlm.py
    parser.add_argument('--alpha0', type=float, default=1.0, help='fraction of tokens made by diffusion: '
                        '1 = MDLM-like, 0 = AR (default: 1); may differ at sampling')
    parser.add_argument('--batch-split', type=float, default=1.0, help='fraction of each batch trained with '
                        'the diffusion loss, the rest with the sequential one (default: 1)')
    parser.add_argument('--iw-orders', type=int, default=0, help='validate with an importance-weighted bound '
                        'over this many random orders (default: 0 = the NELBO)')


def check_args(args, training=False):
    a0, split = getattr(args, 'alpha0', 1.0), getattr(args, 'batch_split', 1.0)
    if not 0 <= a0 <= 1:
        raise ValueError(f'--alpha0 must be in [0, 1], got {a0}')
    if getattr(args, 'time_cond', False):
        raise ValueError("Eso-LM's network sees no time (decided tokens keep their cached keys): "
                         'drop --time-cond')
    if getattr(args, 'iw_orders', 0) < 0:
        raise ValueError(f'--iw-orders must be >= 0, got {args.iw_orders}')
    if not training:
        return
    if not 0 <= split <= 1:
        raise ValueError(f'--batch-split must be in [0, 1], got {split}')
    if a0 == 1 and split < 1:
        raise ValueError('--alpha0 1 has no sequential part to train: use --batch-split 1')
    if a0 == 0 and split > 0:
        raise ValueError('--alpha0 0 has no diffusion part to train: use --batch-split 0')
    if 0 < a0 < 1 and split in (0, 1):
        raise ValueError(f'--alpha0 {a0} trains both parts: use 0 < --batch-split < 1 (e.g. 0.5)')


# ---- the sorted order ------------------------------------------------------

def sort_order(masked, masked_left_to_right=False):
    """Indices (B, L) that put each row's clean positions first and its masked
    positions after, each group in random order (sort key [masked] + U), or
    the masked ones left to right (the sequential loss and phase)."""
    key = torch.rand(masked.shape, device=masked.device)  # in [0, 1): groups never mix
    if masked_left_to_right:
        key = torch.where(masked, torch.arange(masked.shape[1], device=masked.device) / masked.shape[1], key)
    return (masked + key).argsort(dim=1)


def sequential_mask(L, device):
    """Attention mask (2L, 2L), True = may attend, for the input [z_0, x] (both
    sorted): a z_0 query i sees itself and the x keys j < i; an x query i sees
    the x keys j <= i; x never sees z_0 (GUIDE §6)."""
    i = torch.arange(L, device=device)
    z_rows = torch.cat([i[:, None] == i, i[:, None] > i], 1)
    x_rows = torch.cat([torch.zeros(L, L, dtype=torch.bool, device=device), i[:, None] >= i], 1)
    return torch.cat([z_rows, x_rows], 0)


# ---- loss ------------------------------------------------------------------

def token_nll(model, z_s, x_s, m_s, K, weight=None, fused=True, select=None, **kw):
    """Sum per row of -log x_theta at the masked positions m_s (B,) of the sorted input z_s
    (select: where they sit in it), or with weight (B,) the training loss sum_b weight_b nll_b."""
    rows = m_s.nonzero()[:, 0]                               # row-major, the order of select
    loss = Loss(masked_cross_entropy, x_s[m_s], K, weight=None if weight is None else weight[rows], fused=fused)
    nll = model(z_s, select=m_s if select is None else select, loss=loss, **kw)  # SUBS: [MASK] logit -inf
    return nll if weight is not None else torch.zeros(len(x_s), dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)


def diffusion_nll(model, x, masked, K, weight=None, fused=True):
    """sum_{l masked} -log x_theta(x_l | z_t) (B,), computed causally over the
    order [clean (random), masked (random)] with rotary positions gathered by it."""
    order = sort_order(masked)
    x_s, m_s = x.gather(1, order), masked.gather(1, order)
    z_s = x_s.masked_fill(m_s, K)                            # z_t, sorted
    return token_nll(model, z_s, x_s, m_s, K, weight, fused, causal=True, positions=order)


def sequential_nll(model, x, masked, order, K, weight=None, fused=True):
    """sum_{l masked} -log x_theta(x_l | clean tokens, the masked ones before l in
    `order`) (B,): one pass over [z_0, x] (length 2L, positions duplicated)."""
    L = x.shape[1]
    x_s, m_s = x.gather(1, order), masked.gather(1, order)
    z_s = x_s.masked_fill(m_s, K)                            # z_0, sorted
    select = torch.cat([m_s, torch.zeros_like(m_s)], 1)      # loss only at masked z_0 positions
    return token_nll(model, torch.cat([z_s, x_s], 1), x_s, m_s, K, weight, fused, select,
                     mask=sequential_mask(L, x.device), positions=torch.cat([order, order], 1))


def diffusion_term(model, x, u, args, scale):
    """Training: the diffusion part of the loss, scale x its sum over the sequences;
    with --loss low_var the weight is 1."""
    t = EPS + (1 - EPS) * u                                  # u: stratified uniforms (GUIDE §1)
    alpha_t, dalpha_t = schedule(t, args.alpha0)             # alpha_0 (1 - (1 - eps) t)
    _, masked = mask_tokens(x, alpha_t, args.vocab_size)     # z_t ~ q(z_t | x)
    w = loss_weight(alpha_t, dalpha_t, args)                 # -alpha'_t / (1 - alpha_t), or 1
    return diffusion_nll(model, x, masked, args.vocab_size, w * scale, getattr(args, 'fused', True))


def sequential_term(model, x, args, scale=None):
    """One-sample estimate of the sequential part of the NELBO per sequence (B,),
    or with scale the training loss, scale x their sum (one scalar)."""
    alpha_0 = torch.full((x.shape[0],), args.alpha0, device=x.device)
    _, masked = mask_tokens(x, alpha_0, args.vocab_size)     # z_0 ~ q(z_0 | x)
    weight = None if scale is None else torch.full_like(alpha_0, scale, dtype=torch.float64)
    order = sort_order(masked, masked_left_to_right=True)
    return sequential_nll(model, x, masked, order, args.vocab_size, weight, getattr(args, 'fused', True))


def train_loss(model, x, u, args, step, state):
    """Diffusion loss on the first --batch-split of the rows, sequential loss on
    the rest; the total is the sum of their means per token (GUIDE §6)."""
    check_args(args, training=True)
    B, L = x.shape
    n = round(args.batch_split * B)
    if (0 < args.alpha0 < 1) and not 0 < n < B:
        raise ValueError(f'--batch-split {args.batch_split} of a {B}-row micro-batch leaves one loss without '
                         'rows: use a larger --micro-batch-size or a split nearer 0.5')
    loss = 0.0
    if n > 0:  # u ascends over the micro-batch: give the diffusion rows an evenly spread subset of it
        spread = torch.arange(n, device=u.device) * B // n
        loss = loss + diffusion_term(model, x[:n], u[spread], args, scale=1 / (n * L))
    if n < B:
        loss = loss + sequential_term(model, x[n:], args, scale=1 / ((B - n) * L))
    return loss


def mfu_flops(cfg, args):
    """Forward FLOPs per token: diffusion rows output where masked (E = 1 - alpha_0 / 2);
    sequential rows run the blocks over 2L tokens, output at the (1 - alpha_0) L masked z_0."""
    L, a0, s = args.block_size, args.alpha0, args.batch_split
    return s * flops_per_token(cfg, L, True, 1 - a0 / 2) + (1 - s) * 2 * flops_per_token(cfg, 2 * L, True, (1 - a0) / 2)


# ---- evaluation ------------------------------------------------------------

@torch.no_grad()
def iw_nll(model, x, args):
    """Importance-weighted bound -log (1/N sum_n p_theta(x | order_n)) over N
    random generation orders: a diffusion subset (each token w.p. (alpha_0 -
    alpha_1) / (1 - alpha_1)) in random order, then the rest left to right.
    Revealing one token per step, the sampler's model is the mixture
    p_theta(x) = E_order p_theta(x | order), each factor computed exactly like
    the sequential loss with everything masked; the bound tightens as N grows
    (Burda et al. 2016)."""
    a_0, a_1 = args.alpha0, args.alpha0 * EPS
    everything = torch.ones_like(x, dtype=torch.bool)
    logp = []
    for _ in range(args.iw_orders):
        late = torch.rand(x.shape, device=x.device) >= (a_0 - a_1) / (1 - a_1)  # left to the sequential phase
        order = sort_order(late, masked_left_to_right=True)
        logp.append(-sequential_nll(model, x, everything, order, args.vocab_size))
    return math.log(args.iw_orders) - torch.stack(logp, 1).logsumexp(1)


@torch.no_grad()
def eval_nll(model, x, u, args):
    """An unbiased, finite-variance estimate of the exact NELBO per sequence (an upper
    bound on -log p(x), equal to it for exact conditionals), or the importance-weighted
    bound with --iw-orders N > 0. Diffusion part on alpha_t = alpha_0 (1 - t), t in (0, 1]
    (no eps), t integrated out as in mdlm.eval_nll: with k ~ Binomial(L, 1 - alpha) masked,
    int_0^alpha_0 P(k | alpha) / (1 - alpha) d alpha = P(Binomial(L, 1 - alpha_0) < k) / k,
    so alpha_0 L / k times the masked cross-entropy of a uniform k-subset, k ~ that / (L alpha_0),
    estimates it. The sequential part is as in training."""
    check_args(args)
    L = x.shape[1]
    if getattr(args, 'iw_orders', 0) > 0:
        return iw_nll(model, x, args), L
    nll = 0
    if args.alpha0 > 0:   # alpha_0 = 0: no diffusion term
        masked, k = masked_subset(x, u, args.alpha0)
        nll = nll + args.alpha0 * L / k * diffusion_nll(model, x, masked, args.vocab_size)
    if args.alpha0 < 1:   # alpha_0 = 1: z_0 = x, no sequential term
        nll = nll + sequential_term(model, x, args)
    return nll, L


# ---- sampling --------------------------------------------------------------

def unmask_counts(n_masked, steps, alpha0):
    """The diffusion phase's schedule, t = 1 -> 0 in `steps` steps: how many tokens
    each step that reveals any reveals, and how many are left masked at t = 0 for
    the sequential phase. The reverse process reveals Binomial(remaining,
    (alpha_s - alpha_t) / (1 - alpha_t)) tokens per step; jointly, each masked
    token independently falls in step (t -> s) w.p. (alpha_s - alpha_t) / (1 - alpha_1)
    or is never revealed w.p. (1 - alpha_0) / (1 - alpha_1), one multinomial draw.
    The counts are shared by the whole batch (rows reveal in lockstep; each row
    still follows the reverse process exactly)."""
    if n_masked == 0:
        return [], 0
    alpha = schedule(torch.linspace(1, 0, steps + 1, dtype=torch.float64), alpha0)[0]
    p = torch.cat([alpha.diff(), 1 - alpha[-1:]]) / (1 - alpha[0])   # each step, then never
    counts = torch.multinomial(p, n_masked, replacement=True).bincount(minlength=steps + 1).tolist()
    return [k for k in counts[:-1] if k > 0], counts[-1]  # a step that reveals nothing costs nothing


@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Fill the positions of z (n, l) not kept. The generation order is drawn up front: the
    kept (clean) tokens wherever they stand, the diffusion tokens (random positions), the
    sequential ones (left to right); step i decides its next counts[i] tokens. With args.cache
    each step runs the network only on the tokens decided last step (committed to the cache)
    and those decided now. report(z, nfe, masked) after each step, in left-to-right positions."""
    (n, length), K, top_p = z.shape, args.vocab_size, getattr(args, 'top_p', 1.0)
    cache = KVCache(length) if getattr(args, 'cache', True) else None
    dtype = torch.float64 if getattr(args, 'float64', True) else torch.float32
    check_args(args)
    P = int(keep[0].sum())
    if (keep.sum(1) != P).any():
        raise ValueError('Eso-LM samples its rows in lockstep: give every row the same number of clean tokens')
    counts, left = unmask_counts(length - P, getattr(args, 'steps', None) or length, getattr(args, 'alpha0', 1.0))
    counts += [1] * left                                     # sequential phase: one token per step
    order = sort_order(~keep)                                # clean first, the rest in random order
    order[:, length - left:] = order[:, length - left:].sort(1).values   # the sequential ones left to right
    z = z.gather(1, order)                                   # in sorted order
    done, cached, nfe = P, 0, 0   # tokens decided (a sorted prefix); tokens in the KV cache
    for k in counts:
        start = cached if cache is not None else 0
        select = torch.zeros(n, done + k - start, dtype=torch.bool, device=z.device)
        select[:, -k:] = True                                # logits only for the tokens decided now
        logits = model(z[:, start:done + k], causal=True, positions=order[:, start:done + k],
                       cache=cache, select=select)
        nfe += 1
        if cache is not None:
            cache.truncate(done)                             # keep decided tokens, drop the masks
            cached = done
        probs = logits[:, :K].to(dtype).softmax(-1)          # zero masking: no [MASK], no padding
        z[:, done:done + k] = sample_categorical(top_p_filter(probs, top_p)).view(n, k)
        done += k
        x = torch.empty_like(z).scatter_(1, order, z)        # back to left-to-right positions
        report(x, nfe, x == K)
    return torch.empty_like(z).scatter_(1, order, z), nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """n sequences of `length` tokens; prompt (n, P) and fixed=(tokens, given) as in
    mdlm.sample. Beyond the context: model.in_windows."""
    z, keep = start_tokens(n, length, args.vocab_size, prompt, fixed, device)
    return in_windows(denoise, model, args, z, keep, callback)
