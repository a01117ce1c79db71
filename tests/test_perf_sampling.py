"""Length- and modality-grouped sampling: the same samples every epoch, far less padding, one modality per batch,
through LlavaSFTTrainer's own dataloader and across 2 data-parallel processes."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from modeling_llava.builders import build_tiny_llava
from processing.llava_json import LlavaDataError
from training import sft
from training.sampling import ModalityLengthGroupedSampler, image_counts, modality_length_grouped_indices


def skewed_lengths(n, seed=0):
    """Mostly short records and a long tail, like instruction data (conversation vs detailed description)."""
    rng = random.Random(seed)
    return [int(20 + rng.lognormvariate(4.0, 0.8)) for _ in range(n)]


def padding_fraction(batches, lengths):
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / padded


def batches_of(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_length_grouping_keeps_the_epochs_samples_and_cuts_padding():
    lengths, batch = skewed_lengths(1000), 8
    torch.manual_seed(0)
    random_order = list(RandomSampler(range(len(lengths))))
    grouped = list(LengthGroupedSampler(batch, lengths=lengths))
    mixed = [i % 3 > 0 for i in range(len(lengths))]
    by_modality = list(ModalityLengthGroupedSampler(lengths, mixed, batch))
    for order in (grouped, by_modality):
        assert sorted(order) == sorted(random_order) == list(range(len(lengths)))  # same multiset, each once
    random_padding = padding_fraction(batches_of(random_order, batch), lengths)
    assert random_padding > 0.3
    assert padding_fraction(batches_of(grouped, batch), lengths) < random_padding / 5
    assert padding_fraction(batches_of(by_modality, batch), lengths) < random_padding / 5


def test_modality_grouping_makes_single_modality_batches_with_the_partial_ones_last():
    lengths = skewed_lengths(203, seed=1)
    has_image = [i % 4 != 0 for i in range(203)]  # 152 image records, 51 text-only
    order = modality_length_grouped_indices(lengths, has_image, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(203))
    batches = batches_of(order, 8)
    full = [b for b in batches if len(b) == 8]
    assert len(full) == 152 // 8 + 51 // 8
    # Every batch but the merged remainder at the end holds one modality.
    assert all(len({has_image[i] for i in b}) == 1 for b in batches[: 152 // 8 + 51 // 8])
    assert {has_image[i] for i in batches[0]} != {has_image[i] for i in batches[1]} or len(batches) > 2
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    # Both modalities are spread over the epoch, not one block after the other.
    kinds = [has_image[b[0]] for b in full]
    assert sum(a != b for a, b in zip(kinds, kinds[1:])) > 4
    # Another seed, another order.
    assert order != modality_length_grouped_indices(lengths, has_image, 8, torch.Generator().manual_seed(1))


def write_mixed_data(folder, n=48, seed=0):
    """Image records with 1-6 turns and text-only records (mix665k keeps those) of skewed lengths."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        turns = []
        for t in range(rng.choice([1, 1, 1, 2, 2, 4, 6])):
            turns += [{"from": "human", "value": "what color is the circle?"},
                      {"from": "gpt", "value": "the circle is red and the square is blue." * rng.randint(1, 2)}]
        record = {"id": str(i), "conversations": turns}
        if i % 3:
            Image.new("RGB", (32, 24), (rng.randint(0, 255), 90, 200)).save(folder / "images" / f"{i}.png")
            record["image"] = f"{i}.png"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append(record)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    model, processor = build_tiny_llava("mlp2x_gelu")
    path = write_mixed_data(folder, n=96)
    dataset = sft.prepare_dataset(path, sft.DataArguments(image_folder=str(folder / "images")), processor, 512, seed=0)
    return model, processor, dataset


def fed_batches(model, processor, dataset, tmp_path, strategy):
    args = sft.LlavaSFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", gradient_checkpointing=False,
        train_sampling_strategy=strategy, max_length=512, seed=0,
    )
    trainer = sft.LlavaSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    torch.manual_seed(0)
    return list(trainer.get_train_dataloader())


def test_the_trainer_feeds_grouped_single_modality_batches(mixed, tmp_path):
    model, processor, dataset = mixed
    assert sorted(set(image_counts(dataset))) == [0, 1]
    image_token = processor.image_token_id

    def stats(batches):
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        return 1 - real / sum(b["attention_mask"].numel() for b in batches), real, sum(len(b["input_ids"]) for b in batches)

    grouped, shuffled = fed_batches(model, processor, dataset, tmp_path, "group_by_length"), \
        fed_batches(model, processor, dataset, tmp_path, "random")
    grouped_padding, grouped_tokens, grouped_rows = stats(grouped)
    random_padding, random_tokens, random_rows = stats(shuffled)
    # The same records, so the same real tokens, with much less padding around them.
    assert grouped_rows == random_rows == len(dataset) and grouped_tokens == random_tokens
    assert random_padding > 0.25 and grouped_padding < random_padding / 3
    # A batch holds images on every row or on none; a text-only batch never reaches the tower.
    for batch in grouped:
        rows_with_images = (batch["input_ids"] == image_token).any(dim=1)
        assert rows_with_images.all() or not rows_with_images.any()
        assert ("pixel_values" in batch) == bool(rows_with_images.any())
    # The `length` column the sampler sorts by is the length the collator produces.
    assert sorted(dataset["length"]) == sorted(int(n) for b in grouped for n in b["attention_mask"].sum(dim=1))


def test_grouping_by_label_keeps_the_random_order_within_each_group():
    kinds = ["vqa"] * 70 + ["conversation"] * 21 + ["detail"] * 9
    random.Random(0).shuffle(kinds)
    order = modality_length_grouped_indices([0] * len(kinds), kinds, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(kinds)))
    batches = batches_of(order, 8)
    full = 70 // 8 + 21 // 8 + 9 // 8
    assert all(len({kinds[i] for i in b}) == 1 for b in batches[:full])
    # No length sorting: within a group the records come in no fixed order, and another seed draws other batches.
    vqa = [i for i in order if kinds[i] == "vqa"]
    assert vqa != sorted(vqa) and vqa != sorted(vqa, reverse=True)
    again = modality_length_grouped_indices([0] * len(kinds), kinds, 8, torch.Generator().manual_seed(1))
    assert [i for i in again if kinds[i] == "vqa"] != vqa


def test_the_trainer_feeds_batches_of_one_record_type(tmp_path):
    """`--group_batches_by type`: short and long record types never share a batch, so little is padded."""
    model, processor = build_tiny_llava("mlp2x_gelu")
    (tmp_path / "images").mkdir()
    rng, records = random.Random(0), []
    for i in range(64):
        Image.new("RGB", (32, 24), (rng.randint(0, 255), 90, 200)).save(tmp_path / "images" / f"{i}.png")
        kind = "vqa" if i % 4 else "conversation"
        answer = "red" if kind == "vqa" else "the circle is red and the square is blue. " * rng.randint(4, 6)
        records.append({"id": str(i), "image": f"{i}.png", "type": kind, "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the circle?"}, {"from": "gpt", "value": answer}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    data_args = sft.DataArguments(image_folder=str(tmp_path / "images"), group_batches_by="type")
    dataset = sft.prepare_dataset(path, data_args, processor, 512, seed=0)
    kinds = dict(zip(dataset["id"], dataset["batch_group"]))
    assert sorted(kinds.values()) == sorted(r["type"] for r in records)

    grouped = fed_batches(model, processor, dataset, tmp_path / "out", "random")
    ungrouped = fed_batches(model, processor, dataset.remove_columns("batch_group"), tmp_path / "out", "random")
    middle = (min(dataset["length"]) + max(dataset["length"])) / 2
    long_batches = [b["input_ids"].shape[1] > middle for b in grouped]
    assert any(long_batches) and not all(long_batches)
    for batch in grouped:  # all rows of a batch are short VQA or all long conversations
        long_rows = batch["attention_mask"].sum(dim=1) > middle
        assert long_rows.all() or not long_rows.any()
    padding = [1 - sum(int(b["attention_mask"].sum()) for b in bs) / sum(b["attention_mask"].numel() for b in bs)
               for bs in (grouped, ungrouped)]
    assert padding[0] < 0.1 < padding[1]

    # A record without the field is named in the error.
    del records[5]["type"]
    path.write_text(json.dumps(records))
    with pytest.raises(LlavaDataError, match=r"record '5', field 'type'") as error:
        sft.prepare_dataset(path, data_args, processor, 512, seed=0)
    assert (error.value.file, error.value.record_id, error.value.field) == (str(path), "5", "type")


DDP_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from modeling_llava.builders import build_tiny_llava
from training import sft
from transformers import set_seed

set_seed(0)
model, processor = build_tiny_llava("mlp2x_gelu")
dataset = sft.prepare_dataset({data!r}, sft.DataArguments(image_folder={images!r}), processor, 512, seed=0)
args = sft.LlavaSFTConfig(output_dir={out!r}, per_device_train_batch_size=4, report_to="none",
                          gradient_checkpointing=False, train_sampling_strategy="group_by_length", seed=0)
trainer = sft.LlavaSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
loader = trainer.get_train_dataloader()
batches = [list(b) for b in loader.batch_sampler]
with open(os.path.join({out!r}, f"rank{{trainer.args.process_index}}.json"), "w") as f:
    json.dump({{"world": trainer.args.world_size, "batches": batches, "length": list(dataset["length"])}}, f)
"""


def test_grouped_sampling_under_two_process_ddp_covers_the_epoch_once(tmp_path):
    folder = tmp_path / "data"
    path = write_mixed_data(folder)
    script = tmp_path / "ranks.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), data=str(path), images=str(folder / "images"), out=str(tmp_path)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "training" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", "29531", str(script)]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    seen = [i for r in ranks for b in r["batches"] for i in b]
    assert sorted(seen) == list(range(48))  # 48 records / (2 ranks x 4): every record once, none twice
    lengths = ranks[0]["length"]
    records = json.loads(path.read_text())
    for r in ranks:
        for batch in r["batches"]:
            assert len({"image" in records[i] for i in batch}) == 1
    batches = [b for r in ranks for b in r["batches"]]
    shuffled = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding_fraction(batches, lengths) < padding_fraction(batches_of(shuffled, 4), lengths) / 2
