"""Autoregressive baseline: next-token prediction with causal attention (GUIDE §3).

The same four functions as mdlm.py, duo.py and esolm.py, so train.py,
sample.py and bench.py never branch on the method:
  vocab_size(K)                     ids the network embeds (no [MASK] here)
  train_loss(model, x, u, args, step, state) -> scalar, mean per token
  eval_nll(model, x, u, args)       -> (NLL per sequence (B,), tokens per sequence)
  sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None) -> (tokens, NFE)
"""
import torch

from model import KVCache, Loss, cross_entropy, in_windows, sample_categorical, start_tokens, top_p_filter

EXACT = True  # eval_nll is the exact NLL, not a bound


def add_args(parser):
    pass  # AR has no options of its own


def vocab_size(K):
    return K


def train_loss(model, x, u, args, step, state):
    # -log p(x_l | x_<l), averaged over the L-1 predicted tokens; u (times) unused
    targets = x[:, 1:].flatten()
    return model(x[:, :-1], causal=True, loss=Loss(cross_entropy, targets, weight=1 / len(targets),
                                                    fused=getattr(args, 'fused', True)))


@torch.no_grad()
def eval_nll(model, x, u, args):
    loss = Loss(cross_entropy, x[:, 1:].flatten(), fused=getattr(args, 'fused', True))  # per-row -log p
    nll = model(x[:, :-1], causal=True, loss=loss)
    return nll.view(x.shape[0], -1).sum(1), x.shape[1] - 1


def next_token(logits, args):
    """Draw from softmax(logits / temperature), nucleus-filtered."""
    dtype = torch.float64 if getattr(args, 'float64', True) else torch.float32
    probs = (logits.to(dtype) / getattr(args, 'temperature', 1.0)).softmax(-1)
    return sample_categorical(top_p_filter(probs, getattr(args, 'top_p', 1.0)))


@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Continue the kept prefix of z (n, l) to l tokens, left to right. With
    args.cache each step runs the network on the new token only."""
    x, nfe = z[:, :int(keep[0].sum())], 0   # keep is a prefix: AR refuses fixed=
    cache = KVCache(z.shape[1]) if getattr(args, 'cache', True) else None
    new = x  # tokens the network has not seen yet
    while x.shape[1] < z.shape[1]:
        if cache is not None:  # the new tokens only; the cache holds the rest
            logits = model(new, causal=True, cache=cache)[:, -1]
        else:                  # the whole prefix again (output layer at the last position only)
            last = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            last[:, -1] = True
            logits = model(x, causal=True, select=last)
        nfe += 1
        new = next_token(logits, args)[:, None]
        x = torch.cat([x, new], dim=1)
        unwritten = (torch.arange(z.shape[1], device=z.device) >= x.shape[1]).expand_as(z)
        report(torch.cat([x, z[:, x.shape[1]:]], 1), nfe, unwritten)
    return x, nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """Continue prompt (n, P), P >= 1, to `length` tokens. Past the context, each
    window continues the tail of the text so far in a fresh KV cache (model.in_windows)."""
    if prompt is None or prompt.shape[1] == 0 or fixed is not None:
        raise ValueError('AR conditions on a prompt of >= 1 token (e.g. end-of-text) only: no fixed= (infilling)')
    return in_windows(denoise, model, args, *start_tokens(n, length, args.vocab_size, prompt, None, device), callback)
