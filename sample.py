"""Sample from a checkpoint of any method (the checkpoint names it), and score the samples.

    python sample.py --ckpt out/mdlm-6M/ckpt.pt --num-samples 4 --length 256 --steps 256
    python sample.py --ckpt out/ar-6M/ckpt.pt --prompt "ROMEO:" --top-p 0.9
    python sample.py --ckpt out/mdlm-6M/ckpt.pt --steps 8,64,256 --judge out/ar-6M/ckpt.pt --json
    python sample.py --ckpt out/duo-6M/ckpt.pt --judge gpt2-large   # needs transformers

Every sample starts with the end-of-text id, then the prompt; --length counts both. Prints the
samples, the number of network calls (NFE), seconds and tokens/s; a list of --steps: one run per
value, the same seed. --judge: generative perplexity and unigram entropy (eval.py's judge;
README "Sample quality"); --infill, --trace, --trace-html: README "Sampling".
"""
import argparse
import contextlib
import json
import re
import sys
import time

import torch

import data
from checkpoint import atomic, load_checkpoint, model_from
from config import (DTYPE, ON_GPU, add_method_args, add_sampling_args, load_algo,
                    parse_with_checkpoint)
from eval import load_judge, score


def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True,
                   help='a ckpt.pt of train.py, or a released model: hf:NAME, a folder with '
                        'config.json and model.safetensors, a Lightning .ckpt (convert.py)')
    p.add_argument('--num-samples', type=int, default=4)
    p.add_argument('--length', type=int,
                   help='tokens per sample (default: the training context)')
    p.add_argument('--prompt', default='', help='text every sample continues')
    p.add_argument('--infill', help='text with gaps to fill, [N] = N tokens: '
                                    '"ROMEO: [10] my love [5]."')
    p.add_argument('--steps', help='diffusion steps, or a list: 8,64,1024 (default: '
                                   'min(length, context))')
    add_sampling_args(p)
    p.add_argument('--trace', action='store_true', help='redraw the first sample after every step')
    p.add_argument('--trace-every', type=int, default=1,
                   help='--trace: redraw after every k-th step only')
    p.add_argument('--trace-html', help="write the first sample's trajectory to this HTML page")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--judge', help='score the samples: an AR checkpoint or a Hugging Face '
                                   'causal LM name')
    p.add_argument('--json', action='store_true', help='also print one JSON line per run')
    p.add_argument('--show', type=int, help='print this many samples per run (default: all)')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default=DTYPE, choices=['bfloat16', 'float16', 'float32'])
    return p, add_method_args(p)


def parse_steps(text, default):
    if text is None:
        return [default]
    steps = [s.strip() for s in str(text).split(',') if s.strip()]
    if not steps or not all(s.isdigit() and int(s) >= 1 for s in steps):
        raise SystemExit(f"--steps '{text}': give a positive integer or a comma-separated list, "
                         f"e.g. 8,64,1024")
    return [int(s) for s in steps]


def check_args(args):  # out-of-range values: one line each, before any work
    rules = [('--num-samples', args.num_samples >= 1, '>= 1'),
             ('--top-p', 0 < args.top_p <= 1, 'in (0, 1]'),
             ('--length', args.length is None or args.length >= 1, '>= 1 (or omitted)'),
             ('--temperature', args.temperature > 0, '> 0'),
             ('--trace-every', args.trace_every >= 1, '>= 1'),
             ('--stride', args.stride is None or 0 < args.stride < args.block_size,
              f'in [1, {args.block_size - 1}] (the training context is {args.block_size})')]
    for flag, ok, rule in rules:
        if not ok:
            value = getattr(args, flag[2:].replace('-', '_'))
            raise SystemExit(f'{flag} must be {rule}, got {value}')


def parse_infill(text, tok):
    """--infill 'ROMEO: [10] my love [5].' -> token ids and given (True: from the text, False: a
    gap). [N] is a gap of N >= 1 tokens; brackets serve only for gaps."""
    pieces = re.split(r'\[(\d+)\]', text)   # text, gap, text, gap, ..., text
    texts, gaps = pieces[::2], pieces[1::2]
    if not gaps or min(int(g) for g in gaps) < 1 or any(set('[]') & set(t) for t in texts):
        raise SystemExit(f"--infill '{text}': mark each gap as [N], N >= 1 tokens to fill, "
                         f"e.g. 'ROMEO: [10] my love [5].'")
    ids = []
    given = []
    for i, piece in enumerate(pieces):
        new = [0] * int(piece) if i % 2 else tok.encode(piece)
        ids += new
        given += [i % 2 == 0] * len(new)
    return ids, given


# ---- watching it write -----------------------------------------------------------------------

ANSI = dict(m='\x1b[2m', d='\x1b[1;7m', n='\x1b[2m', c='', end='\x1b[0m', home='\x1b[H\x1b[J')


def marks_of(ids, noisy, before, K):
    """One letter per token: m masked (or not drawn yet), n noisy (Duo: unlike argmax x_theta),
    d decided at this step, c clean since before."""
    marks = []
    for i, q, (j, b) in zip(ids, noisy, before):
        if not 0 <= i < K:
            marks.append('m')
        elif q:
            marks.append('n')
        elif i != j or b in 'mn':
            marks.append('d')
        else:
            marks.append('c')
    return ''.join(marks)


def tracer(tok, every, out=None):
    """A sampler callback(z, nfe, noisy) keeping the first sample's trajectory, frames = [(step,
    nfe, ids, marks)] (marks_of). With every > 0 it also redraws every k-th frame: in place with
    colours on a terminal (masked dimmed, decided highlighted), as plain text otherwise."""
    frames = []
    out = out or sys.stdout

    def callback(z, nfe, noisy):
        ids = z[0].tolist()
        before = zip(frames[-1][2], frames[-1][3]) if frames else [(None, 'm')] * len(ids)
        marks = marks_of(ids, noisy[0].tolist(), before, tok.vocab_size)
        frames.append((len(frames), nfe, ids, marks))   # step 0: the start
        if every and (len(frames) - 1) % every == 0:
            style = ANSI if out.isatty() else dict.fromkeys(ANSI, '')
            text = ''.join(style[m] + ('_' if m == 'm' else tok.decode([i])) + style['end']
                           for i, m in zip(ids, marks))
            out.write(style['home'] + f'--- step {len(frames) - 1} | NFE {nfe} ---\n{text}\n')
            out.flush()
    callback.frames = frames
    return callback


PAGE = """<!doctype html><meta charset="utf-8"><title>sample.py --trace-html</title>
<style>body{font:15px monospace;margin:2em} #t{white-space:pre-wrap} .m{color:#bbb}
.d{background:#ffd54f} .n{color:#999}</style>
<input id="s" type="range" min="0" style="width:100%"><p id="h"></p><div id="t"></div>
<script>const D=BLOB, s=document.getElementById('s'), t=document.getElementById('t');
s.max=D.frames.length-1; s.value=s.max;
s.oninput=function(){const [step,nfe,ids,marks]=D.frames[s.value]; t.textContent='';
document.getElementById('h').textContent=D.title+': step '+step+' of '+s.max+' | NFE '+nfe;
ids.forEach((id,k)=>{const e=t.appendChild(document.createElement('span'));
e.className=marks[k]; e.textContent=marks[k]=='m'?'_':D.pieces[id];})};
s.oninput();</script>
"""


def write_trace_html(path, frames, tok, title):
    """The trajectory as one self-contained page (inline CSS and JS): a slider over the steps."""
    pieces = {i: tok.decode([i]) for f in frames for i in set(f[2]) if 0 <= i < tok.vocab_size}
    blob = json.dumps({'title': title, 'pieces': pieces, 'frames': frames})
    with atomic(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(PAGE.replace('BLOB', blob.replace('</', '<\\/')))


# ---- main ------------------------------------------------------------------------------------

def start_and_gaps(args, tok, n):
    """The prompt every sample starts with (end-of-text, then --prompt), the --infill template
    fixed=(tokens, given) or None, and the length."""
    prompt = [tok.eot] + tok.encode(args.prompt)
    length = args.length
    fixed = None
    if args.infill is not None:
        ids, given = parse_infill(args.infill, tok)
        ids = prompt + ids                          # the prompt, then the text with gaps
        given = [True] * len(prompt) + given
        length = length or len(ids)
        if len(ids) > length:
            raise SystemExit(f'--infill makes {len(ids)} tokens (with the start token), more '
                             f'than --length {length}')
        pad = length - len(ids)                     # free positions after the text
        fixed = (torch.tensor(ids + [0] * pad).expand(n, -1),
                 torch.tensor(given + [False] * pad).expand(n, -1))
    length = length or args.block_size
    if len(prompt) >= length:
        raise SystemExit(f'the prompt has {len(prompt)} tokens, not fewer than --length {length}')
    return torch.tensor(prompt, device=args.device).expand(n, -1), fixed, length


def main(argv=None):
    parser, method_flags = get_parser()
    args, ckpt = parse_with_checkpoint(parser, method_flags, argv, load_checkpoint)
    args = argparse.Namespace(**vars(args), vocab_size=ckpt['meta']['vocab_size'],
                              block_size=ckpt['args']['block_size'])
    check_args(args)
    tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
    n = args.num_samples
    prompt, fixed, length = start_and_gaps(args, tok, n)
    steps_list = parse_steps(args.steps, min(length, args.block_size))  # per window
    model = model_from(ckpt, args.device)
    algo = load_algo(ckpt['algo'])
    judge = None
    if args.judge:  # fail before sampling
        judge = load_judge(args.judge, args.device)
    autocast = contextlib.nullcontext()
    if args.dtype != 'float32':
        autocast = torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    records = []
    for steps in steps_list:
        run_args = argparse.Namespace(**{**vars(args), 'steps': steps})
        torch.manual_seed(args.seed)
        trace = None
        if args.trace or args.trace_html:
            trace = tracer(tok, args.trace_every if args.trace else 0)
        t0 = time.perf_counter()
        with autocast:
            try:
                tokens, nfe = algo.sample(model, run_args, n, length, prompt, args.device,
                                          fixed=fixed, callback=trace)
            except ValueError as e:  # a sampler refusing its options: one line
                raise SystemExit(str(e)) from None
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if args.trace_html:
            title = f'{ckpt["algo"]} {args.ckpt}, {steps} steps'
            write_trace_html(args.trace_html, trace.frames, tok, title)
        for i, row in enumerate(tokens.tolist()[:args.show]):
            print(f'--- sample {i} ---\n' + tok.decode([t for t in row if t < tok.vocab_size]))
        n_new = n * (length - prompt.shape[1])
        rec = dict(algo=ckpt['algo'], ckpt=args.ckpt, steps=steps, num_samples=n, length=length,
                   prompt_tokens=prompt.shape[1], nfe=nfe, seconds=seconds,
                   tokens_per_s=n_new / seconds, top_p=args.top_p, seed=args.seed)
        line = (f'--- {ckpt["algo"]}: {n} x {length} tokens, steps {steps}, NFE {nfe}, '
                f'{seconds:.2f} s, {n_new / seconds:.1f} tokens/s')
        if judge is not None:
            gen_ppl, entropy, scored = score(judge, tokens, prompt.shape[1], tok)
            rec.update(judge=judge.name, gen_ppl=gen_ppl, entropy_nats=entropy,
                       judge_tokens=scored)
            line += (f', gen PPL {gen_ppl:.2f} (judge {judge.name}), '
                     f'entropy {entropy:.3f} nats')
        print(line)
        if args.json:
            print(json.dumps(rec))
        records.append(rec)
    if len(records) > 1:  # quality against steps
        cols = ['steps', 'nfe', 'seconds']
        if judge is not None:
            cols += ['gen_ppl', 'entropy_nats']
        print('\n| ' + ' | '.join(cols) + ' |\n|' + '---|' * len(cols))
        for r in records:
            cells = [f'{r[c]:.3g}' if isinstance(r[c], float) else str(r[c]) for c in cols]
            print('| ' + ' | '.join(cells) + ' |')
    return tokens, nfe


if __name__ == '__main__':
    main(sys.argv[1:])
