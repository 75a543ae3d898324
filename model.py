"""The one network shared by AR, MDLM, Duo and Eso-LM: the seed's DiT transformer.

Pre-LayerNorm blocks (weight, no bias), rotary positions, adaLN time conditioning on sigma,
tanh-GELU MLP, zero-initialised modulation and output layer, untied embeddings. The network
knows no method: a method chooses the attention (causal, bidirectional or a boolean mask), the
rotary positions, sigma, and whether to decode incrementally with a KV cache. Every loss and
sampler calls it as

    logits = model(x, sigma=None, causal=False, mask=None, positions=None, cache=None, select=None)

so any callable with that signature (an exact denoiser in the tests) can stand in for it. The
last section holds the sampling helpers every method's sampler uses.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

import fused

# name: (d_model, layers, heads). The seed's ladder plus three CPU sizes (tiny, mini, small).
SIZES = {
    'tiny': (64, 2, 2), 'mini': (128, 4, 4), 'small': (192, 4, 6),
    '6M': (256, 6, 4), '19M': (384, 8, 6), '34M': (512, 8, 8), '48M': (576, 9, 9),
    '66M': (640, 10, 10), '75M': (640, 16, 8), '85M': (640, 13, 10), '113M': (768, 12, 12),
    '142M': (768, 15, 12), '170M': (768, 18, 12), '180M': (896, 14, 14), '206M': (896, 16, 14),
    '231M': (896, 18, 14), '268M': (1024, 16, 16), '302M': (1024, 18, 16),
    '336M': (1024, 20, 16), '472M': (1280, 18, 10), '551M': (1280, 21, 10),
    '571M': (1408, 18, 11), '629M': (1280, 24, 10), '666M': (1408, 21, 11),
    '761M': (1408, 24, 11), '831M': (1536, 22, 12), '944M': (1536, 25, 12),
    '1233M': (1792, 24, 14), '1476M': (2048, 22, 16), '1678M': (2048, 25, 16),
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
    def padded_vocab(self):  # rows of the embedding and output layer: a multiple of 128
        return -(-self.vocab_size // 128) * 128


def get_config(size, vocab_size, **kw):
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}': choose one of {', '.join(SIZES)}")
    d, n_layer, n_head = SIZES[size]
    return Config(vocab_size=vocab_size, n_embd=d, n_layer=n_layer, n_head=n_head, **kw)


def flops_per_token(cfg, seq_len, attention=False, out_share=1.0):
    """Forward FLOPs per token, MATH (36): 2 x every matmul weight a token passes (qkv, out,
    MLP, output layer) plus the adaLN modulation, which runs once per sequence. attention=True
    adds the score and value matmuls for MFU, MATH (38). out_share: the fraction of tokens that
    reach the output layer (MDLM: E[1 - alpha_t] = 1/2)."""
    d, n = cfg.n_embd, cfg.n_layer
    per_token = 2 * (n * 12 * d * d + out_share * d * cfg.vocab_size)
    per_seq = 2 * cfg.cond_dim * (n * 6 * d + 2 * d)
    attn = 4 * n * d * seq_len if attention else 0  # QK^T and AV: 2 * 2 * d * T per layer
    return per_token + per_seq / seq_len + attn


def seed_flops_per_token(cfg, seq_len):
    """Forward FLOPs per token as the seed counts them (calflops on its network), what --flops
    budgets, MATH (36): the matmuls above plus what calflops also sees: LayerNorm 4 per element
    (2n + 1 norms), GELU 1 per MLP unit, 1 per attention score (the scaling of the scores; QK^T
    and AV are not seen), the rotary angles, and once per sequence the sigma MLP and its SiLUs."""
    d, n, c, heads = cfg.n_embd, cfg.n_layer, cfg.cond_dim, cfg.n_head
    per_token = 4 * d * (2 * n + 1) + 4 * d * n + n * heads * seq_len + d // heads // 2
    per_seq = 2 * c * (256 + c) + 2 * c
    return flops_per_token(cfg, seq_len) + per_token + per_seq / seq_len


def peak_flops(device, dtype):
    """Peak matmul FLOP/s for MFU: the datasheet on known GPUs, else the best of up to 6 timed
    n x n matmuls in the run's dtype (the best: a busy machine slows only some)."""
    cuda = torch.device(device).type == 'cuda'
    datasheet = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
                 'L40': 181e12}
    for key, peak in datasheet.items():
        if cuda and dtype != torch.float32 and key in torch.cuda.get_device_name(device):
            return peak
    n = 2048 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    start = time.perf_counter()
    for i in range(6):  # at most ~2 s: bf16 on a CPU without it can be 100x slower
        t0 = time.perf_counter()
        (a @ a).sum().item()  # .item() waits for a GPU
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > 2:
            break
    return 2 * n ** 3 / best


def percent(mfu):  # an MFU above 100% means the measured peak is wrong: unknown
    return f'{mfu:.1%}' if mfu <= 1 else '?'


# ---- building blocks -------------------------------------------------------------------------

def modulate(x, shift, scale):  # adaLN
    return x * (1 + scale) + shift


def rotary(positions, head_dim, base=10000.0):
    """cos, sin of shape (B, 1, L, head_dim/2) for integer positions (B, L)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    angles = positions[:, None, :, None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):  # rotate the two halves of each head (GPT-NeoX style)
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
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
    key and causally among themselves; their keys and values are appended and `cache.len`
    advances past them. A method that keeps only the first m new tokens (Eso-LM: the others are
    still masked) calls `cache.truncate(old_len + m)`; the rest are overwritten next time."""

    def __init__(self, max_len):
        self.k = {}  # layer -> (B, H, max_len, head_dim)
        self.v = {}
        self.max_len = max_len
        self.len = 0

    def update(self, layer, k, v):
        B, H, n, hd = k.shape
        if layer not in self.k:
            self.k[layer] = k.new_empty(B, H, self.max_len, hd)
            self.v[layer] = v.new_empty(B, H, self.max_len, hd)
        end = self.len + n
        if end > self.max_len:
            raise ValueError(f'KV cache full: {end} > max_len {self.max_len}')
        self.k[layer][:, :, self.len:end] = k
        self.v[layer][:, :, self.len:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length):
        self.len = length


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, causal, mask, cache, layer):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q = apply_rotary(qkv[0], cos, sin)
        k = apply_rotary(qkv[1], cos, sin)
        v = qkv[2].contiguous()  # a view would keep all of qkv alive for the backward
        if cache is not None:  # new queries see every cached key, and causally each other:
            from torch.nn.attention.bias import causal_lower_right  # imports dynamo: ~1 s
            k, v = cache.update(layer, k, v)  # query i is key cache.len + i, sees keys j <= it
            mask = causal_lower_right(L, k.shape[2])  # as a boolean mask, but flash can run it
            causal = False
        if isinstance(mask, BlockMask):  # a fixed mask as flex_attention's blocks (fused.py)
            y = fused.flex(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.norm1 = nn.LayerNorm(d, bias=False)
        self.norm2 = nn.LayerNorm(d, bias=False)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate='tanh'),
                                 nn.Linear(4 * d, d))
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)  # shift, scale, gate for attention and MLP
        self.dropout = cfg.dropout

    def forward(self, x, c, cos, sin, causal, mask, cache, layer):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, causal, mask, cache, layer)
        x = x + gate1 * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2 * F.dropout(h, self.dropout, self.training)


# ---- the network -----------------------------------------------------------------------------

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
        pad = torch.where(torch.arange(V) < cfg.vocab_size, 0.0, float('-inf'))
        self.register_buffer('pad_bias', pad, persistent=False)  # padded ids never win

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())
        if embeddings:
            return n
        return n - self.embed.numel() - self.out.weight.numel()

    def forward(self, x, sigma=None, causal=False, mask=None, positions=None, cache=None,
                select=None, head=None):
        """x: token ids (B, L), or probability vectors (B, L, K) over the first K ids.
        sigma: (B,) noise level for adaLN (zeros if None). causal / mask: the attention (mask is
        boolean, True = may attend, broadcastable to (B, H, L, Lk), or the same as a BlockMask:
        fused.block_mask). positions: (B, L) rotary positions (default: cache.len + 0..L-1).
        select: boolean (B, L), the positions that reach the output layer (default: all).
        head(h, W, b) is the output layer, by default output_layer: the logits (B, L, V), or
        (N, V) at select, over the padded vocabulary (padding = -inf). fused.py passes its
        chunked loss as head, and the call returns that loss."""
        if x.dtype.is_floating_point:  # soft input: a weighted sum of embeddings
            h = x @ self.embed[:x.shape[-1]].to(x.dtype)
        else:
            h = self.embed[x]
        B, L = h.shape[:2]
        if sigma is None:
            sigma = torch.zeros(B, device=h.device)
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
        if select is not None:  # the output layer only where a loss or sampler needs it
            h = h[select]
        if head is None:
            head = output_layer
        return head(h, self.out.weight, self.out.bias + self.pad_bias)


def output_layer(h, W, b, rows=256):
    """The logits F.linear(h, W, b). Selected rows (N, d) are padded for the matmul, to a power
    of two up to `rows`, then to a multiple of `rows`, and dropped again: a row count that changes
    every step (MDLM's masked positions) then makes a few matmul shapes, not one per step, and
    the per-shape caches of oneDNN (CPU) and CUDA stay bounded."""
    n = len(h)
    if h.dim() != 2:
        return F.linear(h, W, b)
    size = 1 << (n - 1).bit_length() if n <= rows else -(-n // rows) * rows
    padded = torch.cat([h, h.new_zeros(size - n, h.shape[1])])
    return F.linear(padded, W, b)[:n]


def unwrap(model):
    """The DiT inside a DDP and/or torch.compile wrapper."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, '_orig_mod', model)  # torch.compile's wrapper holds it there


# ---- what the methods read off the logits ----------------------------------------------------

def log_softmax(logits, K):
    """log x_theta over the K real ids (the [MASK] id and the padding dropped: MATH (6)),
    in float32 at least (float64 stays float64)."""
    logits = logits[..., :K]
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def cross_entropy(logits, targets, K):
    """-log x_theta[target] at each position: logits (..., V), targets (...) -> (...)."""
    return -log_softmax(logits, K).gather(-1, targets[..., None])[..., 0]


# ---- sampling helpers shared by the methods' samplers ----------------------------------------

def top_p_filter(probs, top_p):
    """Nucleus: keep the smallest set of tokens whose mass reaches top_p, renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before this token is enough
    probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def sample_categorical(probs):
    """One draw per row of probs (..., V): argmax p_i / E_i with E_i ~ Exp(1), the exponential
    race (Gumbel-max in another form). Pass float64 probs: float32 noise visibly lowers the
    entropy of long samples."""
    e = torch.empty_like(probs).exponential_()
    return (probs / e).argmax(dim=-1)


def start_tokens(n, length, K, prompt=None, fixed=None, device='cpu'):
    """A sampler's start: z (n, length), id K ([MASK], or "not drawn yet") everywhere but at
    the clean tokens given, and keep (n, length), True there. prompt (n, P): a clean prefix;
    fixed=(tokens, given), both (n, length): infilling, clean where given."""
    z = torch.full((n, length), K, dtype=torch.long, device=device)
    keep = torch.zeros(n, length, dtype=torch.bool, device=device)
    if prompt is not None:
        if prompt.dim() != 2 or prompt.shape[0] != n or prompt.shape[1] > length:
            raise ValueError(f'prompt must be (n={n}, P <= length={length}), '
                             f'got {tuple(prompt.shape)}')
        z[:, :prompt.shape[1]] = prompt
        keep[:, :prompt.shape[1]] = True
    if fixed is not None:
        tokens, given = fixed[0].to(device), fixed[1].to(device)
        if tokens.shape != (n, length) or given.shape != (n, length):
            raise ValueError(f'fixed=(tokens, given) must both be (n={n}, length={length})')
        z = torch.where(given, tokens, z)
        keep = keep | given
    if ((z[keep] < 0) | (z[keep] >= K)).any():
        raise ValueError(f'prompt and fixed tokens must be ids in [0, {K}), the real vocabulary')
    return z, keep


def generate(denoise, model, args, n, length, prompt=None, device='cpu', fixed=None,
             callback=None):
    """n sequences of `length` tokens with a method's denoise(model, args, z, keep, report) ->
    (tokens, NFE): the body of every method's sample(). Beyond the training context
    (args.block_size), window by window: the first block_size positions, then each window
    keeps the last block_size - stride tokens so far as a clean prefix and adds up to
    args.stride (default: half the context) new ones. callback(z, nfe, noisy) sees the whole
    sequence and the NFE so far at the start and after each step (noisy: not final yet)."""
    z, keep = start_tokens(n, length, args.vocab_size, prompt, fixed, device)
    context = args.block_size or length
    stride = args.stride or context // 2
    if length > context and not 0 < stride < context:
        raise ValueError(f'--stride must be in [1, block_size - 1] = [1, {context - 1}], '
                         f'got {stride}')
    out = z[:, :0]
    nfe = 0
    if callback is not None:
        callback(z, 0, ~keep)                                  # step 0: the given tokens only
    while out.shape[1] < length:
        done = out.shape[1]                                    # tokens decided so far
        hi = min(done + stride if done else context, length)   # this window: positions lo..hi-1
        lo = max(hi - context, 0)

        def report(w, calls, noisy):  # noisy may be a function, called only for a callback
            if callback is None:
                return
            if callable(noisy):
                noisy = noisy()
            clean = torch.zeros_like(keep[:, :lo])
            callback(torch.cat([out[:, :lo], w, z[:, hi:]], 1), nfe + calls,
                     torch.cat([clean, noisy, ~keep[:, hi:]], 1))
        window = torch.cat([out[:, lo:], z[:, done:hi]], 1)
        window_keep = torch.cat([torch.ones_like(keep[:, lo:done]), keep[:, done:hi]], 1)
        w, calls = denoise(model, args, window, window_keep, report)
        out = torch.cat([out, w[:, done - lo:]], 1)
        nfe += calls
    return out, nfe
