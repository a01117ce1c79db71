"""A byte-level BPE tokenizer trained locally, for tiny models that cannot download a real one."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
IMAGE_TOKEN = "<image>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `texts` with LLaMA's special tokens (`<s>`, `</s>`, `<unk>`, `<pad>`)
    and `<image>`. Any string round-trips through it (byte level), so unseen words never become `<unk>`."""
    specials = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN]
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        additional_special_tokens=[IMAGE_TOKEN],
        **SPECIAL_TOKENS,
    )
