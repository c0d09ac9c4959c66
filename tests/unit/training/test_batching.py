"""Split padded micro-batches: the row-group plan, the groups' tensors, and the same update as the whole batch."""

from __future__ import annotations

import pytest

from sft_pipeline.training.batching import plan_row_groups, split_padded_batch
from tests.unit.training.helpers import make_cfg


def _padded(lengths: list[int]):
    import torch

    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(1, n + 1) + 1000 * row
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_groups_respect_the_budget_and_keep_every_row_once():
    lengths = [600, 120, 130, 125, 118, 590, 122, 127]
    groups = plan_row_groups(lengths, max_tokens=1024, overhead_tokens=64)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(len(g) * max(lengths[i] for i in g) <= 1024 for g in groups)
    # the two long rows go together, the six short ones together: 2 x 600 would exceed 1024, so apart
    assert sorted(map(sorted, groups)) == [[0], [1, 2, 3, 4, 6, 7], [5]]


def test_similar_rows_stay_in_one_group_and_a_long_row_goes_alone():
    assert plan_row_groups([100, 101, 99, 100], max_tokens=1024) == [[1, 0, 3, 2]]
    assert plan_row_groups([2000, 10], max_tokens=1024) == [[0], [1]]
    # with no overhead per group, cutting off the long row is worth it even within the budget
    assert plan_row_groups([300, 20, 20], max_tokens=4096, overhead_tokens=0) == [[0], [1, 2]]
    assert plan_row_groups([300, 20, 20], max_tokens=4096, overhead_tokens=1000) == [[0, 1, 2]]


def test_split_cuts_each_group_to_its_longest_row():
    batch = _padded([9, 3, 8, 2])
    groups = split_padded_batch(batch, max_tokens=16, overhead_tokens=4, width_multiple=1)
    assert groups is not None
    assert [tuple(g["input_ids"].shape) for g in groups] == [(1, 9), (1, 8), (2, 3)]
    # widths rounded up to a multiple (fewer distinct shapes), never past the batch's width
    rounded = split_padded_batch(batch, max_tokens=16, overhead_tokens=4, width_multiple=4)
    assert [tuple(g["input_ids"].shape) for g in rounded] == [(1, 9), (1, 8), (2, 4)]
    seen = {tuple(row[m.bool()].tolist()) for g in groups for row, m in zip(g["input_ids"], g["attention_mask"])}
    assert seen == {tuple(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])}
    for g in groups:
        assert g["labels"].shape == g["input_ids"].shape
        assert (g["labels"][g["attention_mask"] == 0] == -100).all()


def test_nothing_to_split():
    assert split_padded_batch(_padded([5, 5, 5]), max_tokens=1024) is None  # one group, no pad column
    assert split_padded_batch(_padded([7]), max_tokens=2) is None  # one row
    free = {"input_ids": _padded([5])["input_ids"], "position_ids": _padded([5])["input_ids"]}
    assert split_padded_batch(free, max_tokens=2) is None  # padding-free: no attention mask


@pytest.mark.parametrize("rows_per_group", [1, 2])
def test_split_step_gives_the_whole_batch_gradient(tiny_model_dir, tiny_dataset_dir, tmp_path, rows_per_group):
    """training_step over row groups accumulates exactly the gradient (and loss) of the whole micro-batch."""
    import torch

    from sft_pipeline.training import build_trainer

    def gradients(split: bool, out: str):
        trainer, _, _ = build_trainer(make_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / out, lora_dropout=0.0,
                                               batching="padded", max_batch_tokens=0, seed=3))
        batch = next(iter(trainer.get_train_dataloader()))
        if split:
            trainer.max_batch_tokens = rows_per_group * batch["input_ids"].shape[1]
            assert len(split_padded_batch(batch, trainer.max_batch_tokens)) >= 4 // rows_per_group
        num_items = (batch["labels"][:, 1:] != -100).sum()
        loss = trainer.training_step(trainer.model, batch, num_items)
        return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    loss_whole, whole = gradients(False, "whole")
    loss_split, split = gradients(True, "split")
    assert torch.isclose(loss_whole, loss_split, rtol=1e-5, atol=1e-6)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        assert torch.allclose(whole[name], split[name], rtol=1e-4, atol=1e-7), name
