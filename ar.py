"""AR: the autoregressive baseline, next-token prediction with causal attention (MATH §1).

Read this file first: it is the shortest method, and its docstring is the contract that all
four method files (ar.py, mdlm.py, duo.py, esolm.py) follow with the same names, arguments and
return types, so that train.py, sample.py, eval.py and bench.py pick a module by name and never
branch on the method.

    EXACT                       True: eval_nll is the exact NLL; False: an upper bound (PPL <=)
    VARIABLE_LENGTH             whether --ssl-ratio may shorten its training batches
    add_args(parser)            the method's own flags, in its argument group
    defaults(args, gpu)         {flag: value}: the method's own defaults of train.py's flags
    check_args(args, training)  raises ValueError, one line naming the fix
    vocab_size(K)               ids the network embeds, for K real tokens
    corrupt(x, alpha_t, K)      z_t ~ q(z_t | x): the forward process (AR: none)
    train_loss(model, x, u, args, step, state) -> the scalar to backpropagate
    eval_nll(model, x, u, args) -> (NLL or NELBO per sequence (B,), tokens per sequence)
    mfu_flops(cfg, args)        forward FLOPs per token, attention included, MATH (38)
    denoise(model, args, z, keep, report) -> (tokens, NFE): fill one window, keep fixed;
                                after each step report(z, nfe, noisy): noisy is a boolean
                                tensor, or a function that makes one (only called if traced)
    sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None)
                                -> (tokens (n, length), NFE)

x: clean tokens (B, L); u: the trainer's stratified uniforms (B,), MATH (4); state: a dict the
method may keep across steps (Duo's teacher). model is called as in model.py.
"""
import torch

import fused
from model import (KVCache, cross_entropy, flops_per_token, generate, sample_categorical,
                   top_p_filter)

EXACT = True             # eval_nll is the exact NLL
VARIABLE_LENGTH = False  # the seed never shortens AR's batches


def add_args(parser):
    pass  # AR has no options of its own


def defaults(args, gpu):
    return {}


def check_args(args, training):
    pass


def vocab_size(K):
    return K


def corrupt(x, alpha_t, K):
    return x  # AR has no forward process


# ---- loss ------------------------------------------------------------------------------------

def train_loss(model, x, u, args, step, state):
    """-log p_theta(x_l | x_<l), the mean over the B (L - 1) predicted tokens, MATH (1)."""
    inputs, targets = x[:, :-1], x[:, 1:]
    if args.fused:  # the same number without the (B, L, V) logits: fused.py
        head = fused.cross_entropy_head(targets.flatten(), args.vocab_size, 1)
        return model(inputs, causal=True, head=head) / targets.numel()
    logits = model(inputs, causal=True)
    nll = cross_entropy(logits, targets, args.vocab_size)   # -log p_theta(x_l | x_<l)
    return nll.mean()


@torch.no_grad()
def eval_nll(model, x, u, args):
    """The exact NLL of x_2..x_L given x_1, per sequence, MATH (1)."""
    inputs, targets = x[:, :-1], x[:, 1:]
    if args.fused:  # the same values, CHUNK rows of logits at a time
        nll = model(inputs, causal=True, head=fused.Rows(cross_entropy, targets.flatten(),
                                                         args.vocab_size))
    else:
        nll = cross_entropy(model(inputs, causal=True), targets, args.vocab_size)
    return nll.view(x.shape[0], -1).sum(1), x.shape[1] - 1


def mfu_flops(cfg, args):
    return flops_per_token(cfg, args.block_size, attention=True)


# ---- sampling --------------------------------------------------------------------------------

def next_token(logits, args):
    """x_l ~ softmax(logits / temperature), nucleus-filtered, MATH (2)."""
    dtype = torch.float64 if args.float64 else torch.float32
    logits = logits[..., :args.vocab_size].to(dtype)   # the padding dropped
    probs = (logits / args.temperature).softmax(-1)
    return sample_categorical(top_p_filter(probs, args.top_p))


@torch.no_grad()
def denoise(model, args, z, keep, report):
    """Continue the kept prefix of z (n, l) to l tokens, left to right. With args.cache each
    step runs the network on the new token only; else on the whole prefix again."""
    x = z[:, :int(keep[0].sum())]   # keep is a prefix: sample() refuses fixed=
    cache = KVCache(z.shape[1]) if args.cache else None
    new = x                         # tokens the network has not seen yet
    nfe = 0
    while x.shape[1] < z.shape[1]:
        if cache is not None:       # the new tokens only; the cache holds the rest
            logits = model(new, causal=True, cache=cache)[:, -1]
        else:                       # the output layer at the last position only
            last = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            last[:, -1] = True
            logits = model(x, causal=True, select=last)
        nfe += 1
        new = next_token(logits, args)[:, None]
        x = torch.cat([x, new], dim=1)
        unwritten = torch.arange(z.shape[1], device=z.device) >= x.shape[1]
        report(torch.cat([x, z[:, x.shape[1]:]], 1), nfe, unwritten.expand_as(z))
    return x, nfe


@torch.no_grad()
def sample(model, args, n, length, prompt=None, device='cpu', *, fixed=None, callback=None):
    """Continue prompt (n, P), P >= 1, to `length` tokens. Past the context each window
    continues the tail of the text so far in a fresh KV cache (model.generate)."""
    if prompt is None or prompt.shape[1] == 0:
        raise ValueError('AR continues a prompt of at least one token (e.g. end-of-text)')
    if fixed is not None:
        raise ValueError('AR writes left to right: it cannot fill gaps (--infill); '
                         'use --prompt, or a diffusion model (mdlm, duo, esolm)')
    return generate(denoise, model, args, n, length, prompt, device, None, callback)
