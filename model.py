"""The one network shared by AR, MDLM, Duo and Eso-LM: the seed's DiT transformer (../shared/GUIDE.md §2).

Pre-LayerNorm blocks (weight, no bias), rotary positions, adaLN time conditioning on sigma, tanh-GELU MLP,
zero-initialised modulation and output layer, untied embeddings. The network knows no method: a method
chooses the attention (causal, bidirectional or a boolean mask), the rotary positions, sigma, and whether
to decode incrementally with a KV cache. Every loss and sampler calls it (any callable alike can stand in):

    logits = model(x, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None, loss=None)

With loss= (a Loss) it returns that loss instead; a stand-in applies loss(logits).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (d_model, layers, heads). The seed's ladder (GUIDE §8) plus CPU sizes.
SIZES = {
    'tiny': (64, 2, 2), 'mini': (128, 4, 4), 'small': (192, 4, 6), '6M': (256, 6, 4), '19M': (384, 8, 6),
    '34M': (512, 8, 8), '48M': (576, 9, 9), '66M': (640, 10, 10), '75M': (640, 16, 8), '85M': (640, 13, 10),
    '113M': (768, 12, 12), '142M': (768, 15, 12), '170M': (768, 18, 12), '180M': (896, 14, 14),
    '206M': (896, 16, 14), '231M': (896, 18, 14), '268M': (1024, 16, 16), '302M': (1024, 18, 16),
    '336M': (1024, 20, 16), '472M': (1280, 18, 10), '551M': (1280, 21, 10), '571M': (1408, 18, 11),
    '629M': (1280, 24, 10), '666M': (1408, 21, 11), '761M': (1408, 24, 11), '831M': (1536, 22, 12),
    '944M': (1536, 25, 12), '1233M': (1792, 24, 14), '1476M': (2048, 22, 16), '1678M': (2048, 25, 16),
    '2121M': (2176, 28, 17),
}


@dataclass
class Config:
    vocab_size: int       # input ids 0..vocab_size-1 (a method's [MASK] included)
    n_embd: int = 256
    n_layer: int = 6
    n_head: int = 4
    cond_dim: int = 128   # width of the sigma embedding fed to adaLN
    dropout: float = 0.0

    @property
    def padded_vocab(self):  # rows of the embedding/output, a multiple of 128
        return -(-self.vocab_size // 128) * 128


def get_config(size, vocab_size, **kw):
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}': choose one of {', '.join(SIZES)}")
    d, n_layer, n_head = SIZES[size]
    return Config(vocab_size=vocab_size, n_embd=d, n_layer=n_layer, n_head=n_head, **kw)


def flops_per_token(cfg, seq_len, attention=False, out_share=1.0):
    """Forward FLOPs per token. Without attention: the seed's count (GUIDE §7), 2 x every matmul weight
    applied per token (qkv, out, MLP, output layer) plus the adaLN modulation, which runs once per
    sequence. With attention: adds the score and value matmuls (nanoGPT's 12 L H Q T / 3 per forward),
    for MFU. out_share: the fraction of tokens that reach the output layer (MDLM: E[t] = 1/2)."""
    d, n = cfg.n_embd, cfg.n_layer
    per_token = 2 * (n * 12 * d * d + out_share * d * cfg.vocab_size)
    per_seq = 2 * cfg.cond_dim * (n * 6 * d + 2 * d)
    attn = 4 * n * d * seq_len if attention else 0  # QK^T and AV: 2 * 2 * d * T per layer
    return per_token + per_seq / seq_len + attn


# ---- building blocks -------------------------------------------------------

def modulate(x, shift, scale):  # adaLN
    return x * (1 + scale) + shift


def rotary(positions, head_dim, base=10000.0):
    """cos, sin of shape (B, 1, L, head_dim/2) for integer positions (B, L)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    angles = positions[:, None, :, None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def sigma_embedding(sigma, dim=256, max_period=10000.0):
    """Sinusoidal features of the noise level sigma (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device) / half)
    args = sigma[:, None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class KVCache:
    """Keys and values of committed tokens, for incremental decoding.

    A forward pass with `cache=` runs only the new tokens: their queries attend to every cached
    key and causally among themselves; their keys/values are appended and `cache.len` advances
    past them. A method that wants to keep only the first m new tokens (Eso-LM: the others are
    still masked) calls `cache.truncate(old_len + m)`; the rest are overwritten next time."""

    def __init__(self, max_len):
        self.k, self.v = {}, {}  # layer -> (B, H, max_len, head_dim)
        self.max_len, self.len = max_len, 0

    def update(self, layer, k, v):
        B, H, n, hd = k.shape
        if layer not in self.k:
            self.k[layer], self.v[layer] = (t.new_empty(B, H, self.max_len, hd) for t in (k, v))
        end = self.len + n
        if end > self.max_len:
            raise ValueError(f'KV cache full: {end} > max_len {self.max_len}')
        self.k[layer][:, :, self.len:end], self.v[layer][:, :, self.len:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length):
        self.len = length


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, causal, mask, cache, layer):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()  # a view would pin all of qkv
        if cache is not None:  # new queries see all cached keys, causal among themselves
            k, v = cache.update(layer, k, v)
            j = torch.arange(k.shape[2], device=x.device)  # key positions 0..cache.len+L-1
            causal, mask = False, (j <= j[-L:, None] if L > 1 else None)  # query i is key cache.len+i
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.norm1, self.norm2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate='tanh'), nn.Linear(4 * d, d))
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)  # shift, scale, gate for attention and MLP
        self.dropout = cfg.dropout

    def forward(self, x, c, cos, sin, causal, mask, cache, layer):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, causal, mask, cache, layer)
        x = x + gate1 * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2 * F.dropout(h, self.dropout, self.training)


# ---- the network -----------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, V, c = cfg.n_embd, cfg.padded_vocab, cfg.cond_dim
        self.embed = nn.Parameter(torch.empty(V, d))
        nn.init.kaiming_uniform_(self.embed, a=math.sqrt(5))
        self.sigma_mlp = nn.Sequential(nn.Linear(256, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(d, bias=False)
        self.adaLN_out = nn.Linear(c, 2 * d)
        self.out = nn.Linear(d, V)
        for lin in [b.adaLN for b in self.blocks] + [self.adaLN_out, self.out]:
            nn.init.zeros_(lin.weight)  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(lin.bias)
        pad = torch.where(torch.arange(V) < cfg.vocab_size, 0.0, float('-inf'))  # padded rows never win
        self.register_buffer('pad_bias', pad, persistent=False)

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.numel() - self.out.weight.numel()

    def forward(self, x, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None,
                loss=None):
        """x: token ids (B, L) or probability vectors (B, L, K) over the first K ids.
        sigma: (B,) noise level for adaLN (zeros if None). causal / mask: attention
        (mask is boolean, True = may attend, broadcastable to (B, H, L, Lk)).
        positions: (B, L) rotary positions (default: cache.len + 0..L-1).
        select: optional boolean (B, L): return logits only there, shape (N, V).
        Returns logits (B, L, V) over the padded vocabulary (padding = -inf),
        or with loss= (a Loss) that loss of the (selected) positions."""
        # token ids, or soft input: a weighted sum of embeddings
        h = x @ self.embed[:x.shape[-1]].to(x.dtype) if x.dtype.is_floating_point else self.embed[x]
        B, L = h.shape[:2]
        sigma = torch.zeros(B, device=h.device) if sigma is None else sigma
        if positions is None:
            start = cache.len if cache is not None else 0
            positions = torch.arange(start, start + L, device=h.device).expand(B, L)
        c = F.silu(self.sigma_mlp(sigma_embedding(sigma).to(self.embed.dtype)))
        cos, sin = rotary(positions, self.cfg.n_embd // self.cfg.n_head)
        for i, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, causal, mask, cache, i)
        if cache is not None:
            cache.len += L
        shift, scale = self.adaLN_out(c)[:, None].chunk(2, dim=-1)
        h = modulate(self.norm_out(h), shift, scale)
        h = h if select is None else h[select]  # output layer only where a loss needs it
        return (F.linear if loss is None else loss)(h, self.out.weight, self.out.bias + self.pad_bias)


# ---- the output layer and its loss in one (--fused, the default) -----------

def cross_entropy(logits, targets, grad=False):
    """-log softmax(logits)[target] per row (N,), in float32 at least; with grad=True (the fused path, where
    logits is a scratch chunk it overwrites) also its gradient in the logits, softmax - onehot(target) (N, V)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    l_target = logits.gather(-1, targets[:, None])[:, 0]
    if not grad:
        return logits.logsumexp(-1) - l_target
    m = logits.amax(-1, keepdim=True)
    p = logits.sub_(m).exp_()                   # one pass: exp(logit - max) serves the loss and the softmax
    S = p.sum(-1, keepdim=True)
    p.div_(S)[torch.arange(len(targets), device=p.device), targets] -= 1
    return (m + S.log())[:, 0] - l_target, p


class Loss:
    """The forward's `loss=`: per-row losses fn(logits, *rows) (N,) of the positions the network outputs (rows:
    per-row tensors or constants; fn, e.g. cross_entropy, also returns d loss / d logits with grad=True). With
    weight ((N,) or a number): the training loss sum_i weight_i loss_i. fused=False: the plain path, logits, fn."""

    def __init__(self, fn, *rows, weight=None, fused=True):
        self.fn, self.rows, self.weight, self.fused = fn, rows, weight, fused

    def __call__(self, h, W=None, b=None):  # W=None: h are logits (a stand-in network)
        h = h.flatten(0, -2)
        if not self.fused:
            loss = self.fn(h if W is None else F.linear(h, W, b), *self.rows)
            return loss if self.weight is None else (self.weight * loss).sum()
        if W is not None and torch.is_autocast_enabled(h.device.type):  # cast once, as F.linear would
            h, W, b = (t.to(torch.get_autocast_dtype(h.device.type)) for t in (h, W, b))
        if self.weight is None:
            with torch.no_grad():
                return chunked_loss(h, W, b, self.fn, self.rows)[0]
        w = torch.as_tensor(self.weight, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        return LinearLoss.apply(h, W, b, w.expand(len(h)), self.fn, self.rows)


CHUNK = 256  # rows of logits at a time


def chunked_loss(h, W, b, fn, rows, weight=None):
    """Per-row losses fn(h_i W^T + b, rows_i) (N,), CHUNK rows at a time in one reused (CHUNK, V) buffer (a
    fresh 50 MB block costs about a pass over it in page faults), and with weight the gradients of
    sum_i weight_i loss_i in h, W, b from the same logits (fn(..., grad=True) may overwrite them)."""
    grad = weight is not None
    buf = h.new_empty(CHUNK, h.shape[1] if W is None else W.shape[0])  # one size every call: no heap fragments
    losses, dh = [h.new_zeros(0, dtype=torch.float32)], torch.empty_like(h) if grad else None
    dW, db = (torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
              if grad and t is not None else None for t in (W, b))
    for i in range(0, len(h), CHUNK):
        h_c, rows_c = h[i:i + CHUNK], [r[i:i + CHUNK] if torch.is_tensor(r) else r for r in rows]
        logits = buf[:len(h_c)].copy_(h_c) if W is None else torch.addmm(b, h_c, W.t(), out=buf[:len(h_c)])
        out = fn(logits, *rows_c, grad=grad)
        losses.append(out[0] if grad else out)
        if grad:
            d = out[1].mul_(weight[i:i + CHUNK, None]).to(h.dtype)  # d (sum_i w_i loss_i) / d logits
            dh[i:i + CHUNK] = d if W is None else d @ W
            if W is not None:  # dW += d^T h_c, in place where the dtypes allow
                dW.addmm_(d.t(), h_c) if dW.dtype == d.dtype else dW.add_(d.t() @ h_c)
                db += d.sum(0)
    return torch.cat(losses), dh, dW, db


class LinearLoss(torch.autograd.Function):
    """sum_i w_i fn(h_i W^T + b, rows_i) without the (N, V) logits: the forward computes each chunk's
    logits, losses and gradients at once (as fused linear-cross-entropy kernels do), the backward only
    scales them. The matmul FLOPs are the plain path's (2NdV + 4NdV), nothing is recomputed, and a few
    (CHUNK, V) buffers replace the (N, V) logits, their float32 copy, the softmax and its gradient."""

    @staticmethod
    def forward(ctx, h, W, b, weight, fn, rows):
        loss, *grads = chunked_loss(h, W, b, fn, rows, weight)
        ctx.save_for_backward(*grads)
        return (weight * loss).sum()

    @staticmethod
    def backward(ctx, g):  # d/dh, d/dW, d/db; none for weight, fn, rows
        return *(None if d is None else g * d for d in ctx.saved_tensors), None, None, None


def unwrap(model):
    """The DiT inside a DDP and/or torch.compile wrapper."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


# ---- sampling helpers shared by the methods' samplers ----------------------

def top_p_filter(probs, top_p):
    """Nucleus: keep the smallest set of tokens whose mass reaches top_p, renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already enough
    probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def sample_categorical(probs):
    """One draw per row of probs (..., V): argmax p_i / E_i with E_i ~ Exp(1),
    the exponential race (Gumbel-max in another form). Pass float64 probs:
    float32 noise visibly lowers the entropy of long samples (GUIDE §4)."""
    e = torch.empty_like(probs).exponential_()
    return (probs / e).argmax(dim=-1)


def start_tokens(n, length, K, prompt=None, fixed=None, device='cpu'):
    """A sampler's start: z (n, length), id K (MASK, or "not yet drawn") everywhere
    but at the clean tokens given, and keep (n, length), True there. prompt (n, P):
    a clean prefix; fixed=(tokens, given), both (n, length): infilling, clean where given."""
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
    return z, keep


def in_windows(denoise, model, args, z, keep, callback=None):
    """Sample z (n, length), clean where keep, with denoise(model, args, z, keep, report) ->
    (tokens, NFE), a method's sampler. Beyond the training context (args.block_size), window
    by window: the first block_size positions, then the last block_size - new tokens so far as
    a clean prefix and new <= args.stride (default: half the context) fresh positions. denoise
    reports each step; callback(z, nfe, noisy) sees the whole sequence (noisy: not final yet)
    and the NFE of all windows so far, at the start (nfe = 0) and after each step."""
    length, context = z.shape[1], getattr(args, 'block_size', None) or z.shape[1]
    stride = getattr(args, 'stride', None) or context // 2
    if length > context and not 0 < stride < context:
        raise ValueError(f'--stride must be in [1, block_size - 1] = [1, {context - 1}], got {stride}')
    out, nfe = z[:, :0], 0
    if callback is not None:
        callback(z, 0, ~keep)                                  # step 0: the given tokens only
    while out.shape[1] < length:
        a = out.shape[1]                                       # tokens done
        hi = min(a + stride if a else context, length)          # this window: positions lo..hi-1
        lo = max(hi - context, 0)

        def report(w, calls, noisy):  # noisy may be a function: computed only for a callback
            if callback is not None:
                noisy = noisy() if callable(noisy) else noisy
                callback(torch.cat([out[:, :lo], w, z[:, hi:]], 1), nfe + calls,
                         torch.cat([torch.zeros_like(keep[:, :lo]), noisy, ~keep[:, hi:]], 1))
        w, calls = denoise(model, args, torch.cat([out[:, lo:], z[:, a:hi]], 1),
                           torch.cat([torch.ones_like(keep[:, lo:a]), keep[:, a:hi]], 1), report)
        out, nfe = torch.cat([out, w[:, a - lo:]], 1), nfe + calls
    return out, nfe
