"""Fast paths: the output layer and its loss in one pass, never the (rows x vocabulary) logits.

A learner never needs this file. Each method file computes its loss on the plain path (logits,
then the loss, by autograd) and, with --fused (the default), hands the network one of the heads
below as its output layer, `model(..., head=fused.cross_entropy_head(...))`, which returns the same
number. A head computes the logits CHUNK rows at a time in one reused (CHUNK, V) buffer, and in
the same pass each chunk's loss and its gradient in h, W, b: the matmul FLOPs are the plain
path's, nothing is recomputed, and a few (CHUNK, V) buffers replace the (N, V) logits, their
float32 copy, the softmax and its gradient. Gradients are derived by hand and formed in place
(a fresh 50 MB block costs about as much as a pass over it in page faults). tests/test_fused.py
holds every head equal to the plain path, values and gradients, in float64.

The last section runs attention under a fixed boolean mask (Eso-LM's sequential pass) with
flex_attention on a GPU: SDPA rules out flash attention for any boolean mask.
"""
import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

CHUNK = 256  # rows of logits at a time
PAD = 64     # the last chunk's rows are rounded up to a multiple of this


# ---- per-row losses with their gradient in the logits (float32 or wider: chunks), in place --

def cross_entropy_grad(logits, targets, K):
    """-log softmax(logits[:, :K])[target] per row (N,) and its gradient in the logits,
    softmax - onehot(target) (N, V), formed in the logits' memory."""
    logits[:, K:] = float('-inf')               # [MASK] and padding: MATH (6)
    l_target = logits.gather(-1, targets[:, None])[:, 0]
    m = logits.amax(-1, keepdim=True)
    p = logits.sub_(m).exp_()                   # one pass serves the loss and the softmax
    S = p.sum(-1, keepdim=True)
    p.div_(S)
    p[torch.arange(len(targets), device=p.device), targets] -= 1
    return (m + S.log())[:, 0] - l_target, p


def duo_nelbo_grad(logits, x, z, alpha_t, dalpha_t, K):
    """Duo's NELBO integrand per row, MATH (16), in the stable form of MATH (17), and its
    gradient in the logits by hand. With r = K a / (1 - a) and e_j = r x_theta_j =: exp(v_j):
    log xbar_j = log(1 - a) + softplus(v_j), kappa = 1 / (1 + r), so no large constants cancel
    near a = 0 or 1. Gradient: dv_j / dlogit_k = [j=k] - x_theta_k, d softplus(v) = sigmoid(v)
    =: s, and with
      g_j = df/dv_j = coeff (c s_j + [j=z] g_z + [j=x] g_x),  coeff = a' / (K a),
      g_z = (r/a) s_z (1 - s_z) - (K c + r) s_z,  g_x = r s_x,
      df/dlogit_k = g_k - (e_k / r) sum_j g_j = coeff e_k (Q - c s_k) + the [j=z], [j=x] parts,
    Q = (c sum_j e_j s_j - g_z - g_x) / r (as sum_j s_j = r - sum_j e_j s_j: e_j - s_j = e_j s_j);
    this form has no c e_k - c e_k cancellation."""
    logits[:, K:] = float('-inf')
    a = alpha_t.to(logits.dtype)
    coeff = dalpha_t.to(logits.dtype) / (K * a)
    r = K * a / (1 - a)
    l_z = logits.gather(-1, z[:, None])[:, 0]
    l_x = logits.gather(-1, x[:, None])[:, 0]
    m = logits.amax(-1, keepdim=True)
    e = logits.sub_(m).exp_()                                # exp(logit_j - max), in place
    S = e.sum(-1, keepdim=True)
    e = e.mul_(r[:, None] / S)                               # e_j = r x_theta_j
    soft = torch.log1p(e)                                    # softplus(v_j)
    v_z = l_z - m[:, 0] - S[:, 0].log() + torch.log(r)
    v_x = l_x - m[:, 0] - S[:, 0].log() + torch.log(r)
    same = x == z
    kappa = 1 / (1 + r)
    c = torch.where(same, kappa, 1.0)
    term1 = (r / a) * (c - torch.sigmoid(-v_z))              # K (1/xbar*_z - 1/xbar_z)
    offset = torch.where(same, -(K - 1) * kappa, 1 + r) * torch.log1p(r)
    term2 = (-c * (soft.sum(-1) - K * torch.nn.functional.softplus(v_z))
             - r * (torch.nn.functional.softplus(v_x) - torch.nn.functional.softplus(v_z))
             + offset)
    loss = coeff * (term1 - term2)
    s = torch.div(e, torch.add(e, 1, out=soft), out=soft)    # s_j = e_j / (1 + e_j), in soft
    s_z = torch.sigmoid(v_z)
    s_x = torch.sigmoid(v_x)
    g_z = (r / a) * s_z * (1 - s_z) - (K * c + r) * s_z
    g_x = r * s_x
    Q = (c * torch.einsum('nv,nv->n', e, s) - g_z - g_x) / r
    g = s.mul_(-(coeff * c)[:, None]).add_((coeff * Q)[:, None]).mul_(e)  # coeff e_k (Q - c s_k)
    g.scatter_add_(-1, z[:, None], (coeff * g_z)[:, None])
    g.scatter_add_(-1, x[:, None], (coeff * g_x)[:, None])
    return loss, g


# ---- the heads: model(..., head=...) ---------------------------------------------------------

def chunks(h, W, b, rows):
    """(i, n, h_c, rows_c, logits) for each CHUNK of rows: n real rows from row i, the logits in
    one reused buffer (W None: h are the logits already, from a stand-in network), float32 at
    least (a low-precision matmul's output is copied into one reused float32 buffer). The last
    chunk is padded to a multiple of PAD rows by repeating its last row, so the matmuls see
    CHUNK / PAD shapes whatever the row count (oneDNN and CUDA keep per-shape caches); callers
    give the padding rows weight 0 and drop their values."""
    V = h.shape[1] if W is None else W.shape[0]
    buf = h.new_empty(CHUNK, V)
    work = buf
    if buf.dtype not in (torch.float32, torch.float64):
        work = torch.empty(CHUNK, V, dtype=torch.float32, device=h.device)
    N = len(h)
    for i in range(0, N, CHUNK):
        n = min(CHUNK, N - i)
        size = min(-(-n // PAD) * PAD, CHUNK)
        take = slice(i, i + size)
        if n < size:
            take = torch.arange(i, i + size, device=h.device).clamp(max=N - 1)
        h_c = h[take]
        rows_c = [r[take] if torch.is_tensor(r) and r.dim() > 0 else r for r in rows]
        if W is None:
            logits = work[:size].copy_(h_c)
        else:
            logits = torch.addmm(b, h_c, W.t(), out=buf[:size])
            if work is not buf:
                logits = work[:size].copy_(logits)
        yield i, n, h_c, rows_c, logits


def autocast_inputs(h, W, b):
    """Under autocast, h, W, b in its dtype once, as F.linear would cast them."""
    if W is not None and torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        return h.to(dtype), W.to(dtype), b.to(dtype)
    return h, W, b


class Rows:
    """A head that returns fn(logits, *rows) per row (N,), chunk by chunk, without gradients:
    a method's own plain per-row function (evaluation), without the (N, V) logits."""

    def __init__(self, fn, *rows):
        self.fn = fn
        self.rows = rows

    @torch.no_grad()
    def __call__(self, h, W=None, b=None):
        h, W, b = autocast_inputs(h.flatten(0, -2), W, b)
        out = []
        for _, n, _, rows_c, logits in chunks(h, W, b, self.rows):
            out.append(self.fn(logits, *rows_c)[:n])
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


class WeightedLoss(torch.autograd.Function):
    """sum_i w_i fn(h_i W^T + b, rows_i): the forward computes every chunk's logits, losses and
    gradients at once (as fused linear-cross-entropy kernels do), the backward only scales."""

    @staticmethod
    def forward(ctx, h, W, b, weight, fn, rows):
        dh = torch.empty_like(h)
        grad_dtype = None if W is None else torch.promote_types(W.dtype, torch.float32)
        dW = None if W is None else torch.zeros_like(W, dtype=grad_dtype)
        db = None if b is None else torch.zeros_like(b, dtype=grad_dtype)
        total = torch.zeros((), dtype=weight.dtype, device=h.device)
        weight = torch.cat([weight, weight.new_zeros(CHUNK)])  # the padding rows: weight 0
        low = None   # a reused buffer for d in a low-precision dtype
        if h.dtype not in (torch.float32, torch.float64):
            low = h.new_empty(CHUNK, W.shape[0] if W is not None else h.shape[1])
        for i, n, h_c, rows_c, logits in chunks(h, W, b, rows):
            loss, d = fn(logits, *rows_c)
            w = weight[i:i + len(h_c)]
            total += (w * loss).sum()
            d = d.mul_(w[:, None])                   # d (sum_i w_i loss_i) / d logits
            if low is not None:
                d = low[:len(h_c)].copy_(d)
            if W is None:
                dh[i:i + n] = d[:n]
                continue
            dh[i:i + n] = (d @ W)[:n]
            if dW.dtype == d.dtype:
                dW.addmm_(d.t(), h_c)
            else:
                dW += d.t() @ h_c
            db += d.sum(0)
        ctx.save_for_backward(dh, dW, db)
        return total

    @staticmethod
    def backward(ctx, g):  # d/dh, d/dW, d/db; none for weight, fn, rows
        grads = [None if d is None else g * d for d in ctx.saved_tensors]
        return *grads, None, None, None


class Head:
    """model(..., head=Head(fn, weight, *rows)) returns sum_i weight_i loss_i (a scalar) with
    fn(logits, *rows) -> (loss (N,), d loss / d logits (N, V)), the logits overwritten."""

    def __init__(self, fn, weight, *rows):
        self.fn = fn
        self.weight = weight
        self.rows = rows

    def __call__(self, h, W=None, b=None):
        h, W, b = autocast_inputs(h.flatten(0, -2), W, b)
        dtype = torch.promote_types(h.dtype, torch.float32)
        weight = torch.as_tensor(self.weight, dtype=dtype, device=h.device).expand(len(h))
        return WeightedLoss.apply(h, W, b, weight, self.fn, self.rows)


def cross_entropy_head(targets, K, weight):
    """sum_i weight_i (-log x_theta_i[target_i]) over the rows the network outputs."""
    return Head(cross_entropy_grad, weight, targets, K)


def duo_nelbo_head(x, z_t, alpha_t, dalpha_t, K, weight):
    """sum_i weight_i f_i, Duo's NELBO integrand, MATH (16), at the rows the network outputs;
    x, z_t, alpha_t, dalpha_t: one per row."""
    return Head(duo_nelbo_grad, weight, x, z_t, alpha_t, dalpha_t, K)


# ---- attention under a fixed mask: flex_attention --------------------------------------------

def as_block_mask(dense):
    """A boolean attention mask (n, m), True = may attend, as flex_attention's BlockMask: the
    kernel skips the 128 x 128 tiles that are all False, runs the all-True ones unmasked and reads
    the mask only in the mixed ones."""
    def mask_mod(b, h, q, kv):
        return dense[q, kv]
    return create_block_mask(mask_mod, None, None, *dense.shape, device=dense.device)


@functools.cache
def block_mask(make_mask, n, device):
    """as_block_mask(make_mask(n, device)), built once per (n, device): esolm.py passes
    block_mask(sequential_mask, L, device) on a GPU where the plain path passes the boolean mask;
    tests/test_fused.py holds the two attentions equal."""
    return as_block_mask(make_mask(n, device))


@functools.cache
def compiled_flex_attention():  # eager flex_attention computes all the scores, then masks them
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, mask):
    """Attention (B, H, L, head_dim) under a BlockMask. On a GPU one fused kernel, as flash
    attention: inside a compiled network torch.compile makes it, called eagerly it compiles
    flex_attention alone. On a CPU eager, the forward only (flex_attention has no CPU backward)."""
    if q.is_cuda and not torch.compiler.is_compiling():
        return compiled_flex_attention()(q, k, v, block_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)
