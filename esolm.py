"""Eso-LM: masked diffusion and autoregression in one causal network (MATH §5).

Sahoo et al., "Esoteric Language Models" (arXiv 2506.01928), variant (B). A sequence is made in
two phases. First masked diffusion, from all-[MASK] at t = 1 down to t = 0, with the schedule
alpha_t = alpha_0 (1 - (1 - eps) t): it reveals about a fraction alpha_0 of the tokens, at
random positions, several per step. Then an autoregressive phase fills the rest left to right,
one per step. alpha_0 = 1 is MDLM-like, alpha_0 = 0 is AR.

What makes both phases causal, so that both decode with a KV cache: every sequence is processed
in a *sorted order*, clean tokens first and masked tokens after, each token keeping its own
rotary position. Under causal attention over that order a masked token sees every clean token
and no other masked token's identity (what an MDLM denoiser sees), and a token, once decided,
never changes, so its keys and values are computed once. The sampler decides the sorted
sequence left to right, a block of tokens per step.

The NELBO splits at t = 0, where z_0 ~ q(z_0 | x) still has 1 - alpha_0 of its tokens masked,
MATH (29): a diffusion term, MDLM's NELBO with a schedule that stops at alpha_0, computed
causally over [clean (random order), masked (random order)]; and a sequential term over the
order [clean (random), masked (left to right)] in one pass over the input [z_0, x] of length
2L, so that every masked z_0 token sees the clean tokens and the true tokens before it (teacher
forcing). Training gives a fraction --batch-split of the batch the diffusion loss and the rest
the sequential one. The network never sees the time: a cached key must stay valid at every
later step. The contract: ar.py; the masking pieces come from mdlm.py.
"""
import math

import torch

import fused
from mdlm import (EPS, corrupt, loss_weight, mask_id, masked_nll, masked_subset,  # noqa: F401
                  per_sequence, schedule, vocab_size)
from model import (KVCache, cross_entropy, flops_per_token, generate, sample_categorical,
                   top_p_filter)

EXACT = False           # eval_nll is the NELBO (or an importance-weighted bound)
VARIABLE_LENGTH = True


def add_args(parser):  # --loss (and --time-cond) belong to mdlm.py's group
    parser.add_argument('--alpha0', type=float, default=1.0,
                        help='fraction of tokens made by diffusion: 1 = MDLM-like, 0 = AR '
                             '(default: 1); may differ at sampling')
    parser.add_argument('--batch-split', type=float, default=1.0,
                        help='fraction of each batch trained with the diffusion loss, the rest '
                             'with the sequential one (default: 1)')
    parser.add_argument('--iw-orders', type=int, default=0,
                        help='validate with an importance-weighted bound over this many random '
                             'orders (default: 0 = the NELBO)')


def defaults(args, gpu):
    return {}


def check_args(args, training):
    a0 = args.alpha0
    split = args.batch_split
    if not 0 <= a0 <= 1:
        raise ValueError(f'--alpha0 must be in [0, 1], got {a0}')
    if args.time_cond:
        raise ValueError("Eso-LM's network sees no time (decided tokens keep their cached "
                         "keys): drop --time-cond")
    if args.iw_orders < 0:
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
        raise ValueError(f'--alpha0 {a0} trains both parts: use 0 < --batch-split < 1 '
                         '(e.g. 0.5)')


# ---- the sorted order ------------------------------------------------------------------------

def sort_order(masked, masked_left_to_right=False):
    """Indices (B, L) that put each row's clean positions first and its masked positions after,
    each group in random order (sort key [masked] + U), or the masked ones left to right (the
    sequential loss and phase), MATH (30)."""
    key = torch.rand(masked.shape, device=masked.device)  # in [0, 1): groups never mix
    if masked_left_to_right:
        left_to_right = torch.arange(masked.shape[1], device=masked.device) / masked.shape[1]
        key = torch.where(masked, left_to_right, key)
    return (masked + key).argsort(dim=1)


def sequential_mask(L, device):
    """Attention mask (2L, 2L), True = may attend, for the input [z_0, x] (both sorted): a z_0
    query i sees itself and the x keys j < i; an x query i sees the x keys j <= i; x never sees
    z_0, MATH (31)."""
    i = torch.arange(L, device=device)
    z_rows = torch.cat([i[:, None] == i, i[:, None] > i], 1)
    x_rows = torch.cat([torch.zeros(L, L, dtype=torch.bool, device=device), i[:, None] >= i], 1)
    return torch.cat([z_rows, x_rows], 0)


# ---- loss ------------------------------------------------------------------------------------

def diffusion_inputs(x, masked, K):
    """The diffusion term's input: z_t sorted by the order [clean, masked], MATH (30), with
    causal attention and the rotary positions gathered by the order, and where the loss is
    (the masked tokens, sorted); returns (model inputs, their targets)."""
    order = sort_order(masked)
    x_s = x.gather(1, order)
    m_s = masked.gather(1, order)
    z_s = torch.where(m_s, mask_id(K), x_s)                 # z_t, sorted
    return dict(x=z_s, causal=True, positions=order, select=m_s), x_s[m_s]


def diffusion_loss(model, x, u, args):
    """The diffusion term, MATH (29): MDLM's masked cross-entropy weighted by -alpha'_t /
    (1 - alpha_t) (or 1 with low_var), computed causally over the order [clean, masked],
    summed and divided by the B L tokens."""
    K = args.vocab_size
    t = EPS + (1 - EPS) * u                                 # MATH (4)
    alpha_t, dalpha_t = schedule(t, args.alpha0)            # MATH (28)
    masked = corrupt(x, alpha_t, K) == mask_id(K)           # z_t ~ q(z_t | x)
    inputs, targets = diffusion_inputs(x, masked, K)
    weight = loss_weight(alpha_t, dalpha_t, args)           # -alpha'_t / (1 - alpha_t), or 1
    weight = weight[:, None].expand_as(x)[inputs['select']]  # one per masked token
    if args.fused:  # the same number without the (N, V) logits: fused.py
        return model(**inputs, head=fused.cross_entropy_head(targets, K, weight)) / x.numel()
    nll = cross_entropy(model(**inputs), targets, K)        # -log x_theta(x_l | z_t)
    return (weight * nll).sum() / x.numel()


def sequential_inputs(x, masked, order, K):
    """The sequential term's one pass: the input [z_0, x] sorted by `order` (2L tokens, rotary
    positions duplicated), its attention mask, and where the loss is (the masked z_0 tokens)."""
    x_s = x.gather(1, order)
    m_s = masked.gather(1, order)
    z_s = torch.where(m_s, mask_id(K), x_s)                 # z_0, sorted
    select = torch.cat([m_s, torch.zeros_like(m_s)], 1)
    inputs = dict(x=torch.cat([z_s, x_s], 1), mask=sequential_mask(x.shape[1], x.device),
                  positions=torch.cat([order, order], 1), select=select)
    return inputs, x_s[m_s]


def sequential_draw(x, args):
    """z_0 ~ q(z_0 | x) and the sequential term's one pass over it (sequential_inputs): (model
    inputs, targets, masked)."""
    alpha_0 = torch.full((x.shape[0],), args.alpha0, device=x.device)
    masked = corrupt(x, alpha_0, args.vocab_size) == mask_id(args.vocab_size)
    order = sort_order(masked, masked_left_to_right=True)
    inputs, targets = sequential_inputs(x, masked, order, args.vocab_size)
    return inputs, targets, masked


def sequential_loss(model, x, args):
    """The sequential term, MATH (29): -log x_theta(x_l | z_0, x before l) at the tokens masked
    in z_0 ~ q(z_0 | x), summed and divided by the B L tokens."""
    K = args.vocab_size
    inputs, targets, _ = sequential_draw(x, args)
    if args.fused:
        if x.is_cuda and not args.dropout:  # as a flex_attention block mask: flash-like, fused.py
            inputs['mask'] = fused.block_mask(sequential_mask, x.shape[1], x.device)
        return model(**inputs, head=fused.cross_entropy_head(targets, K, 1)) / x.numel()
    nll = cross_entropy(model(**inputs), targets, K)
    return nll.sum() / x.numel()


def train_loss(model, x, u, args, step, state):
    """The diffusion loss on the first --batch-split of the rows, the sequential loss on the
    rest; the total is the sum of their means per token, MATH (32)."""
    B = x.shape[0]
    n = round(args.batch_split * B)
    if 0 < args.alpha0 < 1 and not 0 < n < B:
        raise ValueError(f'--batch-split {args.batch_split} of a {B}-row micro-batch leaves one '
                         'loss without rows: use a larger --micro-batch-size or a split nearer '
                         '0.5')
    loss = 0.0
    if n > 0:  # u ascends over the micro-batch: give the diffusion rows an evenly spread subset
        spread = torch.arange(n, device=u.device) * B // n
        loss = loss + diffusion_loss(model, x[:n], u[spread], args)
    if n < B:
        loss = loss + sequential_loss(model, x[n:], args)
    return loss


def mfu_flops(cfg, args):
    """Forward FLOPs per token: diffusion rows output where masked (E = 1 - alpha_0 / 2);
    sequential rows run the blocks over 2L tokens, output at the (1 - alpha_0) L masked z_0."""
    L = args.block_size
    a0 = args.alpha0
    diffusion = flops_per_token(cfg, L, attention=True, out_share=1 - a0 / 2)
    sequential = 2 * flops_per_token(cfg, 2 * L, attention=True, out_share=(1 - a0) / 2)
    return args.batch_split * diffusion + (1 - args.batch_split) * sequential


# ---- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def iw_nll(model, x, args):
    """The importance-weighted bound -log (1/N sum_n p_theta(x | order_n)) over N random
    generation orders, MATH (34): a diffusion subset (each token w.p. (alpha_0 - alpha_1) /
    (1 - alpha_1)) in random order, then the rest left to right. Revealing one token per step
    the sampler's model is the mixture p_theta(x) = E_order p_theta(x | order), each factor
    computed like the sequential loss with everything masked; the bound tightens as N grows."""
    K = args.vocab_size
    a_0 = args.alpha0
    a_1 = args.alpha0 * EPS
    everything = torch.ones_like(x, dtype=torch.bool)
    logp = []
    for _ in range(args.iw_orders):
        late = torch.rand(x.shape, device=x.device) >= (a_0 - a_1) / (1 - a_1)
        order = sort_order(late, masked_left_to_right=True)
        inputs, targets = sequential_inputs(x, everything, order, K)
        logp.append(-per_sequence(masked_nll(model, args, targets, **inputs), everything))
    return math.log(args.iw_orders) - torch.stack(logp, 1).logsumexp(1)


@torch.no_grad()
def eval_nll(model, x, u, args):
    """An unbiased, finite-variance estimate of the exact NELBO per sequence, MATH (33): an upper
    bound on -log p(x) of the model the training loss fits (equal to it for exact conditionals);
    with --iw-orders N > 0 the importance-weighted bound of the one-token-per-step sampler (34).
    The diffusion part on alpha_t = alpha_0 (1 - t), t in (0, 1], t integrated out: alpha_0 L / k
    times the masked cross-entropy of a uniform k-subset, k ~ P(Binomial(L, 1 - alpha_0) < k) /
    (L alpha_0). The sequential part as in training."""
    check_args(args, training=False)
    K = args.vocab_size
    L = x.shape[1]
    if args.iw_orders > 0:
        return iw_nll(model, x, args), L
    nll = 0
    if args.alpha0 > 0:   # alpha_0 = 0: no diffusion term
        masked, k = masked_subset(x, u, args.alpha0)
        inputs, targets = diffusion_inputs(x, masked, K)
        tokens = masked_nll(model, args, targets, **inputs)
        nll = nll + args.alpha0 * L / k * per_sequence(tokens, inputs['select'])
    if args.alpha0 < 1:   # alpha_0 = 1: z_0 = x, no sequential term
        inputs, targets, masked = sequential_draw(x, args)
        nll = nll + per_sequence(masked_nll(model, args, targets, **inputs), masked)
    return nll, L


# ---- sampling --------------------------------------------------------------------------------

def unmask_counts(n_masked, steps, alpha0):
    """The diffusion phase's schedule, t = 1 -> 0 in `steps` steps, MATH (35): how many tokens
    each step that reveals any reveals, and how many are left masked at t = 0 for the
    sequential phase. Each masked token independently falls in step (t -> s) w.p. (alpha_s -
    alpha_t) / (1 - alpha_1) or is never revealed w.p. (1 - alpha_0) / (1 - alpha_1): one
    multinomial draw. The counts are shared by the batch (rows reveal in lockstep; each row
    still follows the reverse process exactly)."""
    if n_masked == 0:
        return [], 0
    alpha = schedule(torch.linspace(1, 0, steps + 1, dtype=torch.float64), alpha0)[0]
    p = torch.cat([alpha.diff(), 1 - alpha[-1:]]) / (1 - alpha[0])   # each step, then never
    draws = torch.multinomial(p, n_masked, replacement=True)
    counts = draws.bincount(minlength=steps + 1).tolist()
    return [k for k in counts[:-1] if k > 0], counts[-1]  # a step revealing nothing costs nothing


@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Fill the positions of z (n, l) not kept. The generation order is drawn up front: the kept
    (clean) tokens wherever they stand, the diffusion tokens (random positions), the sequential
    ones (left to right); step i decides its next counts[i] tokens. With args.cache each step
    runs the network only on the tokens decided last step (committed to the cache) and those
    decided now. report(z, nfe, masked) after each step, in left-to-right positions."""
    n, length = z.shape
    K = args.vocab_size
    check_args(args, training=False)
    cache = KVCache(length) if args.cache else None
    dtype = torch.float64 if args.float64 else torch.float32
    P = int(keep[0].sum())
    if (keep.sum(1) != P).any():
        return by_given_count(model, args, z, keep, report)
    counts, left = unmask_counts(length - P, args.steps or length, args.alpha0)
    counts += [1] * left                                     # the sequential phase: one a step
    order = sort_order(~keep)                                # clean first, the rest at random
    order[:, length - left:] = order[:, length - left:].sort(1).values  # sequential: in order
    z = z.gather(1, order)                                   # in sorted order
    done = P      # tokens decided (a sorted prefix)
    cached = 0    # tokens in the KV cache
    nfe = 0
    for k in counts:
        start = cached if cache is not None else 0
        select = torch.zeros(n, done + k - start, dtype=torch.bool, device=z.device)
        select[:, -k:] = True                                # logits for the tokens decided now
        logits = model(z[:, start:done + k], causal=True, positions=order[:, start:done + k],
                       cache=cache, select=select)
        nfe += 1
        if cache is not None:
            cache.truncate(done)                             # keep decided tokens, drop masks
            cached = done
        probs = logits[:, :K].to(dtype).softmax(-1)          # zero masking: no [MASK]
        z[:, done:done + k] = sample_categorical(top_p_filter(probs, args.top_p)).view(n, k)
        done += k
        x = torch.empty_like(z).scatter(1, order, z)         # back to left-to-right positions
        report(x, nfe, x == mask_id(K))
    return torch.empty_like(z).scatter(1, order, z), nfe


def by_given_count(model, args, z, keep, report):
    """Rows with different numbers of given tokens: one group of equal counts at a time, as the
    rows of a group reveal in lockstep (their count schedule depends on it); NFE adds up."""
    z = z.clone()
    given = keep.sum(1)
    nfe = 0
    for P in given.unique().tolist():
        rows = given == P

        def group_report(w, calls, noisy):  # the whole batch, this group's rows updated
            z[rows] = w
            report(z, nfe + calls, z == mask_id(args.vocab_size))
        z[rows], calls = denoise(model, args, z[rows], keep[rows], group_report)
        nfe += calls
    return z, nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """n sequences of `length` tokens; prompt (n, P) and fixed=(tokens, given) as in
    mdlm.sample. Beyond the context: model.generate."""
    return generate(denoise, model, args, n, length, prompt, device, fixed, callback)
