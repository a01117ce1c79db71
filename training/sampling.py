"""Length- and modality-grouped sampling: batches of similar lengths, and in mixed data (LLaVA-1.5's mix665k) batches
that are all image records or all text-only records, or all of one record `type` (`--group_batches_by type`).

Length grouping alone is transformers' `LengthGroupedSampler` (`--train_sampling_strategy group_by_length` with our
`length` column). When the data mixes image and text-only records, LLaVA-1.5 also keeps the two apart
(`group_by_modality_length`): a text-only batch then skips the tower entirely, and no batch pads text-only rows
out to the length of an image record. `ModalityLengthGroupedSampler` does both; it yields every index exactly once
per epoch, so what is learned changes only by batch composition, as with any shuffle. That can still matter where
length predicts the answer: in the scene world a conversation's length follows its object count, so grouped batches
shared their answers and the LM learned batch priors instead of looking. Grouping by record type only (`lengths` all
equal) keeps one-word VQA records and long conversations apart, so little is padded, while within a type the batches
are drawn at random (the miniature stage 2 still samples at random: type batches scored no better there).
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
    lengths: list[int], groups: list, batch_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A permutation of `range(len(lengths))` whose consecutive `batch_size` slices hold one group each (a modality
    flag, or any label such as a record type) and similar lengths (transformers' megabatch sort within each group;
    equal lengths keep the random order); the batches of all groups are then shuffled together, the longest first (an
    out-of-memory shows at step 1). The partial batches, at most one per group, come last, merged."""
    batches, leftovers = [], []
    # transformers' megabatch size for the whole dataset, not per group: a smaller group would otherwise be
    # sorted in smaller megabatches and carry more padding.
    mega_batch_mult = max(1, min(len(lengths) // (batch_size * 4), 50))
    for wanted in sorted(set(groups), reverse=True):  # a fixed order (image records first), whatever the data order
        group = [i for i, label in enumerate(groups) if label == wanted]
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

    def __init__(self, lengths: list[int], groups: list, batch_size: int, generator=None):
        if len(lengths) != len(groups):
            raise ValueError(f"{len(lengths)} lengths but {len(groups)} group labels.")
        self.lengths, self.groups, self.batch_size, self.generator = list(lengths), list(groups), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_length_grouped_indices(self.lengths, self.groups, self.batch_size, self.generator))


__all__ = ["ModalityLengthGroupedSampler", "image_counts", "modality_length_grouped_indices"]
