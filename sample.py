"""Sample from a checkpoint of any method (the checkpoint names its algorithm), and score the samples.

    python sample.py --ckpt out/mdlm-6M/ckpt.pt --num-samples 4 --length 256 --steps 256
    python sample.py --ckpt out/ar-6M/ckpt.pt --prompt "ROMEO:" --top-p 0.9
    python sample.py --ckpt out/mdlm-6M/ckpt.pt --steps 8,64,256 --judge out/ar-6M/ckpt.pt --json
    python sample.py --ckpt out/duo-6M/ckpt.pt --judge gpt2-large   # needs transformers (and a network once)

Every sample starts with the end-of-text id, then the prompt; --length counts both. Prints the samples,
the number of network calls (NFE), seconds and tokens/s; a list of --steps: one run per value, same seed.
--judge: generative perplexity and unigram entropy (README "Sample quality"); --infill, --trace: README.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import data
from model import Config, DiT
from train import ALGOS, DTYPE, ON_GPU, load_algo, load_checkpoint


def add_method_args(parser):
    """Every method's own flags, in groups; returns their names (dest)."""
    flags = set()
    for name in ALGOS:
        group = parser.add_argument_group(f'{name} options')
        load_algo(name).add_args(group)
        flags |= {a.dest for a in group._group_actions}
    return flags


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='a checkpoint written by train.py')
    p.add_argument('--num-samples', type=int, default=4)
    p.add_argument('--length', type=int, default=None, help='tokens per sample (default: the training context)')
    p.add_argument('--prompt', default='', help='text every sample continues')
    p.add_argument('--infill', default=None, help='text with gaps to fill, [N] = N tokens: "ROMEO: [10] my love [5]."')
    p.add_argument('--stride', type=int, help='past the context: new tokens per window (default: half of it)')
    p.add_argument('--steps', help='diffusion steps or a list: 8,64,1024 (default: min(length, context))')
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling (1.0 = off)')
    p.add_argument('--temperature', type=float, default=1.0, help='AR only')
    p.add_argument('--trace', action='store_true', help='redraw the first sample after every step')
    p.add_argument('--trace-every', type=int, default=1, help='--trace: redraw after every k-th step only')
    p.add_argument('--trace-html', default=None, help='write the first sample\'s trajectory to this HTML page')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cache', action=argparse.BooleanOptionalAction, default=True,
                   help="use the method's cache (KV cache, or MDLM's skip-unchanged)")
    p.add_argument('--float64', action=argparse.BooleanOptionalAction, default=True,
                   help='sampling probabilities in float64 (default: on)')
    p.add_argument('--judge', default=None, help='score the samples: an AR checkpoint or a Hugging Face causal LM name')
    p.add_argument('--json', action='store_true', help='also print one JSON line per run')
    p.add_argument('--show', type=int, default=None, help='print this many samples per run (default: all)')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default=DTYPE, choices=['bfloat16', 'float16', 'float32'])
    return p, add_method_args(p)


def load_model(path, device):
    """The network and training args of a checkpoint (EMA weights when present)."""
    ckpt = load_checkpoint(path)
    model = DiT(Config(**ckpt['config']))
    model.load_state_dict(ckpt['ema'] if ckpt.get('ema') else ckpt['model'])
    return model.to(device).eval(), ckpt


def parse_with_checkpoint(parser, method_flags, argv):
    """(args, checkpoint): the method's training options (e.g. --time-cond) come from the checkpoint,
    flags given here override them (argparse fills only the defaults that are missing)."""
    ckpt = load_checkpoint(parser.parse_known_args(argv)[0].ckpt)
    known = argparse.Namespace(**{k: v for k, v in ckpt['args'].items() if k in method_flags})
    return parser.parse_args(argv, namespace=known), ckpt


# ---- sample quality: a judge's perplexity and the samples' entropy ---------

@dataclass
class Judge:
    name: str
    tokenizer: data.Tokenizer  # encode, decode, eot, name
    logits: Callable           # ids (n, m) -> (n, m, V): position j predicts token j + 1
    context: int               # the longest sequence it scores at once


def load_judge(spec, device):
    """An AR checkpoint of ours (a path), else a Hugging Face causal LM name."""
    if os.path.exists(spec) or spec.endswith('.pt'):
        model, ckpt = load_model(spec, device)
        if ckpt['algo'] != 'ar':
            raise SystemExit(f"--judge {spec} is a {ckpt['algo']} checkpoint: the judge must be an AR model "
                             f"(an ar checkpoint or a Hugging Face causal LM name)")
        return Judge(spec, data.get_tokenizer(ckpt['meta']['tokenizer']),
                     lambda ids: model(ids, causal=True), ckpt['args']['block_size'])
    try:
        import transformers  # optional: only this path needs it
    except ImportError:
        raise SystemExit(f'--judge {spec}: a Hugging Face judge needs the optional transformers package '
                         f'(pip install transformers) and a network connection to download its weights once; '
                         f'or pass an AR checkpoint of ours') from None
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(spec)
        hf = transformers.AutoModelForCausalLM.from_pretrained(spec).to(device).eval()
    except Exception as e:
        raise SystemExit(f'--judge {spec}: cannot load it from the Hugging Face hub ({type(e).__name__}): '
                         f'check the name and the network connection, or pass an AR checkpoint') from None
    tok = data.Tokenizer(spec, lambda s: hf_tok.encode(s, add_special_tokens=False), hf_tok.decode,
                         len(hf_tok), hf_tok.eos_token_id)
    context = getattr(hf.config, 'max_position_embeddings', None) or getattr(hf.config, 'n_positions', 1024)
    return Judge(spec, tok, lambda ids: hf(ids).logits, context)


def retokenize(ids, src, dst):
    """Token ids of tokenizer src -> ids of tokenizer dst, through text; end-of-text ids map to dst's."""
    out = []
    for eot, group in itertools.groupby(ids, key=lambda i: i == src.eot):
        group = list(group)
        out += [dst.eot] * len(group) if eot else dst.encode(src.decode(group))
    return out


@torch.no_grad()
def judge_nll(judge, ids, start):
    """Sum of -log p_judge(ids[:, j] | ids[:, :j]) over rows and j >= start (>= 1), and the number of
    tokens summed. ids (n, m). Windows of judge.context tokens, each starting at the previous one's last."""
    if start < 1:
        raise ValueError('the judge needs at least one token of context: start >= 1')
    total, count, s = 0.0, 0, start - 1
    while s < ids.shape[1] - 1:
        window = ids[:, s:s + judge.context]
        logits = judge.logits(window[:, :-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        total += F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction='sum').item()
        count += window[:, 1:].numel()
        s += window.shape[1] - 1
    return total, count


def unigram_entropy(ids):
    """Entropy (nats) of the empirical distribution of the ids in a 1-D tensor."""
    p = torch.bincount(ids).double()
    p = p[p > 0] / len(ids)
    return -(p * p.log()).sum().item()


def score(judge, tokens, prompt_len, tok):
    """Gen PPL of samples tokens (n, length) whose first prompt_len tokens were given, the mean
    unigram entropy (nats) of their generated tokens, and the number of judge tokens scored."""
    entropy = sum(unigram_entropy(row) for row in tokens[:, prompt_len:].cpu()) / len(tokens)
    if judge.tokenizer.name == tok.name:  # same ids: score directly
        nll, n = judge_nll(judge, tokens, prompt_len)
    else:
        nll = n = 0
        for row in tokens.tolist():
            head = retokenize(row[:prompt_len], tok, judge.tokenizer) or [judge.tokenizer.eot]
            tail = retokenize(row[prompt_len:], tok, judge.tokenizer)
            a, b = judge_nll(judge, torch.tensor([head + tail], device=tokens.device), len(head))
            nll, n = nll + a, n + b
    return math.exp(nll / max(n, 1)), entropy, n


# ----------------------------------------------------------------------------

def parse_steps(text, default):
    steps = [s.strip() for s in str(text).split(',') if s.strip()] if text is not None else [str(default)]
    if not steps or not all(s.isdigit() and int(s) >= 1 for s in steps):
        raise SystemExit(f"--steps '{text}': give a positive integer or a comma-separated list, e.g. 8,64,1024")
    return [int(s) for s in steps]


def check_args(args):  # out-of-range values: one line each, before any work
    rules = [('--num-samples', args.num_samples >= 1, '>= 1'), ('--top-p', 0 < args.top_p <= 1, 'in (0, 1]'),
             ('--length', args.length is None or args.length >= 1, '>= 1 (or omitted: the context)'),
             ('--temperature', args.temperature > 0, '> 0'), ('--trace-every', args.trace_every >= 1, '>= 1'),
             ('--stride', args.stride is None or 0 < args.stride < args.block_size,
              f'in [1, {args.block_size - 1}] (the training context is {args.block_size})')]
    for flag, ok, rule in rules:
        if not ok:
            raise SystemExit(f"{flag} must be {rule}, got {getattr(args, flag[2:].replace('-', '_'))}")


def parse_infill(text, tok):
    """--infill 'ROMEO: [10] my love [5].' -> token ids and given (True: from the text,
    False: a gap). [N] is a gap of N >= 1 tokens; brackets serve only for gaps."""
    pieces, ids, given = re.split(r'\[(\d+)\]', text), [], []   # text, gap, text, gap, ..., text
    if len(pieces) < 3 or min(int(g) for g in pieces[1::2]) < 1 or any(set('[]') & set(p) for p in pieces[::2]):
        raise SystemExit(f"--infill '{text}': mark each gap as [N], N >= 1 tokens to fill, e.g. 'ROMEO: [10] my love [5].'")
    for i, piece in enumerate(pieces):
        new = [0] * int(piece) if i % 2 else tok.encode(piece)
        ids, given = ids + new, given + [i % 2 == 0] * len(new)
    return ids, given


def tracer(tok, every, out=None):
    """A sampler callback(z, nfe, noisy) that keeps the first sample's trajectory, frames = [(step, nfe,
    ids, marks)], marks one letter per token: m masked (shown as a placeholder), d decided at this step
    (highlighted), n noisy (Duo: differs from argmax x_theta; dimmed), c clean. With every > 0 it redraws
    every k-th frame: in place with colours on a terminal, as plain text otherwise."""
    frames, out = [], out or sys.stdout

    def callback(z, nfe, noisy):
        ids, noisy = z[0].tolist(), noisy[0].tolist()
        before = frames[-1][2:] if frames else ([None] * len(ids), 'm' * len(ids))
        marks = ''.join('m' if not 0 <= i < tok.vocab_size else 'n' if q else
                        'd' if i != j or b in 'mn' else 'c' for i, q, j, b in zip(ids, noisy, *before))
        frames.append((len(frames), nfe, ids, marks))   # step 0: the start
        if every and (len(frames) - 1) % every == 0:
            ansi = dict(m='\x1b[2m', d='\x1b[1;7m', n='\x1b[2m', c='', end='\x1b[0m', home='\x1b[H\x1b[J')
            style = ansi if out.isatty() else dict.fromkeys(ansi, '')
            text = ''.join(style[m] + ('_' if m == 'm' else tok.decode([i])) + style['end'] for i, m in zip(ids, marks))
            out.write(style['home'] + f'--- step {len(frames) - 1} | NFE {nfe} ---\n{text}\n')
            out.flush()
    callback.frames = frames
    return callback


def write_trace_html(path, frames, tok, title):
    """The trajectory as one self-contained page (inline CSS and JS): a slider over the steps."""
    pieces = {i: tok.decode([i]) for f in frames for i in set(f[2]) if 0 <= i < tok.vocab_size}
    blob = json.dumps({'title': title, 'pieces': pieces, 'frames': frames}).replace('</', '<\\/')
    page = f"""<!doctype html><meta charset="utf-8"><title>sample.py --trace-html</title><style>body{{font:15px
monospace;margin:2em}} #t{{white-space:pre-wrap}} .m{{color:#bbb}} .d{{background:#ffd54f}} .n{{color:#999}}</style>
<input id="s" type="range" min="0" style="width:100%"><p id="h"></p><div id="t"></div>
<script>const D={blob}, s=document.getElementById('s'), t=document.getElementById('t'); s.max=D.frames.length-1; s.value=s.max;
s.oninput=function(){{const [step,nfe,ids,marks]=D.frames[s.value]; t.textContent='';
document.getElementById('h').textContent=D.title+': step '+step+' of '+s.max+' | NFE '+nfe; ids.forEach((id,k)=>{{
const e=t.appendChild(document.createElement('span')); e.className=marks[k]; e.textContent=marks[k]=='m'?'_':D.pieces[id];}})}};
s.oninput();</script>\n"""
    with open(f'{path}.{os.getpid()}.tmp', 'w', encoding='utf-8') as f:
        f.write(page)
    os.replace(f.name, path)


def main(argv=None):
    parser, method_flags = get_parser()
    args, ckpt = parse_with_checkpoint(parser, method_flags, argv)
    args.vocab_size, args.block_size = ckpt['meta']['vocab_size'], ckpt['args']['block_size']
    check_args(args)
    tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
    prompt, fixed, n = [tok.eot] + tok.encode(args.prompt), None, args.num_samples
    if args.infill is not None:
        if ckpt['algo'] == 'ar':
            raise SystemExit('--infill needs a diffusion model (mdlm, duo, esolm): AR writes left to right, use --prompt')
        ids, given = parse_infill(args.infill, tok)
        ids, given = prompt + ids, [True] * len(prompt) + given   # the prompt, then the text with gaps
        args.length = args.length or len(ids)
        if len(ids) > args.length:
            raise SystemExit(f'--infill makes {len(ids)} tokens (with the start token), more than --length {args.length}')
        pad = args.length - len(ids)   # free positions after the text
        fixed = torch.tensor(ids + [0] * pad).expand(n, -1), torch.tensor(given + [False] * pad).expand(n, -1)
    args.length = args.length or args.block_size
    steps_list = parse_steps(args.steps, min(args.length, args.block_size))  # diffusion steps per window
    if len(prompt) >= args.length:
        raise SystemExit(f'the prompt has {len(prompt)} tokens, not fewer than --length {args.length}')
    prompt = torch.tensor(prompt, device=args.device).expand(n, -1)
    model, ckpt = load_model(args.ckpt, args.device)
    algo = load_algo(ckpt['algo'])
    judge = load_judge(args.judge, args.device) if args.judge else None  # fail before sampling
    autocast = contextlib.nullcontext() if args.dtype == 'float32' else \
        torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    records = []
    for steps in steps_list:
        args.steps = steps
        torch.manual_seed(args.seed)
        trace = tracer(tok, args.trace_every if args.trace else 0) if args.trace or args.trace_html else None
        t0 = time.perf_counter()
        with autocast:
            try:
                tokens, nfe = algo.sample(model, args, n, args.length, prompt, args.device, fixed=fixed, callback=trace)
            except ValueError as e:  # a sampler refusing its options: one line, no traceback
                raise SystemExit(str(e)) from None
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if args.trace_html:
            write_trace_html(args.trace_html, trace.frames, tok, f'{ckpt["algo"]} {args.ckpt}, {steps} steps')
        for i, row in enumerate(tokens.tolist()[:args.show]):
            print(f'--- sample {i} ---\n' + tok.decode([t for t in row if t < tok.vocab_size]))
        n_new = args.num_samples * (args.length - prompt.shape[1])
        rec = dict(algo=ckpt['algo'], ckpt=args.ckpt, steps=steps, num_samples=args.num_samples,
                   length=args.length, prompt_tokens=prompt.shape[1], nfe=nfe, seconds=seconds,
                   tokens_per_s=n_new / seconds, top_p=args.top_p, seed=args.seed)
        line = (f'--- {ckpt["algo"]}: {args.num_samples} x {args.length} tokens, steps {steps}, NFE {nfe}, '
                f'{seconds:.2f} s, {n_new / seconds:.1f} tokens/s')
        if judge is not None:
            gen_ppl, entropy, scored = score(judge, tokens, prompt.shape[1], tok)
            rec.update(judge=judge.name, gen_ppl=gen_ppl, entropy_nats=entropy, judge_tokens=scored)
            line += f', gen PPL {gen_ppl:.2f} (judge {judge.name}), entropy {entropy:.3f} nats'
        print(line)
        if args.json:
            print(json.dumps(rec))
        records.append(rec)
    if len(records) > 1:  # the quality-vs-steps table
        cols = ['steps', 'nfe', 'seconds'] + (['gen_ppl', 'entropy_nats'] if judge is not None else [])
        print('\n| ' + ' | '.join(cols) + ' |\n|' + '---|' * len(cols))
        for r in records:
            print('| ' + ' | '.join(f'{r[c]:.3g}' if isinstance(r[c], float) else str(r[c]) for c in cols) + ' |')
    return tokens, nfe


if __name__ == '__main__':
    main(sys.argv[1:])
