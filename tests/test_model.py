"""The shared network: shapes, attention modes, KV cache, size ladder, FLOPs."""
import math

import pytest
import torch

import model as M
from model import DiT, KVCache, get_config


def random_dit(vocab=50, size='tiny', seed=0, std=0.2):
    """A DiT with all weights random (the zero init would hide bugs: the blocks
    start as the identity and the logits as zeros)."""
    torch.manual_seed(seed)
    m = DiT(get_config(size, vocab)).eval()
    for p in m.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=std)
    return m


def test_shapes_in_every_attention_mode():
    m = random_dit()
    x = torch.randint(0, 50, (2, 7))
    V = m.cfg.padded_vocab
    assert V == 128
    mask = torch.rand(2, 1, 7, 7) > 0.5
    mask |= torch.eye(7, dtype=torch.bool)
    for kw in [dict(), dict(causal=True), dict(mask=mask), dict(sigma=torch.rand(2)),
               dict(positions=torch.randperm(7).expand(2, 7))]:
        out = m(x, **kw)
        assert out.shape == (2, 7, V)
        assert torch.isinf(out[..., 50:]).all() and torch.isfinite(out[..., :50]).all()
    probs = torch.softmax(torch.randn(2, 7, 50), -1)  # soft input: weighted embedding sum
    assert m(probs).shape == (2, 7, V)
    onehot = torch.nn.functional.one_hot(x, 50).float()
    assert torch.allclose(m(onehot), m(x), atol=1e-5)
    select = torch.rand(2, 7) > 0.5
    assert torch.allclose(m(x, select=select), m(x)[select], atol=1e-5)


def test_bool_mask_matches_is_causal():
    m = random_dit()
    x = torch.randint(0, 50, (2, 9))
    causal_mask = torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.allclose(m(x, causal=True), m(x, mask=causal_mask), atol=1e-5)


def test_causal_attention_leaks_nothing_from_the_future():
    m = random_dit(std=0.1).double()
    # soft inputs, so we can take gradients
    emb = torch.randn(1, 8, 50, dtype=torch.float64, requires_grad=True)
    out = m(emb.softmax(-1), causal=True)
    out[0, 3, :50].sum().backward()
    grad = emb.grad[0].abs().sum(-1)
    assert (grad[4:] == 0).all() and (grad[:4] > 0).all()
    emb.grad = None
    m(emb.softmax(-1))[0, 3, :50].sum().backward()  # bidirectional sees everything
    assert (emb.grad[0].abs().sum(-1) > 0).all()


def test_kv_cache_decoding_equals_the_full_forward():
    m = random_dit()
    x = torch.randint(0, 50, (2, 12))
    full = m(x, causal=True)
    cache = KVCache(max_len=12)
    parts = [m(x[:, :5], cache=cache)]          # a prompt at once,
    parts += [m(x[:, i:i + 1], cache=cache) for i in range(5, 8)]  # then one token at a time,
    parts += [m(x[:, 8:], cache=cache)]         # then a chunk
    assert cache.len == 12
    assert torch.allclose(torch.cat(parts, 1)[..., :50], full[..., :50], atol=1e-4)
    # truncate discards uncommitted keys: re-running the tail gives the same logits
    cache.truncate(8)
    assert torch.allclose(m(x[:, 8:], cache=cache)[..., :50], full[:, 8:, :50], atol=1e-4)


def test_size_ladder():
    guide = ('6M 256,6,4 19M 384,8,6 34M 512,8,8 48M 576,9,9 66M 640,10,10 75M 640,16,8 '
             '85M 640,13,10 113M 768,12,12 142M 768,15,12 170M 768,18,12 180M 896,14,14 '
             '206M 896,16,14 231M 896,18,14 268M 1024,16,16 302M 1024,18,16 '
             '336M 1024,20,16 472M 1280,18,10 551M 1280,21,10 571M 1408,18,11 '
             '629M 1280,24,10 666M 1408,21,11 761M 1408,24,11 831M 1536,22,12 '
             '944M 1536,25,12 1233M 1792,24,14 1476M 2048,22,16 1678M 2048,25,16 '
             '2121M 2176,28,17').split()
    ladder = dict(zip(guide[::2], (tuple(map(int, s.split(','))) for s in guide[1::2])))
    assert len(ladder) == 28
    for name, dims in ladder.items():
        assert M.SIZES[name] == dims
        cfg = get_config(name, 32001)
        assert cfg.n_embd % cfg.n_head == 0 and (cfg.n_embd // cfg.n_head) % 2 == 0
    assert M.SIZES['tiny'] == (64, 2, 2)
    with torch.device('meta'):  # "6M has 14.3M non-embedding parameters with a 32k vocabulary"
        n = DiT(get_config('6M', 32001)).num_params(embeddings=False)
    assert 4e6 < n < 15e6
    with pytest.raises(ValueError, match='unknown size'):
        get_config('7M', 100)


def test_flops_match_the_seed():
    """Forward FLOPs per sequence at context 2048 with the seed's 32001-token vocabulary, as its
    configs/flops/*.json record them (calflops on its network, MATH (36)), within 0.01%; the
    matmuls alone are 0.05-0.27% short of them."""
    seed = {'6M': 5.3026e10, '19M': 1.0860e11, '113M': 4.4941e11, '472M': 1.6187e12,
            '2121M': 6.8054e12}
    for size, flops in seed.items():
        cfg = get_config(size, 32001)
        assert abs(M.seed_flops_per_token(cfg, 2048) * 2048 / flops - 1) < 1e-4, size
        assert 4e-4 < 1 - M.flops_per_token(cfg, 2048) * 2048 / flops < 3e-3, size
    cfg = get_config('19M', 32001)
    assert M.flops_per_token(cfg, 2048, attention=True) > M.flops_per_token(cfg, 2048)


def test_seed_flops_count_the_non_matmul_terms():
    # 19M (d 384, 8 layers, 6 heads) at T = 2048 beyond the matmuls: LayerNorm 4 x 384 x 17,
    # GELU 4 x 384 x 8, one per attention score 8 x 6 x 2048, rotary angles 64 / 2, and per
    # sequence the sigma MLP 2 x 128 x (256 + 128) with two SiLUs of 128
    cfg = get_config('19M', 50257)
    extra = 26_112 + 12_288 + 98_304 + 32 + (98_304 + 256) / 2048
    assert M.seed_flops_per_token(cfg, 2048) - M.flops_per_token(cfg, 2048) == extra


def test_top_p_and_categorical():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    kept = M.top_p_filter(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    torch.manual_seed(0)
    draws = M.sample_categorical(probs.expand(40000, 4))
    freq = torch.bincount(draws, minlength=4) / 40000
    assert torch.allclose(freq, probs[0].float(), atol=0.01)


def test_attention_term_of_the_flops():
    # QK^T and AV: 2 x 2 x d x T per token per layer; 19M (d 384, 8 layers) at T = 2048 and 256
    cfg = get_config('19M', 50257)
    for T, attention in ((2048, 25_165_824), (256, 3_145_728)):
        assert M.flops_per_token(cfg, T, attention=True) - M.flops_per_token(cfg, T) == attention
    # 2 (8 x 12 x 384^2 + 384 x 50257) + adaLN 4915200 / 2048
    assert M.flops_per_token(cfg, 2048) == 66_911_328


def test_rotary_makes_attention_depend_on_relative_position_only():
    m = random_dit().double()
    x = torch.randint(0, 50, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    out = m(x, positions=pos)
    # the same offsets between all positions: the same output (logits ~30; float32 angles: ~5e-5)
    for shift in (1, 37):
        assert torch.allclose(m(x, positions=pos + shift), out, atol=1e-3), shift
    assert not torch.allclose(m(x, positions=pos * 2), out, atol=1)  # other offsets: another output


def test_top_p_at_exactly_the_boundary():
    """A token whose preceding mass equals top_p exactly is not needed: dropped."""
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]], dtype=torch.float64)  # exact in binary
    assert torch.equal(M.top_p_filter(probs, 0.75),
                       torch.tensor([[0, 2 / 3, 0, 1 / 3]], dtype=torch.float64))
    assert torch.equal(M.top_p_filter(probs, 0.5),
                       torch.tensor([[0, 1.0, 0, 0]], dtype=torch.float64))


def test_kv_cache_attention_of_several_new_queries_is_the_bottom_right_causal_mask():
    """Queries at the end of the keys (a prompt at once, a chunk, one token): each sees the keys
    at or before its own position, as the boolean mask j <= cache.len + i did, in float64."""
    torch.manual_seed(0)
    cfg = get_config('tiny', 50)
    attn = M.Attention(cfg).double()
    n = 9
    x = torch.randn(2, n, cfg.n_embd, dtype=torch.float64)
    cos, sin = M.rotary(torch.arange(n).expand(2, n), cfg.n_embd // cfg.n_head)
    qkv = attn.qkv(x).view(2, n, 3, cfg.n_head, -1).permute(2, 0, 3, 1, 4)
    q, k = (M.apply_rotary(t, cos, sin) for t in qkv[:2])
    j = torch.arange(n)
    for start in (0, 3, 5, 8):  # cached keys before the new queries
        cache = KVCache(n)
        if start:
            attn(x[:, :start], cos[:, :, :start], sin[:, :, :start], False, None, cache, 0)
            cache.len = start
        got = attn(x[:, start:], cos[:, :, start:], sin[:, :, start:], False, None, cache, 0)
        mask = j <= j[start:, None]  # new query i is position start + i
        scores = (q[:, :, start:] @ k.transpose(-1, -2)) / math.sqrt(k.shape[-1])
        y = scores.masked_fill(~mask, float('-inf')).softmax(-1) @ qkv[2]
        want = attn.proj(y.transpose(1, 2).reshape(2, n - start, cfg.n_embd))
        assert torch.allclose(got, want, atol=1e-12, rtol=0), start
