"""Released models through --ckpt (convert.py): a tiny network in the released layout, saved as a
Hugging Face folder (config.json + model.safetensors) and as a Lightning .ckpt with an EMA list,
must give the logits of an independent forward written here from the layout's description, for
all four methods; every kind of mismatch is one line naming the key."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import config
import data
import eval as evaluation
import sample
import train
from checkpoint import load_checkpoint, load_model
from test_train import TINY

D, H, C, N = 16, 4, 8, 2   # width, heads, conditioning width, blocks
GPT2_V = 50258             # GPT-2's 50257 ids + one: [MASK] (MDLM, Eso-LM) or [PAD] (Duo)
BYTE_V = 258               # the byte tokenizer's 257 ids + one


# ---- the released network, written from its description --------------------------------------

def released_weights(V, adaLN=True, seed=0, D=D, C=C):
    """Random weights under the released names and shapes (without `backbone.`), in
    backbone.named_parameters() order."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return scale * torch.randn(*shape, generator=g)
    w = {'vocab_embed.embedding': rand(V, D, scale=1.0)}
    if adaLN:
        w.update({'sigma_map.mlp.0.weight': rand(C, 256), 'sigma_map.mlp.0.bias': rand(C),
                  'sigma_map.mlp.2.weight': rand(C, C), 'sigma_map.mlp.2.bias': rand(C)})
    for i in range(N):
        b = f'blocks.{i}.'
        w.update({b + 'norm1.weight': 1 + rand(D), b + 'attn_qkv.weight': rand(3 * D, D),
                  b + 'attn_out.weight': rand(D, D), b + 'norm2.weight': 1 + rand(D),
                  b + 'mlp.0.weight': rand(4 * D, D), b + 'mlp.0.bias': rand(4 * D),
                  b + 'mlp.2.weight': rand(D, 4 * D), b + 'mlp.2.bias': rand(D)})
        if adaLN:
            w.update({b + 'adaLN_modulation.weight': rand(6 * D, C),
                      b + 'adaLN_modulation.bias': rand(6 * D)})
    w.update({'output_layer.norm_final.weight': 1 + rand(D),
              'output_layer.linear.weight': rand(V, D), 'output_layer.linear.bias': rand(V)})
    if adaLN:
        w.update({'output_layer.adaLN_modulation.weight': rand(2 * D, C),
                  'output_layer.adaLN_modulation.bias': rand(2 * D)})
    return w


def reference(w, x, sigma=None, causal=False, positions=None):
    """The released forward in float64: rotary on the two halves of q and k (base 10000, angles
    in float32 as the released code makes them), adaLN chunks shift/scale/gate for attention
    then the MLP, LayerNorm without affine times the weight, GELU tanh, scores / sqrt(head_dim).
    Without sigma_map: no modulation at all."""
    w = {k: v.double() for k, v in w.items()}
    B, L = x.shape
    hd = D // H

    def linear(a, name, bias=True):
        out = a @ w[name + '.weight'].T
        return out + w[name + '.bias'] if bias else out

    def norm(a, weight):
        mean = a.mean(-1, keepdim=True)
        var = ((a - mean) ** 2).mean(-1, keepdim=True)
        return (a - mean) / torch.sqrt(var + 1e-5) * w[weight]

    def silu(a):
        return a / (1 + torch.exp(-a))

    def gelu(a):
        return 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))

    def rotate(a, cos, sin):  # (B, L, H, hd)
        a1 = a[..., :hd // 2]
        a2 = a[..., hd // 2:]
        return torch.cat([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)
    adaLN = 'sigma_map.mlp.0.weight' in w
    if positions is None:
        positions = torch.arange(L).expand(B, L)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    angles = positions.float()[..., None] * inv_freq                    # (B, L, hd/2), float32
    cos = angles.cos().double()[:, :, None]
    sin = angles.sin().double()[:, :, None]
    h = w['vocab_embed.embedding'][x]
    if adaLN:
        sigma = torch.zeros(B) if sigma is None else sigma
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        arg = sigma[:, None].float() * freqs
        features = torch.cat([torch.cos(arg), torch.sin(arg)], -1).double()
        c = silu(linear(silu(linear(features, 'sigma_map.mlp.0')), 'sigma_map.mlp.2'))
    allowed = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    for i in range(N):
        b = f'blocks.{i}.'
        if adaLN:
            mod = linear(c, b + 'adaLN_modulation')[:, None]
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, -1)
        else:
            shift1 = scale1 = shift2 = scale2 = torch.zeros(1, dtype=torch.float64)
            gate1 = gate2 = torch.ones(1, dtype=torch.float64)
        a = norm(h, b + 'norm1.weight') * (1 + scale1) + shift1
        q, k, v = linear(a, b + 'attn_qkv', bias=False).view(B, L, 3, H, hd).unbind(2)
        q = rotate(q, cos, sin)
        k = rotate(k, cos, sin)
        scores = torch.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(hd)
        attn = scores.masked_fill(~allowed, float('-inf')).softmax(-1)
        y = torch.einsum('bhlm,bmhd->blhd', attn, v).reshape(B, L, D)
        h = h + gate1 * linear(y, b + 'attn_out', bias=False)
        a = norm(h, b + 'norm2.weight') * (1 + scale2) + shift2
        h = h + gate2 * linear(gelu(linear(a, b + 'mlp.0')), b + 'mlp.2')
    out = norm(h, 'output_layer.norm_final.weight')
    if adaLN:
        shift, scale = linear(c, 'output_layer.adaLN_modulation')[:, None].chunk(2, -1)
        out = out * (1 + scale) + shift
    return linear(out, 'output_layer.linear')


# ---- the two formats --------------------------------------------------------------------------

HF_CONFIG = {'mdlm': {'model_type': 'mdlm', 'time_conditioning': False},
             'duo': {'model_type': 'mdlm', 'time_conditioning': True},
             'esolm': {'model_type': 'esolm', 'mask_index': GPT2_V - 1},
             'ar': {'model_type': 'mdlm', 'time_conditioning': False}}


def hf_folder(path, algo, weights, **overrides):
    """A folder in the Hugging Face layout: config.json and model.safetensors, keys under
    backbone."""
    os.makedirs(path, exist_ok=True)
    V = len(weights['vocab_embed.embedding'])
    cfg = {'n_blocks': N, 'n_heads': H, 'cond_dim': C, 'model_length': 32, 'vocab_size': V,
           **HF_CONFIG[algo], **overrides}
    cfg['hidden_size' if algo == 'esolm' else 'hidden_dim'] = D
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(cfg, f)
    save_file({'backbone.' + k: v.contiguous() for k, v in weights.items()},
              os.path.join(path, 'model.safetensors'))
    return str(path)


def omegaconf_like(tree):
    """tree as omegaconf pickles a DictConfig: containers keep a dict under _content, values a
    node with _val; the classes live in a module the loader cannot import."""
    if isinstance(tree, dict):
        return FakeDictConfig({'_content': {k: omegaconf_like(v) for k, v in tree.items()},
                               '_metadata': FakeNode({'_val': None})})
    return FakeNode({'_val': tree, '_metadata': None, '_parent': None})


class FakeDictConfig:
    def __init__(self, state):
        self.__dict__.update(state)

    def __getstate__(self):
        return dict(self.__dict__)


class FakeNode(FakeDictConfig):
    pass


def lightning_ckpt(path, algo_name, raw, ema, tokenizer='byte', shadow=None, **algo_cfg):
    """A Lightning checkpoint of the seed or the method repos: state_dict under backbone., the
    EMA as a list in backbone.named_parameters() order, the hyper-parameters an omegaconf
    config; written through a stand-in module that is gone when it is read."""
    d = raw['vocab_embed.embedding'].shape[1]
    hp = {'algo': {'name': algo_name, **algo_cfg}, 'data': {'tokenizer_name_or_path': tokenizer},
          'model': {'hidden_size': d, 'n_heads': H if d == D else 2, 'n_blocks': N, 'length': 32,
                    'cond_dim': C if d == D else 128}}
    fake = types.ModuleType('omegaconf_standin')
    fake.FakeDictConfig = FakeDictConfig
    fake.FakeNode = FakeNode
    FakeDictConfig.__module__ = FakeNode.__module__ = 'omegaconf_standin'
    sys.modules['omegaconf_standin'] = fake
    try:
        ckpt = {'state_dict': {'backbone.' + k: v for k, v in raw.items()},
                'hyper_parameters': {'config': omegaconf_like(hp), 'tokenizer': FakeNode({})},
                'global_step': 7, 'loops': {}}
        if ema is not None:
            shadow = shadow or [ema[k] for k in raw]                 # named_parameters order
            ckpt['ema'] = {'decay': 0.9999, 'num_updates': 7, 'collected_params': [],
                           'shadow_params': shadow}
        torch.save(ckpt, path)
    finally:
        del sys.modules['omegaconf_standin']
    return str(path)


# ---- exactness: all four methods, both formats ------------------------------------------------

def logits_of(spec, algo, x, sigma, positions):
    model, ckpt = load_model(spec, 'cpu')
    assert ckpt['algo'] == algo
    model = model.double()
    with torch.no_grad():
        if algo == 'duo':
            return model(x, sigma=sigma), ckpt
        if algo == 'esolm':
            return model(x, causal=True, positions=positions), ckpt
        return model(x, causal=algo == 'ar'), ckpt


CASES = [('mdlm', 'mdlm'), ('duo', 'duo_base'), ('esolm', 'esolm'), ('ar', 'ar')]


@pytest.mark.parametrize('algo, lightning_name', CASES)
def test_hf_folder_and_lightning_give_the_released_logits(algo, lightning_name, tmp_path,
                                                          capsys):
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.3, 2.1])
    positions = torch.stack([torch.randperm(10, generator=g) for _ in range(2)])
    kw = dict(sigma=sigma if algo == 'duo' else None, causal=algo in ('ar', 'esolm'),
              positions=positions if algo == 'esolm' else None)
    adaLN = algo != 'ar'
    # Hugging Face folder, GPT-2 vocabulary
    w = released_weights(GPT2_V, adaLN)
    x = torch.randint(0, GPT2_V, (2, 10), generator=g)
    spec = hf_folder(tmp_path / f'{algo}-hf', algo, w)
    got, ckpt = logits_of(spec, algo, x, sigma, positions)
    want = reference(w, x, **kw)
    assert (got[..., :GPT2_V] - want).abs().max() <= 1e-6
    assert torch.isinf(got[..., GPT2_V:]).all()         # the padding never wins
    K = GPT2_V if algo == 'duo' else GPT2_V - 1           # Duo's [PAD] is one of its states
    assert ckpt['meta'] == {'tokenizer': 'gpt2', 'vocab_size': K}
    assert ckpt['args']['block_size'] == 32
    # Lightning, byte vocabulary: the EMA list is what loads
    raw = released_weights(BYTE_V, adaLN, seed=2)
    ema = released_weights(BYTE_V, adaLN, seed=3)
    x = torch.randint(0, BYTE_V, (2, 10), generator=g)
    settings = {'esolm': dict(alpha_0=0.5, batch_split=0.5),
                'mdlm': dict(time_conditioning=False)}.get(algo, {})
    spec = lightning_ckpt(tmp_path / f'{algo}.ckpt', lightning_name, raw, ema, **settings)
    capsys.readouterr()
    got, ckpt = logits_of(spec, algo, x, sigma, positions)
    assert 'the EMA weights' in capsys.readouterr().out
    assert (got[..., :BYTE_V] - reference(ema, x, **kw)).abs().max() <= 1e-6
    assert (got[..., :BYTE_V] - reference(raw, x, **kw)).abs().max() > 0.1
    assert ckpt['meta']['vocab_size'] == (BYTE_V if algo == 'duo' else BYTE_V - 1)
    assert ckpt['step'] == 7
    if algo == 'esolm':
        assert (ckpt['args']['alpha0'], ckpt['args']['batch_split']) == (0.5, 0.5)


def test_lightning_without_ema_uses_the_state_dict(tmp_path, capsys):
    raw = released_weights(BYTE_V)
    spec = lightning_ckpt(tmp_path / 'last.ckpt', 'mdlm', raw, None, time_conditioning=False)
    x = torch.randint(0, BYTE_V, (2, 6))
    got, _ = logits_of(spec, 'mdlm', x, None, None)
    assert 'the raw weights' in capsys.readouterr().out
    assert (got[..., :BYTE_V] - reference(raw, x)).abs().max() <= 1e-6


def test_eso_lm_settings_come_from_the_name_and_a_flag_overrides(tmp_path, capsys):
    w = released_weights(GPT2_V)
    spec = hf_folder(tmp_path / 'Eso-LM-B-alpha-0_25', 'esolm', w)
    parser, flags = sample.get_parser()
    args, ckpt = config.parse_with_checkpoint(parser, flags, ['--ckpt', spec], load_checkpoint)
    assert (args.alpha0, args.batch_split) == (0.25, 0.5)
    assert "alpha0 0.25, batch split 0.5, from the name ('alpha-0_25')" in capsys.readouterr().out
    args, _ = config.parse_with_checkpoint(parser, flags, ['--ckpt', spec, '--alpha0', '1'],
                                           load_checkpoint)
    assert args.alpha0 == 1.0
    spec = hf_folder(tmp_path / 'Eso-LM-B-alpha-1', 'esolm', w)
    assert load_checkpoint(spec)['args']['alpha0'] == 1.0


# ---- every mismatch is one line naming the key -------------------------------------------------

def mismatch(tmp_path, name, change=None, weights=None, **config_overrides):
    w = dict(weights or released_weights(GPT2_V))
    if change:
        change(w)
    return hf_folder(tmp_path / name, 'mdlm', w, **config_overrides)


def drop(key):
    def change(w):
        del w[key]
    return change


def add(key, value):
    def change(w):
        w[key] = value
    return change


@pytest.mark.parametrize('name, change, overrides, says', [
    ('missing', drop('blocks.1.mlp.2.bias'), {}, 'missing key backbone.blocks.1.mlp.2.bias'),
    ('extra', add('blocks.0.attn_qkv.bias', torch.zeros(3 * D)), {},
     'unexpected key backbone.blocks.0.attn_qkv.bias'),
    ('shape', add('blocks.0.attn_out.weight', torch.zeros(D, D + 1)), {},
     r'backbone.blocks.0.attn_out.weight has shape \[16, 17\], expected \[16, 16\]'),
    ('config', None, {'vocab_size': 50304}, 'config.json says vocab_size 50304, the weights 50258'),
    ('heads', None, {'n_heads': 3}, 'hidden size 16 is not divisible by n_heads 3'),
    ('rotary', add('rotary_emb.inv_freq', torch.ones(D // H // 2)), {},
     'backbone.rotary_emb.inv_freq is not rotary base 10000'),
])
def test_hf_mismatch_is_one_line_naming_the_key(name, change, overrides, says, tmp_path):
    spec = mismatch(tmp_path, name, change, **overrides)
    with pytest.raises(SystemExit, match=says) as e:
        load_checkpoint(spec)
    assert '\n' not in str(e.value)


def test_other_mismatches_are_one_line(tmp_path):
    small = released_weights(50000)          # fewer ids than GPT-2's tokenizer
    outside = mismatch(tmp_path, 'outside')
    stored = {'backbone.' + k: v for k, v in released_weights(GPT2_V).items()}
    save_file({**stored, 'x': torch.zeros(1)}, os.path.join(outside, 'model.safetensors'))
    os.makedirs(tmp_path / 'empty')
    raw = released_weights(BYTE_V)
    short = lightning_ckpt(tmp_path / 'short.ckpt', 'mdlm', raw, raw,
                           shadow=list(raw.values())[:-1])
    cases = [(mismatch(tmp_path, 'vocab', weights=small), 'fewer than the 50257 of tokenizer gpt2'),
             (outside, 'unexpected key x'),
             (str(tmp_path / 'empty'), 'no config.json in'),
             (str(tmp_path / 'nothing.ckpt'), 'no checkpoint at'),
             (short, 'ema.shadow_params holds 29 tensors, the backbone has 30 parameters'),
             (lightning_ckpt(tmp_path / 'sedd.ckpt', 'sedd', raw, None),
              "algo.name 'sedd' is none of")]
    for spec, says in cases:
        with pytest.raises(SystemExit, match=says) as e:
            load_checkpoint(spec)
        assert '\n' not in str(e.value), spec


# ---- the tools end to end ----------------------------------------------------------------------

def test_sample_cli_on_a_hugging_face_folder(tmp_path, capsys):
    spec = 'hf:' + hf_folder(tmp_path / 'mdlm-owt', 'mdlm', released_weights(GPT2_V))
    tokens, nfe = sample.main(['--ckpt', spec, '--num-samples', '2', '--length', '12',
                               '--steps', '4', '--dtype', 'float32', '--seed', '1'])
    out = capsys.readouterr().out
    assert tokens.shape == (2, 12) and 1 <= nfe <= 5 and 'NFE' in out
    assert 'mdlm (config.json' in out


def test_eval_cli_on_a_lightning_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, 'DATA_DIR', str(tmp_path / 'data'))
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i in range(8):
        (corpus / f'{i}.txt').write_text('Shall I compare thee to a summer\'s day? ' * (i + 3))
    spec = lightning_ckpt(tmp_path / 'last.ckpt', 'ar', released_weights(BYTE_V, adaLN=False),
                          None)
    result = evaluation.main(['--ckpt', spec, '--dataset', str(corpus), '--block-size', '16',
                              '--batch-size', '2', '--max-batches', '3', '--dtype', 'float32',
                              '--json'])
    assert result['algo'] == 'ar' and result['exact'] and np.isfinite(result['nll'])
    # the exact NLL of those windows under the independent forward of the same weights
    d = data.prepare(str(corpus), 'byte')
    val = np.fromfile(os.path.join(d, 'val.bin'), dtype=data.load_meta(d)['dtype'])
    x = evaluation.windows(val, 16, 2, 3).flatten(0, 1)
    logits = reference(released_weights(BYTE_V, adaLN=False), x[:, :-1], causal=True)
    nll = -logits[..., :BYTE_V - 1].log_softmax(-1).gather(-1, x[:, 1:, None]).mean().item()
    assert result['nll'] == pytest.approx(nll, abs=1e-5)


def test_train_init_from_a_lightning_checkpoint(tmp_path):
    """train.py --init-from starts from the converted weights (the EMA ones): with no step
    taken, the run's checkpoint holds exactly them. The network is --size tiny (64, 2 blocks,
    2 heads, cond 128) with the byte tokenizer."""
    raw = released_weights(BYTE_V, seed=4, D=64, C=128)
    ema = released_weights(BYTE_V, seed=5, D=64, C=128)
    spec = lightning_ckpt(tmp_path / 'base.ckpt', 'mdlm', raw, ema, time_conditioning=False)
    train.main(TINY[2:] + ['--algo', 'mdlm', '--init-from', spec, '--max-iters', '0',
                           '--out-dir', str(tmp_path / 'run')])
    saved = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['model']
    converted = load_checkpoint(spec)['model']
    assert saved.keys() == converted.keys()
    assert all(torch.equal(saved[k], converted[k]) for k in saved)
    assert torch.equal(saved['embed'][:BYTE_V], ema['vocab_embed.embedding'])
