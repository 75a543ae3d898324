"""Complete args for calling a method directly, as train.py and sample.py would pass them."""
import argparse

import config
import duo


def make_args(**kw):
    """Every flag's default (train.py's, each method's, the samplers'), Duo's Gaussian range
    resolved as train.py resolves it, and kw on top."""
    parser = config.get_parser()
    config.add_sampling_args(parser)
    args = parser.parse_args([])
    args.steps = None
    args.vocab_size = None
    for k, v in {**vars(args), **kw}.items():
        setattr(args, k, v)
    for k, v in duo.defaults(args, gpu=False).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return argparse.Namespace(**vars(args))
