"""Tokenizers: byte, GPT-2's BPE (shipped in assets/), any tiktoken encoding, hf:NAME."""
import base64
import functools
import lzma
import os
from dataclasses import dataclass
from typing import Callable

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')  # its README.md
EOS = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>')  # an HF tokenizer's separator


@dataclass
class Tokenizer:
    name: str
    encode: Callable   # str -> list[int], no special tokens
    decode: Callable   # list[int] -> str
    vocab_size: int    # K real ids, end-of-text included
    eot: int           # end-of-text id, written between documents


@functools.cache
def get_tokenizer(name):
    """byte (256 bytes + end-of-text), gpt2 (r50k_base, shipped), a tiktoken encoding or hf:NAME."""
    if name == 'byte':
        def decode(ids):
            return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')
        return Tokenizer('byte', lambda s: list(s.encode('utf-8')), decode, 257, 256)
    if name.startswith('hf:'):
        return hf_tokenizer(name)
    import tiktoken
    try:
        enc = gpt2_encoding() if name in ('gpt2', 'r50k_base') else tiktoken.get_encoding(name)
    except ValueError:
        raise SystemExit(f"unknown tokenizer '{name}': "
                         "use byte, gpt2, hf:NAME or a tiktoken encoding name")
    except Exception as e:
        raise SystemExit(f"cannot load the BPE file of '{name}' ({type(e).__name__}): "
                         "connect to the internet once, or set TIKTOKEN_CACHE_DIR "
                         "to a folder holding tiktoken's cached file")
    return Tokenizer(name, enc.encode_ordinary, enc.decode, enc.n_vocab, enc.eot_token)


def gpt2_encoding():
    """GPT-2's BPE from the shipped ranks (lines 'base64(token) rank'), tiktoken's r50k pattern."""
    import tiktoken
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    with lzma.open(os.path.join(ASSETS, 'gpt2.tiktoken.xz')) as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, f)}
    return tiktoken.Encoding('r50k_base', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256})


def hf_tokenizer(name):
    """hf:PATH (a tokenizer.json or a folder with one) or hf:NAME (Hub); eos separates documents."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise SystemExit(f'--tokenizer {name} needs the tokenizers package: '
                         'pip install tokenizers') from None
    path = os.path.expanduser(name[3:])
    path = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    try:
        hf = (HFTokenizer.from_file(path) if os.path.isfile(path)
              else HFTokenizer.from_pretrained(name[3:]))
    except Exception as e:
        raise SystemExit(f"cannot load tokenizer '{name[3:]}' ({type(e).__name__}): "
                         "pass a Hub name, a tokenizer.json or a folder holding one") from None
    eot = [i for i in map(hf.token_to_id, EOS) if i is not None]
    if not eot:
        raise SystemExit(f"tokenizer '{name[3:]}' has no end-of-text token ({', '.join(EOS)})")
    return Tokenizer(name, lambda s: hf.encode(s, add_special_tokens=False).ids, hf.decode,
                     hf.get_vocab_size(), eot[0])
