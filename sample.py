"""Sample from a checkpoint of any method (the checkpoint names its algorithm).

    python sample.py --ckpt out/mdlm-6M/ckpt.pt --num-samples 4 --length 256 --steps 256
    python sample.py --ckpt out/ar-6M/ckpt.pt --prompt "ROMEO:" --top-p 0.9

Every sample starts with the end-of-text id (the start of a document), then
the prompt; --length counts both. Prints the decoded samples, the number of
network calls (NFE), seconds and tokens/s.
"""
import argparse
import contextlib
import sys
import time

import torch

import data
from model import Config, DiT
from train import ALGOS, ON_GPU, load_algo, load_checkpoint


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='a checkpoint written by train.py')
    p.add_argument('--num-samples', type=int, default=4)
    p.add_argument('--length', type=int, default=None, help='tokens per sample (default: the training context)')
    p.add_argument('--prompt', default='', help='text every sample continues')
    p.add_argument('--steps', type=int, default=None, help='denoising steps T of diffusion samplers (default: length, at most the context)')
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling (1.0 = off)')
    p.add_argument('--temperature', type=float, default=1.0, help='AR only')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cache', action=argparse.BooleanOptionalAction, default=True,
                   help="use the method's cache (KV cache, or MDLM's skip-unchanged)")
    p.add_argument('--float64', action=argparse.BooleanOptionalAction, default=True,
                   help='sampling probabilities in float64 (default: on)')
    p.add_argument('--device', default='cuda' if ON_GPU else 'cpu')
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    method_flags = set()
    for name in ALGOS:
        with contextlib.suppress(SystemExit):
            group = p.add_argument_group(f'{name} options')
            load_algo(name).add_args(group)
            method_flags |= {a.dest for a in group._group_actions}
    return p, method_flags


def load_model(path, device):
    """The network and training args of a checkpoint (EMA weights when present)."""
    ckpt = load_checkpoint(path)
    model = DiT(Config(**ckpt['config']))
    model.load_state_dict(ckpt['ema'] if ckpt.get('ema') else ckpt['model'])
    return model.to(device).eval(), ckpt


def main(argv=None):
    parser, method_flags = get_parser()
    ckpt_path = parser.parse_known_args(argv)[0].ckpt
    # the method's training options (e.g. --time-cond) come from the checkpoint;
    # flags given here override them (argparse only fills defaults that are missing)
    ckpt = load_checkpoint(ckpt_path)
    known = argparse.Namespace(**{k: v for k, v in ckpt['args'].items() if k in method_flags})
    args = parser.parse_args(argv, namespace=known)
    model, ckpt = load_model(ckpt_path, args.device)
    algo = load_algo(ckpt['algo'])
    args.vocab_size, args.block_size = ckpt['meta']['vocab_size'], ckpt['args']['block_size']
    args.length = args.length or args.block_size
    args.steps = args.steps or min(args.length, args.block_size)  # diffusion steps per window
    tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
    prompt = torch.tensor([tok.eot] + tok.encode(args.prompt), device=args.device)
    if len(prompt) >= args.length:
        raise SystemExit(f'the prompt has {len(prompt)} tokens, not fewer than --length {args.length}')
    prompt = prompt.expand(args.num_samples, -1)
    torch.manual_seed(args.seed)
    autocast = contextlib.nullcontext() if args.dtype == 'float32' else \
        torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype))
    t0 = time.perf_counter()
    with autocast:
        try:
            tokens, nfe = algo.sample(model, args, args.num_samples, args.length, prompt, device=args.device)
        except ValueError as e:  # a sampler refusing its options: one line, no traceback
            raise SystemExit(str(e)) from None
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    for i, row in enumerate(tokens.tolist()):
        print(f'--- sample {i} ---')
        print(tok.decode([t for t in row if t < tok.vocab_size]))
    n_new = args.num_samples * (args.length - prompt.shape[1])
    print(f'--- {ckpt["algo"]}: {args.num_samples} x {args.length} tokens, NFE {nfe}, '
          f'{seconds:.2f} s, {n_new / seconds:.1f} tokens/s')
    return tokens, nfe


if __name__ == '__main__':
    main(sys.argv[1:])
