from pathlib import Path

from tokenizers import Tokenizer

from backends.mock.runner import MockRunner
from nanovllm_jax.tokenizer import HFTokenizer

SIMPLE_BPE_PATH = Path(__file__).with_name("simple_bpe.json")
EOS_TOKEN = "<|endoftext|>"


def simple_bpe_tokenizer() -> HFTokenizer:
    """The mock's tokenizer: a small byte-level BPE that round-trips any UTF-8 string."""
    tok = Tokenizer.from_file(str(SIMPLE_BPE_PATH))
    # Special tokens are kept in decoding so that text which spells one still round-trips;
    # the engine never detokenizes the EOS that ends a request.
    return HFTokenizer(tok, eos_token_ids=[tok.token_to_id(EOS_TOKEN)], skip_special_tokens=False)


__all__ = ["MockRunner", "simple_bpe_tokenizer", "SIMPLE_BPE_PATH"]
