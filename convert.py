"""The method papers' released models and the seed's Lightning checkpoints, in our DiT.

    python sample.py --ckpt hf:kuleshov-group/mdlm-owt --steps 128   # the Hub (network once)
    python sample.py --ckpt ~/models/mdlm-owt/                        # a local folder, same layout
    python eval.py --ckpt ~/runs/mdlm/checkpoints/last.ckpt           # a Lightning checkpoint

sample.py, eval.py and train.py --init-from read these through checkpoint.load_checkpoint, which
hands any --ckpt that is not a ckpt.pt of ours (hf:NAME, a folder, a .ckpt file) to load() here.
load() returns a checkpoint shaped like ours (algo, args, meta, config, model), so the tools run
unchanged. The method and its settings come from the checkpoint's own files (config.json, or
the Lightning hyper-parameters), never from a flag; a flag may still override a setting.

The released network (models/dit.py of kuleshov-group/mdlm, s-sahoo/duo, s-sahoo/Eso-LMs and the
seed) is ours, parameter for parameter; every key sits under `backbone.`:

    vocab_embed.embedding [V, D]              -> embed (rows padded to a multiple of 128, zeros)
    sigma_map.mlp.0 / .2  [C, 256], [C, C]    -> sigma_mlp.0 / .2 (sinusoidal features of sigma)
    blocks.i.norm1, norm2 [D] (no bias)       -> blocks.i.norm1, norm2
    blocks.i.attn_qkv [3D, D], attn_out [D, D] -> blocks.i.attn.qkv, attn.proj
    blocks.i.mlp.0 [4D, D], mlp.2 [D, 4D]     -> blocks.i.mlp.0, mlp.2 (GELU tanh between)
    blocks.i.adaLN_modulation [6D, C]         -> blocks.i.adaLN (shift, scale, gate twice)
    output_layer.norm_final, adaLN_modulation [2D, C], linear [V, D] -> norm_out, adaLN_out, out
    rotary_emb.inv_freq                       -> dropped (checked: base 10000, half-split)

The causal variant without sigma_map and adaLN (the method repos' AR baseline) gets modulation
weights that are exactly the identity: shift = scale = 0, gate = 1.
"""
import functools
import json
import os
import pickle
import re
import types
from dataclasses import asdict

import torch

import data
from model import Config, DiT

SOURCES = "hf:NAME, a folder with config.json and model.safetensors, or a Lightning .ckpt"
LIGHTNING_ALGOS = {'mdlm': 'mdlm', 'duo': 'duo', 'duo_base': 'duo', 'distillation': 'duo',
                   'esolm': 'esolm', 'ar': 'ar'}


def is_released(spec):
    """Whether --ckpt names something for this file rather than a ckpt.pt of ours."""
    return spec.startswith('hf:') or os.path.isdir(spec) or spec.endswith('.ckpt')


# ---- the layout ------------------------------------------------------------------------------

def layout(n_layer, adaLN):
    """(released name, our name) of every parameter, in the released backbone.named_parameters()
    order: the order of a Lightning EMA list."""
    names = [('vocab_embed.embedding', 'embed')]
    if adaLN:
        names += [(f'sigma_map.mlp.{i}.{p}', f'sigma_mlp.{i}.{p}')
                  for i in (0, 2) for p in ('weight', 'bias')]
    block = [('norm1.weight', 'norm1.weight'), ('attn_qkv.weight', 'attn.qkv.weight'),
             ('attn_out.weight', 'attn.proj.weight'), ('norm2.weight', 'norm2.weight'),
             ('mlp.0.weight', 'mlp.0.weight'), ('mlp.0.bias', 'mlp.0.bias'),
             ('mlp.2.weight', 'mlp.2.weight'), ('mlp.2.bias', 'mlp.2.bias')]
    if adaLN:
        block += [('adaLN_modulation.weight', 'adaLN.weight'),
                  ('adaLN_modulation.bias', 'adaLN.bias')]
    names += [(f'blocks.{i}.{r}', f'blocks.{i}.{o}') for i in range(n_layer) for r, o in block]
    names += [('output_layer.norm_final.weight', 'norm_out.weight'),
              ('output_layer.linear.weight', 'out.weight'),
              ('output_layer.linear.bias', 'out.bias')]
    if adaLN:
        names += [('output_layer.adaLN_modulation.weight', 'adaLN_out.weight'),
                  ('output_layer.adaLN_modulation.bias', 'adaLN_out.bias')]
    return names


def shape_of(weights):
    """D, V, n_layer, C (None without adaLN) and whether it is adaLN-conditioned, read off the
    released weights."""
    if 'vocab_embed.embedding' not in weights:
        raise SystemExit('missing key backbone.vocab_embed.embedding: not the released DiT layout')
    V, D = weights['vocab_embed.embedding'].shape
    n_layer = len({k.split('.')[1] for k in weights if k.startswith('blocks.')})
    adaLN = 'sigma_map.mlp.0.weight' in weights
    C = weights['sigma_map.mlp.0.weight'].shape[0] if adaLN else None  # AR: no conditioning
    return D, V, n_layer, C, adaLN


def to_ours(weights, cfg, adaLN, source):
    """Our state dict from the released one (keys without `backbone.`): every key and shape
    checked, one line naming the first that differs."""
    with torch.device('meta'):
        ours = DiT(cfg).state_dict()
    names = layout(cfg.n_layer, adaLN)
    known = {r for r, _ in names} | {'rotary_emb.inv_freq'}
    for r, _ in names:
        if r not in weights:
            raise SystemExit(f'{source}: missing key backbone.{r}')
    for k in weights:
        if k not in known:
            raise SystemExit(f'{source}: unexpected key backbone.{k} (not in the released DiT)')
    head_dim = cfg.n_embd // cfg.n_head
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    got = weights.get('rotary_emb.inv_freq')
    if got is not None and not torch.allclose(got.double(), inv_freq, rtol=1e-5):
        raise SystemExit(f'{source}: backbone.rotary_emb.inv_freq is not rotary base 10000 over '
                         f'head dim {head_dim}: check n_heads')
    state = {}
    for r, o in names:
        w = weights[r].float()
        want = list(ours[o].shape)
        if o in ('embed', 'out.weight', 'out.bias'):   # released rows V, ours padded
            want[0] = cfg.vocab_size
        if list(w.shape) != want:
            raise SystemExit(f'{source}: backbone.{r} has shape {list(w.shape)}, expected {want}')
        if o in ('embed', 'out.weight', 'out.bias'):   # padded rows: zeros (pad_bias masks them)
            w = torch.cat([w, w.new_zeros(cfg.padded_vocab - cfg.vocab_size, *w.shape[1:])])
        state[o] = w
    if not adaLN:  # the causal variant: modulation that is exactly the identity
        d, c = cfg.n_embd, cfg.cond_dim
        unit_gate = torch.cat([torch.zeros(2 * d), torch.ones(d)]).repeat(2)  # shift, scale, gate
        state['sigma_mlp.0.weight'] = torch.zeros(c, 256)
        state['sigma_mlp.0.bias'] = torch.zeros(c)
        state['sigma_mlp.2.weight'] = torch.zeros(c, c)
        state['sigma_mlp.2.bias'] = torch.zeros(c)
        for i in range(cfg.n_layer):
            state[f'blocks.{i}.adaLN.weight'] = torch.zeros(6 * d, c)
            state[f'blocks.{i}.adaLN.bias'] = unit_gate.clone()
        state['adaLN_out.weight'] = torch.zeros(2 * d, c)
        state['adaLN_out.bias'] = torch.zeros(2 * d)
    return state


def checkpoint(algo, weights, n_head, K, args, tokenizer, source, cond_dim=128):
    """A checkpoint shaped like train.py's from released weights and the method's settings."""
    D, V, n_layer, C, adaLN = shape_of(weights)
    C = C or cond_dim
    if algo != 'ar' and not adaLN:
        raise SystemExit(f'{source}: a {algo} model needs backbone.sigma_map and the adaLN keys, '
                         f'which these weights lack')
    if D % n_head:
        raise SystemExit(f'{source}: hidden size {D} is not divisible by n_heads {n_head}')
    cfg = Config(vocab_size=V, n_embd=D, n_layer=n_layer, n_head=n_head, cond_dim=C)
    return {'algo': algo, 'model': to_ours(weights, cfg, adaLN, source), 'ema': None,
            'config': asdict(cfg), 'meta': {'tokenizer': tokenizer, 'vocab_size': K},
            'args': {'micro_batch_size': 8, 'tokenizer': tokenizer, **args}, 'step': 0,
            'source': source}


def real_tokens(algo, V, tokenizer, source):
    """K, the real tokens: Duo's id V-1 is a [PAD] inside its uniform state space (K = V); MDLM
    and Eso-LM append [MASK] (K = V - 1, mask id K), and AR the same id, never predicted."""
    K = V if algo == 'duo' else V - 1
    if not tokenizer.startswith('hf:'):  # a tokenizer we can count here
        n = data.get_tokenizer(tokenizer).vocab_size
        if K < n:
            raise SystemExit(f'{source}: vocabulary of {V} ids leaves {K} real tokens for {algo}, '
                             f'fewer than the {n} of tokenizer {tokenizer}')
    return K


# ---- Hugging Face layout: config.json + model.safetensors ------------------------------------

def hf_folder(spec):
    """The local folder of hf:NAME (downloaded once into the Hugging Face cache) or of a path."""
    name = spec[3:] if spec.startswith('hf:') else spec
    if os.path.isdir(name):
        return name
    try:
        import huggingface_hub  # optional: only hf:NAME needs it
    except ImportError:
        raise SystemExit(f'--ckpt {spec}: downloading needs huggingface_hub '
                         f'(pip install huggingface_hub), or pass a local folder') from None
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=['*.json', '*.safetensors'])
    except Exception as e:
        raise SystemExit(f'--ckpt {spec}: cannot download it from the Hugging Face hub '
                         f'({type(e).__name__}): check the name and the network') from None


def eso_settings(spec, config):
    """alpha_0 and the batch split of a released Eso-LM: its config has none, its run name says
    'alpha-1' or 'alpha-0_25' (with batch split 0.5)."""
    found = re.search(r'alpha-(\d+(?:_\d+)?)', spec)
    if 'alpha_0' in config:
        alpha0 = float(config['alpha_0'])
        where = 'config.json'
    elif found:
        alpha0 = float(found.group(1).replace('_', '.'))
        where = f"the name ('{found.group(0)}')"
    else:
        alpha0 = 1.0
        where = "neither config.json nor the name: the default"
    batch_split = 0.5 if 0 < alpha0 < 1 else alpha0   # both losses trained half and half
    print(f'{spec}: Eso-LM alpha0 {alpha0:g}, batch split {batch_split:g}, from {where} '
          f'(--alpha0 overrides)')
    return {'alpha0': alpha0, 'batch_split': batch_split, 'time_cond': False}


def hf_method(config, adaLN):
    """The method of a Hugging Face folder, from its config.json (and the AR variant from its
    weights: no adaLN)."""
    kind = str(config.get('model_type', '')).lower()
    if not adaLN:
        return 'ar'
    if 'eso' in kind or 'mask_index' in config:
        return 'esolm'
    if 'duo' in kind or config.get('time_conditioning'):
        return 'duo'
    return 'mdlm'


def load_hf(spec):
    folder = hf_folder(spec)
    if os.path.exists(os.path.join(folder, 'ckpt.pt')):
        raise SystemExit(f'{folder} holds a train.py run: pass {os.path.join(folder, "ckpt.pt")}')
    for f in ('config.json', 'model.safetensors'):
        if not os.path.exists(os.path.join(folder, f)):
            raise SystemExit(f'--ckpt {spec}: no {f} in {folder}: pass {SOURCES}')
    try:
        from safetensors.torch import load_file  # optional: only this format needs it
    except ImportError:
        raise SystemExit('reading model.safetensors needs safetensors (pip install '
                         'safetensors)') from None
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    stored = load_file(os.path.join(folder, 'model.safetensors'))
    for k in stored:
        if not k.startswith('backbone.'):
            raise SystemExit(f'{spec}: unexpected key {k} (every key is under backbone.)')
    weights = {k.removeprefix('backbone.'): v for k, v in stored.items()}
    D, V, n_layer, C, adaLN = shape_of(weights)
    for key, value in (('vocab_size', V), ('n_blocks', n_layer), ('cond_dim', C),
                       ('hidden_dim', D), ('hidden_size', D)):
        if key in config and value is not None and config[key] != value:
            raise SystemExit(f'{spec}: config.json says {key} {config[key]}, the weights {value}')
    algo = hf_method(config, adaLN)
    print(f"{spec}: {algo} (config.json: model_type '{config.get('model_type')}', "
          f"time_conditioning {config.get('time_conditioning')}), {n_layer} blocks x {D}, "
          f"{V} ids")
    args = {'block_size': int(config.get('model_length', 1024)), 'dataset': 'openwebtext'}
    if algo == 'mdlm':
        args['time_cond'] = False
    if algo == 'esolm':
        if config.get('mask_index', V - 1) != V - 1:
            raise SystemExit(f'{spec}: config.json mask_index {config["mask_index"]} is not the '
                             f'last id {V - 1}')
        args.update(eso_settings(spec, config))
    K = real_tokens(algo, V, 'gpt2', spec)
    return checkpoint(algo, weights, int(config.get('n_heads', 12)), K, args, 'gpt2', spec,
                      int(config.get('cond_dim', 128)))


# ---- Lightning checkpoints: state_dict, ema.shadow_params, hyper_parameters -------------------

class Inert(dict):
    """Stands in for any class a Lightning checkpoint names outside torch (omegaconf, transformers,
    numpy, lightning): it keeps what the pickle hands it and runs none of that class's code."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.setdefault('_items', []).append(item)

    def extend(self, items):
        self.setdefault('_items', []).extend(items)


class Unpickler(pickle.Unpickler):
    """torch.load's unpickler that resolves only what torch.load(weights_only=True) allows; every
    other name becomes an Inert class, so reading a checkpoint runs no code from it."""

    def find_class(self, module, name):
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = _get_allowed_globals()
        if f'{module}.{name}' in allowed:
            return allowed[f'{module}.{name}']
        return type(name, (Inert,), {'__module__': f'inert.{module}'})


INERT_PICKLE = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__='inert')


def plain(x):
    """Nested dicts, lists and values from what the unpickler built: an omegaconf container or
    node keeps its value in _content / _val."""
    if isinstance(x, Inert):
        state = getattr(x, 'state', None)
        if isinstance(state, tuple):  # (state, slots)
            state = next((s for s in state if isinstance(s, dict)), None)
        if isinstance(state, dict) and '_content' in state:
            return plain(state['_content'])
        if isinstance(state, dict) and '_val' in state:
            return plain(state['_val'])
        return {k: plain(v) for k, v in x.items()} or None
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def lightning_tokenizer(name):
    """Our tokenizer for the Lightning config's data.tokenizer_name_or_path."""
    lower = str(name).lower()
    if 'gpt2' in lower:
        return 'gpt2'
    if 'tinyllama' in lower:  # the seed's scaling grid (a local tokenizer.model in its runs)
        return 'hf:TinyLlama/TinyLlama_v1.1'
    return lower if lower in ('byte',) else f'hf:{name}'


def lightning_dataset(name):
    lower = str(name).lower()
    if 'openwebtext' in lower:
        return 'openwebtext'
    if 'slim_pajama' in lower:
        return 'cerebras/SlimPajama-627B'
    return str(name)


def get(tree, path, source, default=None, kind=str):
    """tree['a']['b'] for path 'a.b' of the Lightning hyper-parameters, as `kind`."""
    node = tree
    for key in path.split('.'):
        if not isinstance(node, dict) or key not in node:
            if default is not None:
                return default
            raise SystemExit(f'{source}: hyper_parameters has no {path}: not a checkpoint of the '
                             f'seed or the method repos')
        node = node[key]
    try:
        return kind(node)
    except (TypeError, ValueError):  # e.g. an interpolation omegaconf never resolved
        raise SystemExit(f"{source}: hyper_parameters {path} is '{node}', not a "
                         f"{kind.__name__}") from None


def lightning_weights(ckpt, source):
    """The backbone's weights: the EMA (ckpt['ema']['shadow_params'], in
    backbone.named_parameters() order) when present, else state_dict."""
    state = {k.removeprefix('backbone.'): v for k, v in ckpt['state_dict'].items()
             if k.startswith('backbone.')}
    shadow = (ckpt.get('ema') or {}).get('shadow_params') or []
    if not shadow:
        print(f'{source}: the raw weights (state_dict; no EMA in this checkpoint)')
        return state
    n_layer, adaLN = shape_of(state)[2::2]
    names = [r for r, _ in layout(n_layer, adaLN)]
    if len(shadow) != len(names):
        raise SystemExit(f'{source}: ema.shadow_params holds {len(shadow)} tensors, the backbone '
                         f'has {len(names)} parameters: not this network\'s EMA')
    ema = dict(state)
    for i, (name, tensor) in enumerate(zip(names, shadow)):
        if name not in state:
            raise SystemExit(f'{source}: missing key backbone.{name}')
        if tensor.shape != state[name].shape:
            raise SystemExit(f'{source}: ema.shadow_params[{i}] (backbone.{name}) has shape '
                             f'{list(tensor.shape)}, the state_dict {list(state[name].shape)}')
        ema[name] = tensor
    print(f'{source}: the EMA weights (ema.shadow_params, {len(shadow)} tensors)')
    return ema


def load_lightning(path):
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at '{path}'")
    try:  # names outside torch become Inert: no code from the file runs
        ckpt = torch.load(path, map_location='cpu', weights_only=False, pickle_module=INERT_PICKLE)
    except Exception as e:
        raise SystemExit(f"'{path}' is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise SystemExit(f"'{path}' holds no Lightning checkpoint (no state_dict): pass {SOURCES}")
    config = get(plain(ckpt.get('hyper_parameters')) or {}, 'config', path, kind=dict)
    name = get(config, 'algo.name', path)
    if name not in LIGHTNING_ALGOS:
        raise SystemExit(f"{path}: algo.name '{name}' is none of {', '.join(LIGHTNING_ALGOS)}")
    algo = LIGHTNING_ALGOS[name]
    weights = lightning_weights(ckpt, path)
    tokenizer = lightning_tokenizer(get(config, 'data.tokenizer_name_or_path', path))
    args = {'block_size': get(config, 'model.length', path, kind=int),
            'dataset': lightning_dataset(get(config, 'data.valid', path, 'openwebtext'))}
    if algo == 'mdlm':
        args['time_cond'] = get(config, 'algo.time_conditioning', path, False, kind=bool)
    if algo == 'esolm':
        args.update(alpha0=get(config, 'algo.alpha_0', path, kind=float),
                    batch_split=get(config, 'algo.batch_split', path, kind=float), time_cond=False)
        print(f"{path}: Eso-LM alpha0 {args['alpha0']:g}, batch split {args['batch_split']:g}, "
              f"from its hyper-parameters (--alpha0 overrides)")
    D, V, n_layer = shape_of(weights)[:3]
    print(f'{path}: {algo} (algo.name {name}), {n_layer} blocks x {D}, {V} ids, tokenizer '
          f'{tokenizer}')
    K = real_tokens(algo, V, tokenizer, path)
    ckpt_out = checkpoint(algo, weights, get(config, 'model.n_heads', path, kind=int), K, args,
                          tokenizer, path, get(config, 'model.cond_dim', path, 128, kind=int))
    ckpt_out['step'] = int(ckpt.get('global_step') or 0)
    return ckpt_out


@functools.lru_cache(maxsize=2)  # sample.py and eval.py read --ckpt twice: convert once
def load(spec):
    """A checkpoint shaped like train.py's from hf:NAME, a folder in that layout, or a Lightning
    .ckpt; model.DiT(Config(**ckpt['config'])) loads ckpt['model'] exactly."""
    if spec.endswith('.ckpt') and not os.path.isdir(spec):
        return load_lightning(spec)
    return load_hf(spec)
