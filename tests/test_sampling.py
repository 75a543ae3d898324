"""Sampling as every method shares it: infilling against the exact conditional law of an
enumerable toy, windows beyond the context, the per-step callback, NFE counts, Duo's noise
removal, and sample.py's --infill, --trace, --trace-html and refusals."""
import io
import json
import math
import re
from dataclasses import asdict

import pytest
import torch

import ar
import data
import duo
import esolm
import mdlm
import sample
from model import DiT, get_config
from test_esolm import oracle as esolm_oracle
from test_mdlm import oracle as mdlm_oracle
from test_mdlm import recorder
from toy import toy_distribution, total_variation
from args import make_args

METHODS = {'ar': ar, 'mdlm': mdlm, 'duo': duo, 'esolm': esolm}


def args_for(**kw):
    base = dict(vocab_size=20, steps=4, cache=True, top_p=1.0, float64=True, temperature=1.0,
                greedy_tail=False, alpha0=0.5, block_size=None, stride=None)
    return make_args(**{**base, **kw})


def random_net(module, K, seed=0):
    torch.manual_seed(seed)
    model = DiT(get_config('tiny', module.vocab_size(K))).eval()
    for p in model.parameters():  # leave the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.3)
    return model


# ----------------------------------------------------------------------------
# infilling

@pytest.mark.parametrize('name', ['mdlm', 'esolm'])
@pytest.mark.parametrize('given', [[False, True, False], [True, False, True]])
def test_infilled_samples_follow_the_exact_conditional_law(name, given):
    """With the exact denoiser and fixed tokens v at the given positions, the samples
    follow p(x | x_given = v): total variation at the level of sampling noise."""
    K, L, S = 3, 3, 20000
    seqs, probs = toy_distribution(K, L, seed=6)
    given = torch.tensor(given)
    v = seqs[probs.argmax()]  # the given values: those of the likeliest sequence
    cond = probs * (seqs[:, given] == v[given]).all(1)
    cond = cond / cond.sum()
    net = (mdlm_oracle if name == 'mdlm' else esolm_oracle)(seqs, probs, K)
    args = args_for(vocab_size=K, steps=200, alpha0=0.5)
    torch.manual_seed(0)
    x, _ = METHODS[name].sample(net, args, S, L, fixed=(v.expand(S, L), given.expand(S, L)))
    assert (x[:, given] == v[given]).all()
    # sampling noise over <= 9 cells with 20000 draws: TV ~0.006; ignoring the given tokens: >= 0.2
    assert total_variation(x, seqs, cond) < 0.02
    assert total_variation(x, seqs, probs) > 0.1     # and it is not the unconditional law


def test_duo_keeps_every_given_token_and_ar_every_prompt_token():
    K, n, L = 20, 8, 12
    tokens = torch.randint(0, K, (n, L))
    given = torch.rand(n, L) < 0.4  # rows may differ: Duo clamps position by position
    torch.manual_seed(0)
    x, nfe = duo.sample(random_net(duo, K), args_for(), n, L, fixed=(tokens, given))
    assert torch.equal(x[given], tokens[given]) and nfe == 4 + 1
    assert (x[~given] != tokens[~given]).any()
    prompt = torch.randint(0, K, (n, 3))
    x, nfe = ar.sample(random_net(ar, K), args_for(), n, L, prompt)
    assert torch.equal(x[:, :3], prompt) and nfe == L - 3
    with pytest.raises(ValueError, match='cannot fill gaps'):
        ar.sample(random_net(ar, K), args_for(), n, L, prompt, fixed=(tokens, given))



def test_esolm_infills_rows_with_different_numbers_of_given_tokens():
    """A batch mixing two infilling templates (one and two given tokens): each row keeps its
    tokens and follows its own exact conditional law; the NFE adds the two groups' calls."""
    K, L, S = 3, 3, 20000
    seqs, probs = toy_distribution(K, L, seed=6)
    v = seqs[probs.argmax()]
    templates = torch.tensor([[False, True, False], [True, False, True]])
    given = templates[torch.arange(2 * S) % 2]                 # rows alternate the two templates
    args = args_for(vocab_size=K, steps=200, alpha0=0.5)
    calls = []

    def counted(*a, **kw):
        calls.append(1)
        return esolm_oracle(seqs, probs, K)(*a, **kw)
    torch.manual_seed(0)
    x, nfe = esolm.sample(counted, args, 2 * S, L, fixed=(v.expand(2 * S, L), given))
    assert (x[given] == v.expand(2 * S, L)[given]).all() and nfe == len(calls)
    for i, template in enumerate(templates):
        cond = probs * (seqs[:, template] == v[template]).all(1)
        assert total_variation(x[i::2], seqs, cond / cond.sum()) < 0.02


# ----------------------------------------------------------------------------
# beyond the training context, the callback, NFE

@pytest.mark.parametrize('name', ['ar', 'mdlm', 'duo', 'esolm'])
def test_windows_beyond_the_context_keep_each_prefix(name, monkeypatch):
    module, K, n, context, stride, length = METHODS[name], 20, 2, 16, 6, 40
    windows, calls, reports = [], [], []
    denoise = module.denoise

    def spy(model, args, z, keep, report):
        out = denoise(model, args, z, keep, report)
        windows.append((z.clone(), keep.clone(), out[0].clone(), out[1]))
        return out
    monkeypatch.setattr(module, 'denoise', spy)
    args = args_for(vocab_size=K, block_size=context, stride=stride)
    prompt = torch.randint(0, K, (n, 3))

    def callback(z, nfe, noisy):
        reports.append((z.clone(), nfe, noisy.clone()))

    torch.manual_seed(0)
    x, nfe = module.sample(recorder(random_net(module, K), calls), args, n, length, prompt,
                           callback=callback)
    assert x.shape == (n, length) and torch.equal(x[:, :3], prompt) and x.max() < K
    assert nfe == len(calls) == sum(w[3] for w in windows)   # NFE counts every window's calls
    # windows: [0, 16), then each 10 tokens of the text so far, clean, and 6 new positions
    starts = [0, 16, 22, 28, 34]
    assert [w[0].shape[1] for w in windows] == [16] * 5
    for (z, keep, out, _), start in zip(windows, starts):
        assert torch.equal(out, x[:, max(start - 10, 0):max(start - 10, 0) + 16])
        if start:
            assert torch.equal(z[:, :10], x[:, start - 10:start])
            assert keep[:, :10].all() and not keep[:, 10:].any()
    # the callback sees every step, on the whole sequence, with the NFE so far
    # a report per call here, and one at the start
    assert [r[1] for r in reports] == list(range(nfe + 1))
    assert torch.equal(reports[0][0][:, :3], prompt) and reports[0][2][:, 3:].all()
    assert all(r[0].shape == (n, length) for r in reports)
    assert torch.equal(reports[-1][0], x) and not reports[-1][2].any()
    if name != 'duo':  # masked (or not yet written) positions are flagged
        assert all(torch.equal(noisy, z >= K) for z, _, noisy in reports)


def test_duo_noise_removal_is_one_more_call_at_t_1e5():
    """The seed: T steps from t = 1 to 1e-5, then one call at t = 1e-5 whose output gives
    the tokens: argmax x_theta (--greedy-tail) or a draw from the posterior at alpha = 1."""
    K, L, T = 3, 5, 4
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    calls = []

    def model(z, sigma=None, **kw):
        calls.append(sigma[0].item())
        return p.log().expand(*z.shape, K)
    torch.manual_seed(0)
    x, nfe = duo.sample(model, args_for(vocab_size=K, steps=T, greedy_tail=True), 3000, L)

    def alpha(t):
        return 1 - (1 - duo.EPS) * t

    ts = torch.linspace(1, 1e-5, T + 1, dtype=torch.float64).tolist()
    sigmas = [-math.log(alpha(t)) for t in ts]  # last: t = 1e-5
    assert nfe == T + 1 and calls == pytest.approx(sigmas, rel=1e-6)
    assert (x == 0).all()                            # argmax x_theta everywhere
    calls.clear()
    x, nfe = duo.sample(model, args_for(vocab_size=K, steps=T), 3000, L)
    assert nfe == T + 1
    # ancestral: the last step barely moves (alpha 1 - 1e-5 -> 1), so the tokens follow x_theta
    freq = torch.bincount(x.flatten(), minlength=K).double() / x.numel()
    assert torch.allclose(freq, p, atol=0.02)        # 15000 draws: sd < 0.005


# ----------------------------------------------------------------------------
# sample.py: --infill, --trace, --trace-html, refusals

def test_parse_infill_and_malformed_gaps():
    tok = data.get_tokenizer('byte')
    ids, given = sample.parse_infill('ab [2]c[1]', tok)
    assert ids == list(b'ab ') + [0, 0] + list(b'c') + [0]
    assert given == [True] * 3 + [False] * 2 + [True] + [False]
    for bad in ['ab [x] c', 'ab [3', 'ab 3]', 'a [0] b [2]', 'a [-2]', 'no gap at all', '[[2]]']:
        with pytest.raises(SystemExit) as e:
            sample.parse_infill(bad, tok)
        assert '[N], N >= 1' in str(e.value) and '\n' not in str(e.value), bad


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Random tiny networks in checkpoints as train.py writes them (byte tokenizer, context 32)."""
    tmp, K = tmp_path_factory.mktemp('sampling'), data.get_tokenizer('byte').vocab_size
    for name, module in METHODS.items():
        model = random_net(module, K)
        ckpt = {'model': model.state_dict(), 'config': asdict(model.cfg), 'algo': name, 'step': 0,
                'args': {'block_size': 32}, 'meta': {'tokenizer': 'byte', 'vocab_size': K}}
        torch.save(ckpt, tmp / f'{name}.pt')
    return tmp


def test_infill_cli_keeps_the_text(ckpts, capsys):
    for name in ['mdlm', 'duo', 'esolm']:
        tokens, _ = sample.main(['--ckpt', str(ckpts / f'{name}.pt'),
                                 '--infill', 'ROMEO: [5] my love [3].',
                                 '--num-samples', '2', '--steps', '4', '--dtype', 'float32'])
        text = capsys.readouterr().out
        # start token, text and gaps; --length from the text
        assert tokens.shape == (2, 1 + 7 + 5 + 9 + 3 + 1)
        assert re.search(r'ROMEO: .{5} my love .{3}\.', text, re.S), text
    with pytest.raises(SystemExit, match='AR writes left to right'):
        sample.main(['--ckpt', str(ckpts / 'ar.pt'), '--infill', 'a [3] b'])
    with pytest.raises(SystemExit, match='more than --length'):
        sample.main(['--ckpt', str(ckpts / 'mdlm.pt'), '--infill', 'a [30] b', '--length', '20'])


def test_trace_html_holds_every_step_and_the_final_text(ckpts, tmp_path, capsys):
    page = tmp_path / 'trace.html'
    tokens, nfe = sample.main(['--ckpt', str(ckpts / 'esolm.pt'), '--length', '24', '--steps', '24',
                               '--num-samples', '2', '--dtype', 'float32', '--trace',
                               '--trace-html', str(page)])
    out = capsys.readouterr().out
    # plain text: not a terminal
    assert '\x1b' not in out and f'--- step {nfe} | NFE {nfe} ---' in out
    text = page.read_text()
    # self-contained, no tmp
    assert 'http' not in text and 'src=' not in text and list(tmp_path.iterdir()) == [page]
    found = re.search(r'const D=(.*?), s=document', text, re.S).group(1)
    blob = json.loads(found.replace('<\\/', '</'))
    frames = blob['frames']
    # step 0: the start
    assert [f[0] for f in frames] == [f[1] for f in frames] == list(range(nfe + 1))
    step_tokens, last = frames[-1][2], frames[-1][3]
    assert step_tokens == tokens[0].tolist() and 'm' not in last
    tok = data.get_tokenizer('byte')
    assert ''.join(blob['pieces'][str(i)] for i in step_tokens) == tok.decode(tokens[0].tolist())
    assert frames[0][3] == 'd' + 'm' * 23
    assert frames[1][3].count('d') == 24 - frames[1][3].count('m') - 1


def test_tracer_marks_and_terminal_colours():
    tok = data.get_tokenizer('byte')
    screen = io.StringIO()
    screen.isatty = lambda: True
    trace = sample.tracer(tok, 2, screen)
    M = tok.vocab_size
    trace(torch.tensor([[104, M, M]]), 0, torch.tensor([[False, True, True]]))
    trace(torch.tensor([[104, 105, M]]), 1, torch.tensor([[False, False, True]]))
    # every 2nd
    assert '--- step 0 | NFE 0 ---' in screen.getvalue() and 'step 1' not in screen.getvalue()
    # Duo: still noisy
    trace(torch.tensor([[104, 105, 33]]), 2, torch.tensor([[False, False, True]]))
    trace(torch.tensor([[104, 106, 33]]), 3, torch.tensor([[False, False, False]]))
    assert [f[3] for f in trace.frames] == ['dmm', 'cdm', 'ccn', 'cdd']
    # dimmed noisy, highlighted new
    assert '\x1b[2m!' in screen.getvalue() and '\x1b[1;7mh' in screen.getvalue()


@pytest.mark.parametrize('flag, value, says', [
    ('--top-p', '0', 'in (0, 1]'),
    ('--top-p', '-0.5', 'in (0, 1]'),
    ('--top-p', '1.5', 'in (0, 1]'),
    ('--length', '0', '>= 1'),
    ('--num-samples', '0', '>= 1'),
    ('--steps', '0', 'positive integer'),
    ('--stride', '32', 'in [1, 31]'),
    ('--stride', '0', 'in [1, 31]'),
    ('--temperature', '0', '> 0'),
    ('--trace-every', '0', '>= 1'),
])
def test_out_of_range_values_are_refused_with_one_line(ckpts, flag, value, says):
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', str(ckpts / 'duo.pt'), flag, value])
    msg = str(e.value)
    assert says in msg and (flag in msg or flag == '--steps') and '\n' not in msg, msg
