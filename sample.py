"""Sample from a checkpoint of any method (the checkpoint names its algorithm), and score the samples.

    python sample.py --ckpt out/mdlm-6M/ckpt.pt --num-samples 4 --length 256 --steps 256
    python sample.py --ckpt out/ar-6M/ckpt.pt --prompt "ROMEO:" --top-p 0.9
    python sample.py --ckpt out/mdlm-6M/ckpt.pt --steps 8,64,256 --judge out/ar-6M/ckpt.pt --json
    python sample.py --ckpt out/duo-6M/ckpt.pt --judge gpt2-large   # needs transformers (and a network once)

Every sample starts with the end-of-text id (the start of a document), then
the prompt; --length counts both. Prints the decoded samples, the number of
network calls (NFE), seconds and tokens/s. --steps takes a list: one run per
value, each from the same seed (the quality-vs-steps table in one call).

--judge scores the samples as the papers do (GUIDE §9):
  generative perplexity = exp(mean over all generated tokens of
      -log p_judge(token | everything before it)), the start token and the
      prompt excluded from the mean (but seen as context);
  entropy = the unigram entropy of each sample's generated tokens, in nats,
      averaged over samples. Report it beside Gen PPL: repetitive text (low
      entropy) has a deceptively low Gen PPL.
The judge is an AR checkpoint of ours, which scores our token ids directly
when it has the same tokenizer, or a Hugging Face causal LM name (gpt2-large,
...). Otherwise the samples are decoded to text and re-tokenised for the
judge (end-of-text ids map to the judge's end-of-text). Samples longer than
the judge's context are scored in consecutive windows of that length, each
conditioned on the last token of the previous window.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import data
from model import Config, DiT
from train import ALGOS, ON_GPU, load_algo, load_checkpoint


def add_method_args(parser):
    """Every method's own flags, in groups; returns their names (dest)."""
    flags = set()
    for name in ALGOS:
        with contextlib.suppress(SystemExit):
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
    p.add_argument('--steps', default=None,
                   help='denoising steps T of diffusion samplers, or a list: 8,64,1024 (default: length, at most the context)')
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling (1.0 = off)')
    p.add_argument('--temperature', type=float, default=1.0, help='AR only')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cache', action=argparse.BooleanOptionalAction, default=True,
                   help="use the method's cache (KV cache, or MDLM's skip-unchanged)")
    p.add_argument('--float64', action=argparse.BooleanOptionalAction, default=True,
                   help='sampling probabilities in float64 (default: on)')
    p.add_argument('--judge', default=None, help='score the samples: an AR checkpoint or a Hugging Face causal LM name')
    p.add_argument('--json', action='store_true', help='also print one JSON line per run')
    p.add_argument('--show', type=int, default=None, help='print this many samples per run (default: all)')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    return p, add_method_args(p)


def load_model(path, device):
    """The network and training args of a checkpoint (EMA weights when present)."""
    ckpt = load_checkpoint(path)
    model = DiT(Config(**ckpt['config']))
    model.load_state_dict(ckpt['ema'] if ckpt.get('ema') else ckpt['model'])
    return model.to(device).eval(), ckpt


def parse_with_checkpoint(parser, method_flags, argv):
    """Parse argv; the method's training options (e.g. --time-cond) come from the
    checkpoint and flags given here override them (argparse only fills the
    defaults that are missing). Returns (args, checkpoint)."""
    ckpt = load_checkpoint(parser.parse_known_args(argv)[0].ckpt)
    known = argparse.Namespace(**{k: v for k, v in ckpt['args'].items() if k in method_flags})
    return parser.parse_args(argv, namespace=known), ckpt


# ----------------------------------------------------------------------------
# sample quality: a judge's perplexity and the samples' entropy

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
    """Token ids of tokenizer src -> ids of tokenizer dst, through text;
    each end-of-text id becomes dst's end-of-text id."""
    out, piece = [], []
    for i in ids + [None]:
        if i is None or i == src.eot:
            if piece:
                out += dst.encode(src.decode(piece))
                piece = []
            if i is not None:
                out.append(dst.eot)
        else:
            piece.append(i)
    return out


@torch.no_grad()
def judge_nll(judge, ids, start):
    """Sum of -log p_judge(ids[:, j] | ids[:, :j]) over rows and over j >= start
    (>= 1), and the number of tokens summed. ids (n, m). Windows of
    judge.context tokens, each starting at the last token of the previous."""
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
    """Gen PPL of samples tokens (n, length) whose first prompt_len tokens were
    given, the mean unigram entropy (nats) of their generated tokens, and the
    number of judge tokens scored."""
    entropy = sum(unigram_entropy(row) for row in tokens[:, prompt_len:].cpu()) / len(tokens)
    if judge.tokenizer.name == tok.name:  # same ids: score directly
        nll, n = judge_nll(judge, tokens, prompt_len)
    else:
        nll = n = 0
        device = tokens.device
        for row in tokens.tolist():
            head = retokenize(row[:prompt_len], tok, judge.tokenizer) or [judge.tokenizer.eot]
            tail = retokenize(row[prompt_len:], tok, judge.tokenizer)
            a, b = judge_nll(judge, torch.tensor([head + tail], device=device), len(head))
            nll, n = nll + a, n + b
    return math.exp(nll / max(n, 1)), entropy, n


# ----------------------------------------------------------------------------

def parse_steps(text, default):
    if text is None:
        return [default]
    try:
        steps = [int(s) for s in str(text).split(',') if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise SystemExit(f"--steps '{text}': give a positive integer or a comma-separated list, e.g. 8,64,1024")
    return steps


def main(argv=None):
    parser, method_flags = get_parser()
    args, _ = parse_with_checkpoint(parser, method_flags, argv)
    model, ckpt = load_model(args.ckpt, args.device)
    algo = load_algo(ckpt['algo'])
    args.vocab_size, args.block_size = ckpt['meta']['vocab_size'], ckpt['args']['block_size']
    args.length = args.length or args.block_size
    steps_list = parse_steps(args.steps, min(args.length, args.block_size))  # diffusion steps per window
    tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
    prompt = torch.tensor([tok.eot] + tok.encode(args.prompt), device=args.device)
    if len(prompt) >= args.length:
        raise SystemExit(f'the prompt has {len(prompt)} tokens, not fewer than --length {args.length}')
    prompt = prompt.expand(args.num_samples, -1)
    judge = load_judge(args.judge, args.device) if args.judge else None  # fail before sampling
    autocast = contextlib.nullcontext() if args.dtype == 'float32' else \
        torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    records = []
    for steps in steps_list:
        args.steps = steps
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        with autocast:
            try:
                tokens, nfe = algo.sample(model, args, args.num_samples, args.length, prompt, device=args.device)
            except ValueError as e:  # a sampler refusing its options: one line, no traceback
                raise SystemExit(str(e)) from None
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        for i, row in enumerate(tokens.tolist()[:args.show]):
            print(f'--- sample {i} ---')
            print(tok.decode([t for t in row if t < tok.vocab_size]))
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
