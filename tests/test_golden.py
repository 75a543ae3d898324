"""What no enumerable toy can see, pinned by values computed here from the formulas: the block's
residual gates and modulation, rotary frequencies, dropout only in training, the warmup rule,
the noise seeds of each slice, the AR temperature, when Duo's greedy tail applies."""
import math

import pytest
import torch
import torch.nn.functional as F

import ar
import config
import duo
import model as M
import train
from args import make_args
from model import Block, DiT, get_config


def layer_norm(x, weight):  # LayerNorm without bias: normalise, then times the weight
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def test_block_is_two_gated_residuals_with_adaln_modulation():
    """x + gate1 * attn(LN(x) (1 + scale1) + shift1), then the same with the MLP, the six
    adaLN chunks in the order shift, scale, gate (attention), shift, scale, gate (MLP)."""
    torch.manual_seed(0)
    cfg = get_config('tiny', 10)
    block = Block(cfg).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, L, d, H = 2, 5, cfg.n_embd, cfg.n_head
    x = torch.randn(B, L, d, dtype=torch.float64)
    c = torch.randn(B, cfg.cond_dim, dtype=torch.float64)
    cos, sin = M.rotary(torch.arange(L).expand(B, L), d // H)
    mod = c @ block.adaLN.weight.T + block.adaLN.bias
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, None, i * d:(i + 1) * d]
                                                    for i in range(6))
    h = layer_norm(x, block.norm1.weight) * (1 + scale1) + shift1
    q, k, v = (h @ w.T for w in block.attn.qkv.weight.split(d))
    heads = []
    for i in range(H):
        cols = slice(i * d // H, (i + 1) * d // H)
        qi = M.apply_rotary(q[..., cols], cos[:, 0], sin[:, 0])
        ki = M.apply_rotary(k[..., cols], cos[:, 0], sin[:, 0])
        att = (qi @ ki.transpose(1, 2) / math.sqrt(d // H)).softmax(-1)
        heads.append(att @ v[..., cols])
    x1 = x + gate1 * (torch.cat(heads, -1) @ block.attn.proj.weight.T)
    h = layer_norm(x1, block.norm2.weight) * (1 + scale2) + shift2
    fc, proj = block.mlp[0], block.mlp[2]
    mlp = F.gelu(h @ fc.weight.T + fc.bias, approximate='tanh') @ proj.weight.T + proj.bias
    expected = x1 + gate2 * mlp
    out = block(x, c, cos, sin, False, None, None, 0)
    assert torch.allclose(out, expected, atol=1e-10), (out - expected).abs().max()


def test_rotary_frequencies_and_the_half_split_rotation():
    """angle(p, i) = p 10000^(-2i/hd); the first half of a head rotates with the second."""
    cos, sin = M.rotary(torch.tensor([[3]]), 8)          # head_dim 8: frequencies 10000^(-i/4)
    angles = torch.tensor([3.0, 0.3, 0.03, 0.003])        # 3 x (1, 0.1, 0.01, 0.001)
    assert torch.allclose(cos[0, 0, 0], angles.cos(), atol=1e-6)
    assert torch.allclose(sin[0, 0, 0], angles.sin(), atol=1e-6)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])                # x1 = (1, 2), x2 = (3, 4)
    c = torch.tensor([0.5, 0.25])
    s = torch.tensor([0.75, 0.125])
    expected = torch.tensor([1 * 0.5 - 3 * 0.75, 2 * 0.25 - 4 * 0.125,
                             1 * 0.75 + 3 * 0.5, 2 * 0.125 + 4 * 0.25])
    assert torch.equal(M.apply_rotary(x, c, s), expected)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = DiT(get_config('tiny', 30, dropout=0.5))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    same = DiT(get_config('tiny', 30, dropout=0.0))
    same.load_state_dict(net.state_dict())
    x = torch.randint(0, 30, (2, 9))
    net.eval()
    assert torch.equal(net(x), net(x)) and torch.allclose(net(x), same.eval()(x), atol=1e-6)
    net.train()
    assert not torch.allclose(net(x), net(x))


@pytest.mark.parametrize('steps, warmup', [(50, 10), (400, 80), (20_000, 200), (100_000, 1000)])
def test_default_warmup_is_one_percent_at_least_100_at_most_a_fifth(steps, warmup):
    args = config.parse_args(['--max-iters', str(steps), '--tokenizer', 'byte'])
    assert args.warmup_iters == warmup == min(max(steps // 100, 100), steps // 5)


def test_each_slice_of_each_step_draws_its_own_noise(tmp_path, monkeypatch):
    """The noise of step s, slice i is torch.manual_seed(seed_for(seed, 'train-noise', s, i)):
    a resume or another split of the batch over ranks and micro-steps draws the same noise."""
    states = []
    real_loss = ar.train_loss

    def recording(model, x, u, a, step, state):
        states.append((step, torch.random.get_rng_state()))
        return real_loss(model, x, u, a, step, state)
    monkeypatch.setattr(ar, 'train_loss', recording)
    from test_train import TINY
    train.main(TINY + ['--max-iters', '3', '--micro-batch-size', '2', '--out-dir', str(tmp_path)])
    assert [s for s, _ in states] == [0, 0, 1, 1, 2, 2]
    for i, (step, state) in enumerate(states):
        expected = torch.Generator().manual_seed(train.seed_for(1337, 'train-noise', step, i % 2))
        assert torch.equal(state, expected.get_state()), (step, i % 2)


def test_ar_temperature_divides_the_logits(monkeypatch):
    seen = []
    monkeypatch.setattr(ar, 'sample_categorical', lambda probs: seen.append(probs) or
                        probs.argmax(-1))
    logits = torch.tensor([[1.0, 2.0, 4.0, float('-inf')]])   # the last: padding
    for T in (0.5, 2.0):
        ar.next_token(logits, make_args(vocab_size=3, temperature=T))
        expected = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) / T
        assert torch.allclose(seen[-1][0], expected.softmax(-1), atol=1e-12), T


def test_the_greedy_tail_is_the_last_step_only(monkeypatch):
    """T ancestral draws from the posterior, then the noise removal's argmax: T + 1 calls."""
    draws = []
    real = duo.sample_categorical
    monkeypatch.setattr(duo, 'sample_categorical', lambda p: draws.append(p) or real(p))
    K = 5

    def model(z, sigma=None, **kw):
        return torch.randn(*z.shape, K, generator=torch.Generator().manual_seed(len(draws)))
    for greedy, expected in ((True, 6), (False, 7)):
        draws.clear()
        _, nfe = duo.sample(model, make_args(vocab_size=K, steps=6, greedy_tail=greedy), 3, 4)
        assert nfe == 7 and len(draws) == expected, greedy
