"""Validation likelihood of any checkpoint with a confidence interval, and the judge that scores
samples (README, "Likelihood" and "Sample quality").

    python eval.py --ckpt out/mdlm-6M/ckpt.pt                       # the held-out split of its data
    python eval.py --ckpt out/mdlm-6M/ckpt.pt --dataset ~/texts/    # zero-shot: another dataset
    python eval.py --ckpt out/esolm-6M/ckpt.pt --max-batches 200 --repeats 4 --json
    python eval.py --ckpt out/duo-6M/ckpt.pt --tasks hellaswag,arc_easy   # pip install lm-eval

Consecutive windows of the split (up to --max-batches batches, spread over it) are scored with
the method's eval_nll: AR's exact NLL, or for MDLM, Duo and Eso-LM a Monte Carlo draw of the
NELBO, an upper bound (printed "PPL <="); the 95% interval is mean +- 1.96 SE over batches (too
narrow under ~30). sample.py --judge scores samples with load_judge and score below. --tasks runs
downstream tasks through lm-evaluation-harness instead: harness.py.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import data
from checkpoint import load_checkpoint, load_model
from config import ON_GPU, add_method_args, add_sampling_args, load_algo, parse_with_checkpoint


def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True,
                   help='a ckpt.pt of train.py, or a released model: hf:NAME, a folder with '
                        'config.json and model.safetensors, a Lightning .ckpt (convert.py)')
    p.add_argument('--dataset', help="any dataset data.py prepares (default: the checkpoint's)")
    p.add_argument('--split', default='val', choices=['val', 'train'])
    p.add_argument('--block-size', type=int,
                   help="window length (default: the checkpoint's context)")
    p.add_argument('--batch-size', type=int,
                   help="windows per batch (default: the checkpoint's micro-batch)")
    p.add_argument('--max-batches', type=int, default=100,
                   help='at most this many, spread over the split')
    p.add_argument('--repeats', type=int, default=1,
                   help='Monte Carlo draws per window (diffusion methods)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print the result as one JSON line')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default='bfloat16' if ON_GPU else 'float32',
                   choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--fused', action=argparse.BooleanOptionalAction, default=True,
                   help='the output layer CHUNK rows at a time (fused.py; default: on)')
    g = p.add_argument_group('downstream tasks (lm-evaluation-harness: pip install lm-eval; '
                             'harness.py)')
    g.add_argument('--tasks', help='comma-separated lm_eval task names: gsm8k,hellaswag,...')
    g.add_argument('--task-dir', help="a folder of task YAMLs (lm_eval's include path)")
    g.add_argument('--mc-samples', type=int, default=32,
                   help='Monte Carlo draws per loglikelihood (diffusion methods; default: 32)')
    g.add_argument('--steps', type=int, help='generation: sampling steps (default: --length)')
    g.add_argument('--length', type=int,
                   help="generation: new tokens (default: the task's max_gen_toks, or 256)")
    g.add_argument('--num-fewshot', type=int, help="default: the task's")
    g.add_argument('--limit', type=int, help='at most this many documents per task')
    g.add_argument('--out', help='results JSON (default: beside the checkpoint, '
                                 'lm_eval-<tasks>.json)')
    add_sampling_args(g)
    return p, add_method_args(p)


def windows(tokens, block_size, batch_size, max_batches):
    """Batches (B, block_size) of consecutive non-overlapping windows of a token stream, at most
    max_batches of them spread evenly over it (a partial last batch is dropped)."""
    n_windows = (len(tokens) // block_size) // batch_size * batch_size
    if n_windows == 0:
        raise SystemExit(f'the split has {len(tokens)} tokens, fewer than one batch of '
                         f'{batch_size} x {block_size}: lower --batch-size or --block-size')
    n_batches = min(max_batches, n_windows // batch_size)
    picked = np.linspace(0, n_windows - 1, n_batches * batch_size).round().astype(np.int64)
    x = np.stack([tokens[s:s + block_size] for s in picked * block_size]).astype(np.int64)
    return torch.from_numpy(x).view(n_batches, batch_size, block_size)


@torch.no_grad()
def evaluate(model, algo, args, batches, repeats=1, seed=0, autocast=contextlib.nullcontext()):
    """Per-batch NLL (NELBO) per token, averaged over `repeats` Monte Carlo draws."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = []
    for x in batches:
        x = x.to(args.device)
        B = x.shape[0]
        total = 0.0
        for _ in range(repeats):
            u = ((torch.rand(1, generator=g) + torch.arange(B)) / B).to(args.device)  # MATH (4)
            with autocast:
                nll, tokens = algo.eval_nll(model, x, u, args)
            total += nll.double().sum().item() / (B * tokens)
        out.append(total / repeats)
    return out


def summarize(per_batch):
    """Mean, standard error and 95% confidence interval of per-batch values."""
    v = np.asarray(per_batch, dtype=np.float64)
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float('nan')
    return mean, se, (mean - 1.96 * se, mean + 1.96 * se)


# ---- sample quality: a judge's perplexity and the samples' entropy ---------------------------

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
            raise SystemExit(f"--judge {spec} is a {ckpt['algo']} checkpoint: the judge must be "
                             f"an AR model (an ar checkpoint or a Hugging Face causal LM name)")

        def logits(ids):
            return model(ids, causal=True)
        tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
        return Judge(spec, tok, logits, ckpt['args']['block_size'])
    try:
        import transformers  # optional: only this path needs it
    except ImportError:
        raise SystemExit(f'--judge {spec}: a Hugging Face judge needs the optional transformers '
                         f'package (pip install transformers) and a network connection to '
                         f'download its weights once; or pass an AR checkpoint of ours') from None
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(spec)
        hf = transformers.AutoModelForCausalLM.from_pretrained(spec).to(device).eval()
    except Exception as e:
        raise SystemExit(f'--judge {spec}: cannot load it from the Hugging Face hub '
                         f'({type(e).__name__}): check the name and the network connection, or '
                         f'pass an AR checkpoint') from None

    def encode(text):
        return hf_tok.encode(text, add_special_tokens=False)

    def hf_logits(ids):
        return hf(ids).logits
    tok = data.Tokenizer(spec, encode, hf_tok.decode, len(hf_tok), hf_tok.eos_token_id)
    config = hf.config  # GPT-2 names it n_positions
    context = getattr(config, 'max_position_embeddings', None) or getattr(config, 'n_positions',
                                                                          1024)
    return Judge(spec, tok, hf_logits, context)


def retokenize(ids, src, dst):
    """Token ids of tokenizer src -> ids of tokenizer dst, through text; end-of-text ids map to
    dst's."""
    out = []
    for eot, group in itertools.groupby(ids, key=lambda i: i == src.eot):
        group = list(group)
        out += [dst.eot] * len(group) if eot else dst.encode(src.decode(group))
    return out


@torch.no_grad()
def judge_nll(judge, ids, start):
    """Sum of -log p_judge(ids[:, j] | ids[:, :j]) over rows and j >= start (>= 1), and the
    number of tokens summed. ids (n, m). Windows of judge.context tokens, each starting at the
    previous one's last."""
    if start < 1:
        raise ValueError('the judge needs at least one token of context: start >= 1')
    total = 0.0
    count = 0
    s = start - 1
    while s < ids.shape[1] - 1:
        window = ids[:, s:s + judge.context]
        logits = judge.logits(window[:, :-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        total += F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(),
                                 reduction='sum').item()
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
    if judge.tokenizer.name == tok.name:  # the same ids: score directly
        nll, n = judge_nll(judge, tokens, prompt_len)
        return math.exp(nll / max(n, 1)), entropy, n
    nll = 0.0
    n = 0
    for row in tokens.tolist():
        head = retokenize(row[:prompt_len], tok, judge.tokenizer) or [judge.tokenizer.eot]
        tail = retokenize(row[prompt_len:], tok, judge.tokenizer)
        ids = torch.tensor([head + tail], device=tokens.device)
        row_nll, row_n = judge_nll(judge, ids, len(head))
        nll += row_nll
        n += row_n
    return math.exp(nll / max(n, 1)), entropy, n


# ---- main ------------------------------------------------------------------------------------

def check_args(args):  # bad values get one line before the checkpoint loads
    least = dict(block_size=2, batch_size=1, max_batches=1, repeats=1, mc_samples=1, steps=1,
                 length=1, num_fewshot=0, limit=1)
    for k, lo in least.items():
        if getattr(args, k) is not None and getattr(args, k) < lo:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(args, k)}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f'--top-p must be in (0, 1], got {args.top_p}')
    if args.device.startswith('cuda') and not ON_GPU:
        raise SystemExit(f'--device {args.device}: no CUDA device here: use --device cpu')


def parse(argv=None):
    """(args, checkpoint): the method's options from the checkpoint, flags given override."""
    parser, method_flags = get_parser()
    check_args(parser.parse_known_args(argv)[0])
    return parse_with_checkpoint(parser, method_flags, argv, load_checkpoint)


def main(argv=None):
    parser, _ = get_parser()
    if parser.parse_known_args(argv)[0].tasks:
        import harness  # lm_eval is imported there only: one line without it
        return harness.run(parse(argv)[0])
    args, ckpt = parse(argv)
    algo = load_algo(ckpt['algo'])
    model, _ = load_model(args.ckpt, args.device)
    tokenizer = ckpt['meta']['tokenizer']
    dataset = args.dataset or ckpt['args']['dataset']
    data_dir = data.prepare(dataset, tokenizer)  # the checkpoint's tokenizer; a no-op once done
    args = argparse.Namespace(**{**vars(args), 'dataset': dataset,
                                 'vocab_size': ckpt['meta']['vocab_size'],
                                 'block_size': args.block_size or ckpt['args']['block_size'],
                                 'batch_size': args.batch_size or ckpt['args']['micro_batch_size']})
    dtype = data.load_meta(data_dir)['dtype']
    tokens = np.memmap(os.path.join(data_dir, f'{args.split}.bin'), dtype=dtype, mode='r')
    batches = windows(tokens, args.block_size, args.batch_size, args.max_batches)
    autocast = contextlib.nullcontext()
    if args.dtype != 'float32':
        autocast = torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    try:
        per_batch = evaluate(model, algo, args, batches, args.repeats, args.seed, autocast)
    except ValueError as e:  # a method refusing its options: one line
        raise SystemExit(f'--algo {ckpt["algo"]}: {e}') from None
    mean, se, (lo, hi) = summarize(per_batch)
    n = len(per_batch)
    what, bound = ('NLL', '') if algo.EXACT else ('NELBO', '<= ')
    result = dict(algo=ckpt['algo'], ckpt=args.ckpt, dataset=dataset, split=args.split,
                  exact=algo.EXACT, nll=mean, se=se, ci95=[lo, hi], ppl=math.exp(mean),
                  ppl_ci95=[math.exp(lo), math.exp(hi)], bits_per_token=mean / math.log(2),
                  batches=n, windows=n * args.batch_size, block_size=args.block_size,
                  repeats=args.repeats, tokenizer=tokenizer)
    print(f'{ckpt["algo"]} on {dataset} ({args.split}, {result["windows"]} windows x '
          f'{args.block_size} tokens, {n} batches, {args.repeats} draw(s) each): {what} '
          f'{mean:.4f} +- {1.96 * se:.4f} nats/token (95% CI), PPL {bound}{math.exp(mean):.3f} '
          f'[{math.exp(lo):.3f}, {math.exp(hi):.3f}]'
          + (' (under 30 batches: the normal interval is too narrow)' if n < 30 else ''))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
