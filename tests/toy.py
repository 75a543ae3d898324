"""An enumerable toy distribution over sequences, for exact-answer tests.

With vocabulary K and length L small (K^L rows), every conditional is a sum
over the table, so a Bayes-optimal "network" can stand in for the model."""
import itertools

import torch


def toy_distribution(K=3, L=3, seed=0):
    """All K^L sequences (N, L) and a random joint distribution over them (N,)."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.tensor(list(itertools.product(range(K), repeat=L)))
    probs = torch.rand(len(seqs), generator=g, dtype=torch.float64) ** 3 + 1e-3
    return seqs, probs / probs.sum()


def entropy(probs):
    return -(probs * probs.log()).sum().item()


def conditionals(seqs, probs, x, known, K):
    """p(x_l = k | x at the known positions) for every l: (B, L, K) float64.
    x: (B, L) ids (anything at unknown positions), known: (B, L) bool."""
    agree = ((seqs[None] == x[:, None]) | ~known[:, None]).all(-1)  # (B, N)
    w = agree * probs[None]                                          # p(seq, observed)
    out = torch.zeros(x.shape[0], seqs.shape[1], K, dtype=torch.float64)
    out.scatter_add_(2, seqs.T[None].expand(x.shape[0], -1, -1),
                     w[:, None, :].expand(-1, seqs.shape[1], -1))
    return out / out.sum(-1, keepdim=True)


def total_variation(samples, seqs, probs):
    """TV distance between the empirical law of samples (S, L) and probs."""
    K = int(seqs.max()) + 1
    base = K ** torch.arange(seqs.shape[1] - 1, -1, -1)
    index = (samples * base).sum(-1)  # seqs are in lexicographic order
    counts = torch.bincount(index, minlength=len(seqs)).double()
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()
