"""Downstream tasks through lm-evaluation-harness (the optional lm_eval package, imported only
here) for a checkpoint of any method; eval.py --tasks hands its flags to run() (README,
"Downstream tasks").

    python eval.py --ckpt out/duo-6M/ckpt.pt --tasks hellaswag,arc_easy --mc-samples 32
    python eval.py --ckpt out/ar-6M/ckpt.pt --tasks gsm8k --length 256 --limit 100
    python eval.py --ckpt out/mdlm-6M/ckpt.pt --tasks my_task --task-dir my_tasks/

The adapter DLLM (registered with lm_eval as 'dllm') answers the harness's three requests with
each method's own machinery:
- loglikelihood(context, continuation): AR the exact log p(continuation | context), MATH (1);
  MDLM, Duo and Eso-LM minus an unbiased Monte Carlo estimate of the NELBO of the continuation
  given the context as clean tokens, MATH (39)-(41): the mean of --mc-samples draws, whose
  standard error is logged. is_greedy: every continuation token is the argmax of the model's
  prediction with the whole continuation hidden (AR: given the true tokens before it);
- loglikelihood_rolling(text): the same over lm_eval's rolling windows of the context length,
  each window conditioned on the tokens before it in the window;
- generate_until(context, until): the method's sampler continues the context (a clean prefix) by
  --length tokens in --steps steps, cut at the first stop string or end-of-text token. The task's
  do_sample and temperature are not used: eval.py's sampler flags (--top-p ...) are.
Every text starts with the end-of-text token, as sample.py's samples do; one request at a time.
"""
import argparse
import contextlib
import functools
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import (get_rolling_token_windows, handle_non_serializable,
                               make_disjoint_window, make_table, simple_parse_args_string)
except ImportError:
    raise SystemExit('eval.py --tasks needs lm-evaluation-harness: pip install lm-eval') from None

import data
import duo
import esolm
import fused
import mdlm
from checkpoint import atomic, load_model
from config import load_algo
from model import cross_entropy


# ---- the continuation's NLL (AR) or NELBO (diffusion) given a clean context ------------------
# Each takes x (R, P + C): R copies of the context (P tokens) then the continuation (C tokens),
# the draws' stratified uniforms u (R,), and the args; it returns R estimates (R,) and whether
# every continuation token is the argmax of the model's prediction with the continuation hidden
# (one more row in the same call). The output layer runs CHUNK rows at a time (fused.Rows), so
# R draws of a long window never hold all their logits at once.

def after(x, P):
    """True at the positions >= P of x (R, n)."""
    return (torch.arange(x.shape[1], device=x.device) >= P).expand_as(x)


def nll_hit(logits, targets, K):
    """Per row: -log x_theta[target] and whether the target is the argmax, (n, 2)."""
    hit = logits[:, :K].argmax(-1) == targets
    return torch.stack([cross_entropy(logits, targets, K).double(), hit.double()], -1)


def nelbo_hit(logits, x, z, a, da, K):
    """Per row: Duo's NELBO integrand, MATH (16), and whether x is the argmax, (n, 2)."""
    hit = logits[:, :K].argmax(-1) == x
    return torch.stack([duo.nelbo_integrand(logits, x, z, a, da, K).double(), hit.double()], -1)


def rows(fn, K, *per_row):
    return fused.Rows(functools.partial(fn, K=K), *per_row)


def ar_nll(model, x, P, u, args):
    """-log p(x_P.. | x_<P) = sum_{l >= P} -log p(x_l | x_<l), exact, MATH (1)."""
    R = x.shape[0]
    inputs = x[:, :-1]
    targets = x[:, P:].flatten()
    out = model(inputs, causal=True, select=after(inputs, P - 1),     # predicts x_P ...
                head=rows(nll_hit, args.vocab_size, targets))
    return out[:, 0].view(R, -1).sum(1), bool(out[:, 1].all())


def mdlm_nll(model, x, P, u, args):
    """MATH (39): (C/k) sum_{l in S} -log x_theta(x_l | x outside S), S a uniform k-subset of the
    continuation, k ~ U{1..C}; the context is never masked. The extra row masks all of it."""
    K = args.vocab_size
    R = x.shape[0]
    C = x.shape[1] - P
    part, k = mdlm.masked_subset(x[:, P:], u)
    part = torch.cat([part, torch.ones_like(part[:1])])                # + the all-hidden row
    k = torch.cat([k, k.new_full((1,), C)])
    x = torch.cat([x, x[:1]])
    masked = F.pad(part, (P, 0))
    z = torch.where(masked, mdlm.mask_id(K), x)
    sigma = None
    if args.time_cond:  # t given k, MATH (11) with C in place of L
        t = torch.distributions.Beta(k.double(), (C - k + 1).double()).sample()
        sigma = mdlm.sigma_of(1 - t.clamp(max=1 - 1e-12))
    out = model(z, sigma=sigma, select=masked, head=rows(nll_hit, K, x[masked]))
    nll = esolm.per_sequence(out[:, 0], masked)
    return (C / k * nll)[:R], bool(out[-C:, 1].all())               # the last row's C tokens


def duo_nll(model, x, P, u, args):
    """MATH (40): 2v sum_{l >= P} f_l(z_t, t) + C KL_prior, t = v^2, only the continuation
    redrawn (MATH (21) restricted to it). The extra row is at t = 1 (alpha_1 = eps)."""
    K = args.vocab_size
    R = x.shape[0]
    C = x.shape[1] - P
    v = torch.cat([(1 - u.double()).clamp(min=1e-6), u.new_ones(1, dtype=torch.float64)])
    x = torch.cat([x, x[:1]])
    alpha_t, dalpha_t = mdlm.schedule(v ** 2)
    cont = after(x, P)
    z = torch.where(cont, duo.corrupt(x, alpha_t, K), x)               # the context stays clean
    a = alpha_t[:, None].expand_as(x)[cont]
    da = dalpha_t[:, None].expand_as(x)[cont]
    out = model(z, sigma=mdlm.sigma_of(alpha_t), select=cont,
                head=rows(nelbo_hit, K, x[cont], z[cont], a, da))       # (R + 1) C rows
    est = 2 * v * out[:, 0].view(R + 1, C).sum(1) + C * duo.prior_kl(K)
    return est[:R], bool(out[-C:, 1].all())


def context_first(x, masked, P, masked_left_to_right=False):
    """Eso-LM's order, MATH (30), with the context first, as its sampler puts a prompt: context
    (random order), clean continuation (random), masked continuation (random, or left to
    right)."""
    key = torch.rand(x.shape, device=x.device)
    if masked_left_to_right:
        key = torch.where(masked, torch.arange(x.shape[1], device=x.device) / x.shape[1], key)
    return (masked.long() * 2 + after(x, P).long() + key).argsort(1)


def esolm_nll(model, x, P, u, args):
    """MATH (41): Eso-LM's diffusion + sequential estimate, MATH (33), over the continuation's
    C tokens, the context clean and first in every order. The extra row hides the whole
    continuation in the diffusion term (or, with alpha_0 = 0, in the sequential one)."""
    K = args.vocab_size
    R = x.shape[0]
    C = x.shape[1] - P
    x = torch.cat([x, x[:1]])
    nll = 0
    greedy = None
    if args.alpha0 > 0:  # the diffusion term
        part, k = mdlm.masked_subset(x[:R, P:], u, args.alpha0)
        masked = F.pad(torch.cat([part, torch.ones_like(part[:1])]), (P, 0))
        order = context_first(x, masked, P)
        x_s = x.gather(1, order)
        m_s = masked.gather(1, order)
        z_s = torch.where(m_s, mdlm.mask_id(K), x_s)
        out = model(z_s, causal=True, positions=order, select=m_s,
                    head=rows(nll_hit, K, x_s[m_s]))
        nll = nll + args.alpha0 * C / k * esolm.per_sequence(out[:, 0], m_s)[:R]
        greedy = bool(out[-C:, 1].all())        # sorted: the last row's masked tokens last
    if args.alpha0 < 1:  # the sequential term: z_0 masks each continuation token w.p. 1 - a0
        keep = torch.rand(x[:R, P:].shape, device=x.device) < args.alpha0
        masked = F.pad(torch.cat([~keep, torch.ones_like(keep[:1])]), (P, 0))
        order = context_first(x, masked, P, masked_left_to_right=True)
        inputs, targets = esolm.sequential_inputs(x, masked, order, K)
        out = model(**inputs, head=rows(nll_hit, K, targets))
        nll = nll + esolm.per_sequence(out[:, 0], masked)[:R]
        if greedy is None:
            greedy = bool(out[-C:, 1].all())
    return nll, greedy


ESTIMATORS = {'ar': ar_nll, 'mdlm': mdlm_nll, 'duo': duo_nll, 'esolm': esolm_nll}


# ---- the adapter -----------------------------------------------------------------------------

@register_model('dllm')
class DLLM(LM):
    """A checkpoint of ours, any method, as an lm_eval model. From Python, once this module is
    imported: lm_eval.simple_evaluate(model='dllm', model_args='ckpt=PATH,mc_samples=16', ...)
    (model_args: eval.py's flags)."""

    def __init__(self, args):
        super().__init__()
        model, ckpt = load_model(args.ckpt, args.device)
        self.model = model
        self.name = ckpt['algo']
        self.algo = load_algo(ckpt['algo'])
        self.args = argparse.Namespace(**{
            **vars(args), 'vocab_size': ckpt['meta']['vocab_size'],
            'block_size': args.block_size or ckpt['args']['block_size']})
        try:
            self.algo.check_args(self.args, training=False)
        except ValueError as e:
            raise SystemExit(f'--algo {self.name}: {e}') from None
        self.tok = data.get_tokenizer(ckpt['meta']['tokenizer'])
        self.nll = ESTIMATORS[ckpt['algo']]
        self.draws = 1 if self.algo.EXACT else args.mc_samples
        self.window = self.args.block_size          # tokens of context + continuation at most
        self._device = torch.device(args.device)
        self.autocast = contextlib.nullcontext()
        if args.dtype != 'float32':
            self.autocast = torch.autocast(self._device.type, dtype=getattr(torch, args.dtype))
        self.errors = []                             # standard error of each estimate
        torch.manual_seed(args.seed)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        options = simple_parse_args_string(arg_string)
        return cls.create_from_arg_obj(options, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        import eval as evaluation
        options = {**arg_dict, 'device': (additional_config or {}).get('device')}
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if v is not None]
        return cls(evaluation.parse(argv + ['--tasks', 'lm_eval'])[0])

    def score(self, context, continuation):
        """(log p or -NELBO estimate, is_greedy) of token lists continuation given context, at
        most self.window tokens in all (the context cut from the left first)."""
        if not continuation:
            return 0.0, True
        continuation = continuation[-(self.window - 1):]
        context = context[-(self.window - len(continuation)):]
        R = self.draws
        x = torch.tensor(context + continuation, device=self.device).expand(R, -1)
        u = ((torch.rand(1) + torch.arange(R)) / R).to(self.device)   # stratified, MATH (4)
        with self.autocast, torch.no_grad():
            est, greedy = self.nll(self.model, x, len(context), u, self.args)
        est = est.double()
        if R > 1:
            self.errors.append(est.std().item() / math.sqrt(R))
        return -est.mean().item(), greedy

    def encode_pair(self, context, continuation):
        """Token lists; the context's trailing spaces go to the continuation, and the
        continuation is what encoding both together adds to the context (as lm_eval's HF
        models do)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        ctx = self.tok.encode(context)
        return [self.tok.eot] + ctx, self.tok.encode(context + continuation)[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for req in tqdm(requests, desc=f'{self.name} loglikelihood', disable=disable_tqdm):
            result = self.score(*self.encode_pair(*req.args))
            self.cache_hook.add_partial('loglikelihood', req.args, result)
            out.append(result)
        self.report()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        out = []
        for req in tqdm(requests, desc=f'{self.name} loglikelihood_rolling', disable=disable_tqdm):
            windows = get_rolling_token_windows(self.tok.encode(req.args[0]), self.tok.eot,
                                                self.window - 1, 1)
            total = sum(self.score(*make_disjoint_window(w))[0] for w in windows)
            self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
            out.append(total)
        self.report()
        return out

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for req in tqdm(requests, desc=f'{self.name} generate_until', disable=disable_tqdm):
            context, kwargs = req.args
            until = kwargs.get('until') or []
            new = self.args.length or kwargs.get('max_gen_toks', 256)
            prompt = ([self.tok.eot] + self.tok.encode(context))[-max(self.window - new, 1):]
            run = argparse.Namespace(**{**vars(self.args), 'steps': self.args.steps or new})
            with self.autocast, torch.no_grad():
                tokens, _ = self.algo.sample(self.model, run, 1, len(prompt) + new,
                                             torch.tensor([prompt], device=self.device),
                                             self.device)
            text = self.cut(tokens[0, len(prompt):].tolist(), until)
            self.cache_hook.add_partial('generate_until', req.args, text)
            out.append(text)
        return out

    def cut(self, ids, until):
        """The text of ids up to the first end-of-text token, cut at the first stop string."""
        if self.tok.eot in ids:
            ids = ids[:ids.index(self.tok.eot)]
        text = self.tok.decode(ids)
        for stop in [until] if isinstance(until, str) else until:
            text = text.split(stop)[0] if stop else text
        return text

    def summary(self):
        """The Monte Carlo estimates' standard errors (nats) so far."""
        if not self.errors:
            return {'mc_samples': self.draws}
        return {'mc_samples': self.draws, 'estimates': len(self.errors),
                'standard_error_mean': sum(self.errors) / len(self.errors),
                'standard_error_max': max(self.errors)}

    def report(self):
        s = self.summary()
        if 'estimates' in s:
            print(f"{self.name}: {s['estimates']} Monte Carlo estimates so far, {self.draws} "
                  f"draws each; standard error mean {s['standard_error_mean']:.4f}, max "
                  f"{s['standard_error_max']:.4f} nats")


# ---- eval.py --tasks -------------------------------------------------------------------------

def task_manager(tasks, task_dir):
    """lm_eval's task index: --task-dir alone when it holds every task (scanning lm_eval's own
    ~15,000 configs takes seconds), else both; an unknown task is refused in one line."""
    if task_dir and not os.path.isdir(task_dir):
        raise SystemExit(f'--task-dir {task_dir}: no such folder')
    if task_dir:
        manager = TaskManager(include_path=task_dir, include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=task_dir)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}: see `lm_eval ls tasks`, or "
                         f"pass a --task-dir holding their YAML configs")
    return manager


def run(args):
    """Evaluate args.ckpt on args.tasks; write the harness's results JSON atomically to args.out
    (default: beside the checkpoint), print its table; returns the results."""
    tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
    manager = task_manager(tasks, args.task_dir)
    lm = DLLM(args)
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
        limit=args.limit, log_samples=False, random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    results['dllm'] = {'ckpt': args.ckpt, 'algo': lm.name, 'steps': args.steps,
                       'length': args.length, **lm.summary()}
    out = args.out
    if out is None:
        folder = os.path.dirname(args.ckpt)
        out = os.path.join(folder if os.path.isdir(folder) else '.',
                           f"lm_eval-{'-'.join(tasks)}.json")
    with atomic(out) as tmp, open(tmp, 'w') as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    print(make_table(results))
    if results.get('groups'):
        print(make_table(results, 'groups'))
    print(f'wrote {out}')
    return results
