"""Our own byte-level BPE tokenizer with chat roles, saved as a standard Hugging Face tokenizer.

The chat template marks assistant content with {% generation %} so TRL can compute the loss on assistant tokens
only, and ends every turn with <|end|>: that token is both the end-of-turn the decoders stop at and the separator
between pretraining documents (so a pretrained model already knows how to stop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pipeline.core.errors import UserError

PAD, END = "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, END] + [f"<|{r}|>" for r in ROLES]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE on `texts` and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=END, additional_special_tokens=[f"<|{r}|>" for r in ROLES]
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 1 << 30
    return hf


def load_tokenizer(path: str | Path, need_chat_template: bool = False):
    from transformers import AutoTokenizer

    from pipeline.core.hub import hub_name, offline, offline_hint

    cut_off = hub_name(path) and offline()  # probed first: offline, the load fails at once instead of retrying
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        if cut_off:
            raise UserError(f"cannot load a tokenizer from '{path}': {offline_hint(repr(str(path)))}") from None
        raise UserError(
            f"cannot load a tokenizer from '{path}' (offline, or not a tokenizer folder): {str(e).splitlines()[0]}"
        )
    if tok.pad_token is None:  # many hub LMs ship without one; padding is always masked, so eos is safe
        tok.pad_token = tok.eos_token
    if need_chat_template and not tok.chat_template:
        raise UserError(
            f"tokenizer '{path}' has no chat template; set one (tokenizer.chat_template) or start from a chat model"
        )
    return tok


def end_of_turn_ids(tok) -> list[int]:
    """Token ids that end a reply: our <|end|>, plus the tokenizer's eos for hub models."""
    ids = []
    for t in (END, tok.eos_token):
        i = tok.convert_tokens_to_ids(t) if t else None
        if i is not None and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    return ids
