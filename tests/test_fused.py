"""The fused output layer + loss (fused.py, --fused) against the plain path of each method
file: the same loss and the same gradients for every method, in float64."""

import pytest
import torch

import ar
import duo
import esolm
import mdlm
import fused
import model as M
from model import DiT, get_config
from test_ar import oracle as ar_oracle
from test_duo import noisy_oracle
from test_mdlm import oracle as mdlm_oracle
from toy import toy_distribution
from args import make_args

K, B, L = 37, 3, 12  # vocabulary padded to 128: the -inf columns are exercised


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 7 rows: N is never a multiple, and no call sees more than 7 rows."""
    monkeypatch.setattr(fused, 'CHUNK', 7)


def random_dit(vocab, seed=0):
    torch.manual_seed(seed)
    net = DiT(get_config('tiny', vocab)).double()
    for p in net.parameters():  # leave the zero init so every weight gets a gradient
        torch.nn.init.normal_(p, std=0.3)
    return net


def loss_and_grads(algo, net, args, fused):
    args.fused = fused
    torch.manual_seed(1)
    x = torch.randint(0, K, (B, L))
    u = (torch.rand(1) + torch.arange(B)) / B
    loss = algo.train_loss(net, x, u, args, 0, {})
    return loss, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)


def assert_same(algo, net, args, tol=1e-10):
    l0, g0 = loss_and_grads(algo, net, args, False)
    l1, g1 = loss_and_grads(algo, net, args, True)
    assert l0.dtype == l1.dtype == net.embed.dtype
    assert torch.allclose(l0, l1, rtol=tol, atol=0), (l0, l1)
    scale = max(a.abs().max() for a in g0 if a is not None)
    for a, b in zip(g0, g1):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=tol, atol=tol * scale), ((a - b).abs().max(), scale)
    assert sum(a.abs().sum() for a in g1 if a is not None) > 0


def ns(**kw):
    return make_args(vocab_size=K, **kw)


def test_ar_fused_equals_plain():
    assert_same(ar, random_dit(ar.vocab_size(K)), ns())


@pytest.mark.parametrize('loss', ['low_var', 'elbo'])
def test_mdlm_fused_equals_plain(loss):  # elbo: per-row weights 1/t
    assert_same(mdlm, random_dit(mdlm.vocab_size(K)), ns(loss=loss, time_cond=True))


@pytest.mark.parametrize('alpha0, split', [(1.0, 1.0), (0.0, 0.0), (0.5, 1 / 3)])
def test_esolm_fused_equals_plain(alpha0, split):
    # diffusion, sequential, and both (split normalisation)
    args = ns(loss='elbo', alpha0=alpha0, batch_split=split, time_cond=False, iw_orders=0)
    assert_same(esolm, random_dit(esolm.vocab_size(K)), args)


@pytest.mark.parametrize('curriculum', [0, 1])
def test_duo_fused_equals_plain(curriculum, monkeypatch):
    # the NELBO, and the curriculum (soft input)
    latent = duo.gaussian_latent

    def float64_latent(*a):  # a float64 soft input
        return latent(*a).double()

    monkeypatch.setattr(duo, 'gaussian_latent', float64_latent)
    args = ns(curriculum_steps=curriculum, tau=0.1, gamma_min=None, gamma_max=None,
              distill_from=None)
    # grads ~1e-8: the NELBO cancels digits
    assert_same(duo, random_dit(duo.vocab_size(K)), args, tol=1e-7)


def test_duo_hand_gradient_is_the_autograd_one():
    """fused.duo_nelbo_grad: the stable rewrite's value and its hand gradient in the logits,
    against duo.nelbo (the readable form) and its autograd gradient, at extreme alpha, x == z
    and x != z, with -inf padding columns."""
    g = torch.Generator().manual_seed(0)
    Kd, V, N = 5, 8, 40
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).requires_grad_()
    pad = torch.zeros(V, dtype=torch.float64)
    pad[Kd:] = float('-inf')
    x = torch.randint(0, Kd, (N,), generator=g)
    z = torch.where(torch.arange(N) % 2 == 0, x, torch.randint(0, Kd, (N,), generator=g))
    a = torch.tensor([1e-5, 1e-3, 0.3, 0.9, 1 - 1e-4], dtype=torch.float64).repeat(N // 5)
    da = torch.full((N,), -(1 - duo.EPS), dtype=torch.float64)
    value = duo.nelbo_integrand(logits + pad, x, z, a, da, Kd)
    (auto,) = torch.autograd.grad(value.sum(), logits)
    with torch.no_grad():
        loss, hand = fused.duo_nelbo_grad(logits + pad, x, z, a, da, Kd)
    assert torch.allclose(loss, value.detach(), rtol=1e-9, atol=1e-10), (loss - value).abs().max()
    assert torch.allclose(hand, auto, rtol=1e-9, atol=1e-9), (hand - auto).abs().max()  # to 1e4
    assert (hand[:, Kd:] == 0).all()


def test_weighted_rows_chunked_and_without_grad():
    """A head's weighted sum and gradients against autograd of the plain cross-entropy, N = 23
    rows in chunks of 7; Rows' per-row values without grad; the loss function never sees more
    than a chunk of logits."""
    g = torch.Generator().manual_seed(0)
    N, d, V, Kc = 23, 6, 19, 17   # columns Kc.. are dropped (a [MASK] and padding)
    h = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, Kc, (N,), generator=g)
    w = torch.rand(N, generator=g, dtype=torch.float64)
    seen = []

    def spy(logits, targets, K):
        seen.append(len(logits))
        return fused.cross_entropy_grad(logits, targets, K)
    plain = (w * M.cross_entropy(torch.nn.functional.linear(h, W, b), t, Kc)).sum()
    chunked = fused.Head(spy, w, t, Kc)(h, W, b)
    assert max(seen) == 7 and len(seen) == 4
    assert torch.allclose(plain, chunked, rtol=1e-12)
    for a, c in zip(torch.autograd.grad(plain, (h, W, b)), torch.autograd.grad(chunked, (h, W, b))):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-13)
    rows = fused.Rows(M.cross_entropy, t, Kc)(h, W, b)
    assert rows.shape == (N,) and not rows.requires_grad
    assert torch.allclose(rows, M.cross_entropy(torch.nn.functional.linear(h, W, b), t, Kc),
                          rtol=1e-12)
    empty = fused.cross_entropy_head(t[:0], Kc, w[:0])(h[:0], W, b)  # none masked: 0, no grad
    assert empty.item() == 0 and (torch.autograd.grad(empty, W)[0] == 0).all()


def with_bias(oracle):
    """A toy oracle plus a learnable logit bias theta, so there is a gradient to compare."""
    theta = torch.zeros(8, dtype=torch.float64, requires_grad=True)

    def net(x, head=None, **kw):
        out = oracle(x, **kw)
        out = out + theta[:out.shape[-1]]
        return out if head is None else head(out)
    return net, theta


@pytest.mark.parametrize('name', ['ar', 'mdlm', 'duo'])
def test_exact_oracles_fused_equals_plain(name):
    Kt, Lt = 3, 4 if name == 'ar' else 3
    seqs, probs = toy_distribution(Kt, Lt, seed=0)
    algo, oracle, args = {'ar': (ar, ar_oracle(seqs, probs), ns()),
                          'mdlm': (mdlm, mdlm_oracle(seqs, probs, Kt), ns(loss='elbo')),
                          'duo': (duo, noisy_oracle(seqs, probs), ns(curriculum_steps=0))}[name]
    args.vocab_size = Kt
    net, theta = with_bias(oracle)
    res = []
    for on in (False, True):
        args.fused = on
        torch.manual_seed(0)
        u = (torch.rand(1) + torch.arange(len(seqs))) / len(seqs)
        loss = algo.train_loss(net, seqs, u, args, 0, {})
        res.append((loss, torch.autograd.grad(loss, theta)[0]))
    assert torch.allclose(res[0][0], res[1][0], rtol=1e-12)
    assert torch.allclose(res[0][1], res[1][1], atol=1e-12)
    assert res[1][1].abs().sum() > 0


def test_bench_refuses_bad_flags_in_one_line():
    import bench
    cases = [(['--iters', '0'], '--iters must be >= 1'),
             (['--top-p', '0'], '--top-p must be in'),
             (['--size', '7M'], "unknown size '7M'"),
             (['--mem-steps', '0'], '--mem-steps must be')]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            bench.main(argv)


def test_bench_profile_splits_a_fused_step():
    """--profile on a fused step: three positive shares that add up to one; a plain entry,
    whose loss follows the logits outside the network, reports none."""
    import bench
    argv = ['--algo', 'mdlm', 'duo', 'mdlm:fused=False', '--size', 'tiny', '--tokenizer', 'byte',
            '--block-size', '16', '--batch-size', '2', '--iters', '1', '--rounds', '1',
            '--no-sample', '--profile', '--dtype', 'float32']
    results = bench.main(argv)
    shares = ('share_blocks', 'share_output_layer_loss', 'share_optimizer')
    for r in results[:2]:
        assert all(r[k] > 0 for k in shares) and sum(r[k] for k in shares) == pytest.approx(1)
    assert not any(k in results[2] for k in shares)


@pytest.mark.parametrize('name', ['ar', 'mdlm', 'esolm', 'duo'])
def test_fused_step_saves_no_logits(name, monkeypatch):
    """What the backward keeps: no (rows x vocabulary) tensor beyond one chunk (the plain path saves
    the logits), and no tensor kept alive only through a view (v of the qkv output pinned all
    three)."""
    algo = {'ar': ar, 'mdlm': mdlm, 'esolm': esolm, 'duo': duo}[name]
    Kv = 500  # padded to 512: no other dimension of the tiny network
    args = make_args(vocab_size=Kv, tau=0.1)
    net = random_dit(algo.vocab_size(Kv)).float()
    V = net.cfg.padded_vocab
    x = torch.randint(0, Kv, (4, 64))
    for on in (True, False):
        args.fused = on
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            algo.train_loss(net, x, (torch.rand(1) + torch.arange(4)) / 4, args, 0, {})
        # (rows x vocabulary): the logits, or the log-probabilities over the K real ids
        logits = [t for t in saved if t.shape[-1] >= Kv and t.numel() > fused.CHUNK * V]
        assert (not logits) == on, [t.shape for t in logits]
    pinned = [t for t in saved
              if t.numel() > 4 * x.numel()  # per-token tensors (not adaLN's per-sequence views)
              and t.untyped_storage().nbytes() >= 3 * t.numel() * t.element_size()]
    assert not pinned, [t.shape for t in pinned]  # a saved view holding a storage 3x its size


@pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
def test_flex_attention_with_the_block_mask_is_sdpa_with_the_boolean_mask():
    """Eso-LM's 2L mask as a BlockMask (the sequential loss's path on a GPU): flex_attention's
    forward (a CPU runs no backward) equals SDPA's with the boolean mask, in float64, at sizes
    with empty, full and mixed 128 x 128 tiles; the BlockMask lists exactly the tiles that are
    not empty, so the kernel skips the rest."""
    torch.manual_seed(0)
    for n in (5, 100, 256):
        mask = esolm.sequential_mask(n, 'cpu')
        q, k, v = torch.randn(3, 2, 3, 2 * n, 16, dtype=torch.float64)
        block_mask = fused.block_mask(esolm.sequential_mask, n, torch.device('cpu'))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(fused.flex(q, k, v, block_mask), want, atol=1e-12, rtol=0), n
        T = -(-2 * n // 128)  # tiles per side, the mask padded with False
        padded = torch.zeros(T * 128, T * 128, dtype=torch.bool)
        padded[:2 * n, :2 * n] = mask
        tiles = padded.view(T, 128, T, 128).any(3).any(1)
        listed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
        assert listed == tiles.sum(), n
    assert tiles.sum() == 8 and tiles.numel() == 16  # n = 256: half the tiles are skipped


def test_the_network_attends_through_a_block_mask_as_through_its_boolean_mask():
    net = random_dit(K)
    n = 6
    x = torch.randint(0, K, (2, 2 * n))
    positions = torch.cat([torch.randperm(n), torch.randperm(n)]).expand(2, 2 * n)
    block_mask = fused.block_mask(esolm.sequential_mask, n, torch.device('cpu'))
    with torch.no_grad():
        want = net(x, mask=esolm.sequential_mask(n, 'cpu'), positions=positions)
        got = net(x, mask=block_mask, positions=positions)
    assert torch.allclose(got[..., :K], want[..., :K], atol=1e-10, rtol=0)
