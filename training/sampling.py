"""Length- and modality-grouped sampling: batches of similar lengths, and in mixed data (LLaVA-1.5's mix665k) batches
that are all image records or all text-only records.

Length grouping alone is transformers' `LengthGroupedSampler` (`--train_sampling_strategy group_by_length` with our
`length` column). When the data mixes image and text-only records, LLaVA-1.5 also keeps the two apart
(`group_by_modality_length`): a text-only batch then skips the tower entirely, and no batch pads text-only rows
out to the length of an image record. `ModalityLengthGroupedSampler` does both; it yields every index exactly once
per epoch, so what is learned changes only by batch composition, as with any shuffle. That can still matter where
length predicts the answer: in the scene world a conversation's length follows its object count, so grouped batches
shared their answers and the LM learned batch priors instead of looking (the miniature stage 2 samples at random).
"""

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


def image_counts(dataset) -> list[int]:
    """Images per row of a dataset with an `images` list column, read from Arrow without decoding any image."""
    import pyarrow.compute as pc  # noqa: PLC0415

    column = dataset.select_columns(["images"]).with_format("arrow")[:]["images"]
    return [n or 0 for n in pc.list_value_length(column).to_pylist()]


def modality_length_grouped_indices(
    lengths: list[int], has_image: list[bool], batch_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A permutation of `range(len(lengths))` whose consecutive `batch_size` slices hold one modality each and
    similar lengths (transformers' megabatch sort within each modality); the batches of both modalities are then
    shuffled together, the longest first (an out-of-memory shows at step 1). The at most two partial batches come
    last, merged."""
    batches, leftovers = [], []
    # transformers' megabatch size for the whole dataset, not per modality: the smaller modality would otherwise be
    # sorted in smaller megabatches and carry more padding.
    mega_batch_mult = max(1, min(len(lengths) // (batch_size * 4), 50))
    for wanted in (True, False):
        group = [i for i, flag in enumerate(has_image) if flag == wanted]
        if not group:
            continue
        order = get_length_grouped_indices(
            [lengths[i] for i in group], batch_size, mega_batch_mult=mega_batch_mult, generator=generator
        )
        ordered = [group[j] for j in order]
        full = len(ordered) - len(ordered) % batch_size
        batches += [ordered[start : start + batch_size] for start in range(0, full, batch_size)]
        leftovers += ordered[full:]
    if batches:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    leftovers.sort(key=lambda i: lengths[i], reverse=True)
    return [i for batch in batches for i in batch] + leftovers


class ModalityLengthGroupedSampler(Sampler):
    """Sampler of `modality_length_grouped_indices`. With `generator=None` it draws from torch's global RNG, like
    transformers' `LengthGroupedSampler`, so data-parallel ranks seeded alike agree on the order and accelerate
    shards the batches between them."""

    def __init__(self, lengths: list[int], has_image: list[bool], batch_size: int, generator=None):
        if len(lengths) != len(has_image):
            raise ValueError(f"{len(lengths)} lengths but {len(has_image)} modality flags.")
        self.lengths, self.has_image, self.batch_size, self.generator = list(lengths), list(has_image), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_length_grouped_indices(self.lengths, self.has_image, self.batch_size, self.generator))


__all__ = ["ModalityLengthGroupedSampler", "image_counts", "modality_length_grouped_indices"]
