"""pipeline.losses: Lovasz hinge against independent computations, and SegLoss's schedule/heads."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.config import LossConfig, load_config
from pipeline.errors import PipelineError
from pipeline.losses import SegLoss
from pipeline.losses.lovasz import lovasz_grad, lovasz_hinge, lovasz_hinge_flat


def jaccard_loss_of_mistakes(gt: np.ndarray, wrong: np.ndarray) -> float:
    """1 - IoU when exactly the pixels in `wrong` are mispredicted (sets, no formulas)."""
    truth = {i for i in range(len(gt)) if gt[i]}
    mistakes = {i for i in range(len(gt)) if wrong[i]}
    predicted = truth ^ mistakes
    union = truth | predicted
    return 0.0 if not union else 1.0 - len(truth & predicted) / len(union)


def lovasz_extension_by_level_sets(errors: np.ndarray, gt: np.ndarray) -> float:
    """Lovasz extension as an integral over thresholds t of J({errors >= t}) (errors >= 0)."""
    levels = sorted({float(e) for e in errors if e > 0}, reverse=True) + [0.0]
    return sum((high - low) * jaccard_loss_of_mistakes(gt, errors >= high)
               for high, low in zip(levels, levels[1:]))


def berman_reference_per_image(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The published per-image loop (one image at a time)."""
    losses = []
    for image_logits, image_labels in zip(logits, labels):
        flat_logits, flat_labels = image_logits.flatten(), image_labels.flatten()
        errors = 1.0 - flat_logits * (2.0 * flat_labels - 1.0)
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), lovasz_grad(flat_labels[order])))
    return torch.stack(losses).mean()


GT_CASES = [
    [1, 0, 1, 1, 0],
    [0, 0, 0, 0],
    [1, 1, 1],
    [0, 1],
    [1],
    [0],
    list(np.random.default_rng(3).integers(0, 2, 12)),
]


@pytest.mark.parametrize("gt", GT_CASES)
def test_lovasz_grad_is_the_jaccard_increment_of_each_extra_mistake(gt):
    gt = np.array(gt)
    direct = [jaccard_loss_of_mistakes(gt, np.arange(len(gt)) < i + 1)
              - jaccard_loss_of_mistakes(gt, np.arange(len(gt)) < i) for i in range(len(gt))]
    assert np.allclose(lovasz_grad(torch.tensor(gt, dtype=torch.float32)).numpy(), direct)


def test_lovasz_grad_of_an_empty_mask_is_all_on_the_worst_pixel():
    assert lovasz_grad(torch.zeros(6)).tolist() == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("seed", range(6))
def test_lovasz_hinge_equals_the_lovasz_extension_computed_from_level_sets(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 2, 9) if seed else np.zeros(9, dtype=int)
    logits = rng.normal(0, 1.5, 9)
    logits[:2] = 0.0  # a tie of errors at exactly 1 must not matter
    errors = np.maximum(1.0 - logits * (2 * gt - 1), 0.0)
    loss = lovasz_hinge_flat(torch.tensor(logits), torch.tensor(gt, dtype=torch.float64))
    assert float(loss) == pytest.approx(lovasz_extension_by_level_sets(errors, gt), abs=1e-9)


def test_lovasz_hinge_on_zero_one_errors_is_exactly_one_minus_iou():
    # logit 0 -> hinge error 1 (a mistake); logit = +-2 on the right side -> error 0
    gt = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1.0])
    mistake = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    logits = torch.where(mistake, torch.zeros(8), 2.0 * (2 * gt - 1))
    assert float(lovasz_hinge_flat(logits, gt)) == pytest.approx(
        jaccard_loss_of_mistakes(gt.numpy(), mistake.numpy()))


def test_batched_per_image_lovasz_matches_the_published_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 16, 16, generator=generator, dtype=torch.float64)
    labels = (torch.rand(5, 16, 16, generator=generator) > 0.6).double()
    labels[1] = 0  # an empty image
    labels[2] = 1  # a full one
    assert torch.allclose(lovasz_hinge(logits, labels), berman_reference_per_image(logits, labels))


def test_per_image_false_treats_the_batch_as_one_image():
    logits, labels = torch.randn(3, 4, 4), (torch.rand(3, 4, 4) > 0.5).float()
    assert torch.allclose(lovasz_hinge(logits, labels, per_image=False),
                          lovasz_hinge_flat(logits.flatten(), labels.flatten()))


def test_lovasz_hinge_is_differentiable_gradcheck():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[1, 0, 1], [1, 1, 0], [0, 0, 1]], [[0] * 3] * 3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: lovasz_hinge(x, labels), (logits,))
    assert torch.autograd.gradcheck(lambda x: lovasz_hinge(x, labels, symmetric=True), (logits,))


def test_perfect_prediction_has_zero_lovasz_loss():
    labels = (torch.rand(2, 8, 8) > 0.5).float()
    labels[0] = 0
    logits = 10.0 * (2 * labels - 1)
    assert float(lovasz_hinge(logits, labels)) == 0.0
    assert float(lovasz_hinge(logits, labels, symmetric=True)) == 0.0


def test_empty_mask_lovasz_penalises_only_the_worst_pixel():
    logits = torch.tensor([[-3.0, 0.5, -1.0, 2.0]])
    assert float(lovasz_hinge(logits, torch.zeros(1, 4))) == pytest.approx(1.0 + 2.0)


def test_symmetric_lovasz_averages_salt_and_background_terms():
    logits, labels = torch.randn(2, 5, 5), (torch.rand(2, 5, 5) > 0.5).float()
    expected = (lovasz_hinge(logits, labels) + lovasz_hinge(-logits, 1 - labels)) / 2
    assert torch.allclose(lovasz_hinge(logits, labels, symmetric=True), expected)


@pytest.mark.parametrize("per_image", [True, False])
def test_one_sort_symmetric_lovasz_matches_the_two_sort_definition_and_its_gradient(per_image):
    # the symmetric loss sorts the hinge errors once (they are equal for (x, y) and (-x, 1-y))
    generator = torch.Generator().manual_seed(3)
    labels = (torch.rand(4, 112, 112, generator=generator) > 0.6).float()
    labels[0] = 0  # an empty mask: only the background term has a Jaccard class to score
    logits = torch.randn(4, 112, 112, generator=generator, dtype=torch.float64)
    one_sort = logits.clone().requires_grad_()
    two_sorts = logits.clone().requires_grad_()
    loss = lovasz_hinge(one_sort, labels, per_image, symmetric=True)
    expected = (lovasz_hinge(two_sorts, labels, per_image) + lovasz_hinge(-two_sorts, 1 - labels, per_image)) / 2
    loss.backward()
    expected.backward()
    assert torch.allclose(loss, expected)
    assert torch.allclose(one_sort.grad, two_sorts.grad)


# ---------------------------------------------------------------- SegLoss


def batch(seed: int = 0, size: int = 16, empty: tuple[int, ...] = (1,)):
    generator = torch.Generator().manual_seed(seed)
    target = (torch.rand(4, 1, size, size, generator=generator) > 0.5).float()
    target[list(empty)] = 0
    logits = torch.randn(4, 1, size, size, generator=generator, requires_grad=True)
    return logits, target


def test_bce_lovasz_is_the_weighted_sum_of_its_parts():
    logits, target = batch()
    loss, parts = SegLoss(LossConfig(name="bce_lovasz", bce_weight=0.3, lovasz_weight=2.0))(
        {"mask": logits}, target, epoch=0)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    lovasz = lovasz_hinge(logits[:, 0], target[:, 0])
    assert torch.allclose(loss, 0.3 * bce + 2.0 * lovasz)
    assert parts["bce"] == pytest.approx(bce.item()) and parts["lovasz"] == pytest.approx(lovasz.item())
    assert parts["total"] == pytest.approx(loss.item())
    assert all(isinstance(v, float) for v in parts.values())


def test_symmetric_lovasz_flag_switches_the_lovasz_term():
    logits, target = batch()
    loss, _ = SegLoss(LossConfig(name="lovasz", symmetric_lovasz=True))({"mask": logits}, target, 0)
    assert torch.allclose(loss, lovasz_hinge(logits[:, 0], target[:, 0], symmetric=True))


def test_image_only_loss_scores_the_101_pixel_image_and_ignores_the_reflect_padding():
    from pipeline.geometry import pad_amounts, pad_or_resize

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1, 101, 101, generator=generator)
    target = (torch.rand(4, 1, 101, 101, generator=generator) > 0.7).float()
    target[0] = 0.0  # an empty image too
    cfg = LossConfig(name="bce_lovasz", bce_weight=0.5, symmetric_lovasz=True, image_only=True)
    padded_logits, padded_target = pad_or_resize(logits, "pad", 112), pad_or_resize(target, "pad", 112)
    loss, _ = SegLoss(cfg)({"mask": padded_logits}, padded_target, epoch=0)
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, target) + lovasz_hinge(logits[:, 0], target[:, 0], symmetric=True)
    assert torch.allclose(loss, expected)
    # whatever the model says in the padding costs nothing...
    before, _ = pad_amounts(101, 112)
    scrambled = padded_logits.clone()
    scrambled[..., :before, :] = 50.0
    scrambled[..., before + 101:] = -50.0
    assert torch.allclose(SegLoss(cfg)({"mask": scrambled}, padded_target, epoch=0)[0], loss)
    # ...and is scored by default (the padded loss differs)
    default, _ = SegLoss(LossConfig(name="bce_lovasz", bce_weight=0.5, symmetric_lovasz=True))(
        {"mask": padded_logits}, padded_target, epoch=0)
    assert not torch.allclose(default, loss)


def test_image_only_loss_leaves_the_deep_supervision_heads_on_the_padded_grid():
    from pipeline.geometry import pad_or_resize

    generator = torch.Generator().manual_seed(4)
    target = pad_or_resize((torch.rand(4, 1, 101, 101, generator=generator) > 0.6).float(), "pad", 112)
    outputs = {"mask": torch.randn(4, 1, 112, 112, generator=generator),
               "salt_logit": torch.randn(4, generator=generator),
               "stages": [torch.randn(4, 1, s, s, generator=generator) for s in (14, 28, 56)]}
    padded = SegLoss(LossConfig(name="bce"), deep_supervision=True)(outputs, target, epoch=0)[1]
    cropped = SegLoss(LossConfig(name="bce", image_only=True), deep_supervision=True)(outputs, target, epoch=0)[1]
    assert cropped["stages"] == pytest.approx(padded["stages"])
    assert cropped["salt"] == pytest.approx(padded["salt"])  # mirrored salt is salt in the image too
    assert cropped["bce"] != pytest.approx(padded["bce"])


def test_image_only_loss_needs_padded_inputs():
    with pytest.raises(PipelineError, match="loss.image_only"):
        load_config(None, ["input.mode=resize", "loss.image_only=true"])


def test_schedule_switches_to_stage2_loss_at_the_given_epoch():
    logits, target = batch()
    loss_fn = SegLoss(LossConfig(name="bce", stage2_from_epoch=3, stage2_name="lovasz"))
    names = [loss_fn.loss_name(epoch) for epoch in range(5)]
    assert names == ["bce", "bce", "bce", "lovasz", "lovasz"]
    _, before = loss_fn({"mask": logits}, target, epoch=2)
    _, after = loss_fn({"mask": logits}, target, epoch=3)
    assert set(before) == {"bce", "total"} and set(after) == {"lovasz", "total"}


def test_no_schedule_keeps_the_first_loss_forever():
    assert SegLoss(LossConfig(name="bce_lovasz")).loss_name(10_000) == "bce_lovasz"


def test_unknown_loss_name_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="loss.stage2_name"):
        SegLoss(LossConfig(stage2_name="no_such_loss"))


def deep_outputs(logits: torch.Tensor, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "mask": logits,
        "salt_logit": torch.randn(4, generator=generator, requires_grad=True),
        "stages": [torch.randn(4, 1, s, s, generator=generator, requires_grad=True) for s in (4, 8)],
    }


def test_deep_supervision_adds_salt_head_bce_and_stage_losses_on_non_empty_images():
    logits, target = batch(empty=(1, 3))
    cfg = LossConfig(name="bce_lovasz", empty_head_weight=0.05, stage_heads_weight=0.1)
    outputs = deep_outputs(logits)
    loss, parts = SegLoss(cfg, deep_supervision=True)(outputs, target, epoch=0)

    main, _ = SegLoss(cfg)({"mask": logits}, target, 0)
    salt = F.binary_cross_entropy_with_logits(outputs["salt_logit"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    non_empty = [0, 2]
    stage_terms = []
    for stage in outputs["stages"]:
        stage_target = F.max_pool2d(target, 16 // stage.shape[-1])
        stage_terms.append(SegLoss(cfg).mask_loss(stage[non_empty], stage_target[non_empty], "bce_lovasz")[0])
    expected = main + 0.05 * salt + 0.1 * torch.stack(stage_terms).mean()
    assert torch.allclose(loss, expected)
    assert parts["salt"] == pytest.approx(salt.item())
    loss.backward()
    # empty images' stage logits get no gradient: their stage term is skipped
    assert all(float(s.grad[[1, 3]].abs().sum()) == 0 and float(s.grad[0].abs().sum()) > 0 for s in outputs["stages"])
    assert float(outputs["salt_logit"].grad.abs().sum()) > 0


def test_deep_supervision_on_an_all_empty_batch_still_reaches_every_head():
    logits, target = batch(empty=(0, 1, 2, 3))
    outputs = deep_outputs(logits)
    loss, parts = SegLoss(LossConfig(name="lovasz"), deep_supervision=True)(outputs, target, 0)
    assert parts["stages"] == 0.0 and np.isfinite(parts["total"])
    loss.backward()
    assert all(s.grad is not None for s in outputs["stages"])


def test_deep_supervision_loss_accepts_eval_outputs_with_only_the_mask():
    logits, target = batch()
    loss, parts = SegLoss(LossConfig(), deep_supervision=True)({"mask": logits}, target, 0)
    assert set(parts) == {"bce", "total"} and torch.isfinite(loss)


@pytest.mark.parametrize("name,stage2", itertools.product(["bce", "lovasz", "bce_lovasz"], [-1, 1]))
def test_every_loss_and_schedule_gives_finite_gradients(name, stage2):
    logits, target = batch()
    loss, _ = SegLoss(LossConfig(name=name, stage2_from_epoch=stage2), True)(deep_outputs(logits), target, 1)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logits.grad))


def test_elu_hinge_is_elu_plus_one_of_the_sorted_errors_and_keeps_pulling_right_pixels():
    # one salt pixel right by a margin of 3 (error -2), one background pixel wrong (error 1.5)
    logits, labels = torch.tensor([[3.0, 0.5]]), torch.tensor([[1.0, 0.0]])
    # sorted errors [1.5 (background), -2 (salt)]; Jaccard gradient [1/2, 1/2]
    expected = 0.5 * (1.5 + 1.0) + 0.5 * (math.exp(-2.0) - 1.0 + 1.0)
    assert float(lovasz_hinge(logits, labels, kind="elu")) == pytest.approx(expected)
    assert float(lovasz_hinge(logits, labels, kind="relu")) == pytest.approx(0.5 * 1.5)
    x = logits.clone().requires_grad_(True)
    lovasz_hinge(x, labels, kind="elu").backward()
    assert float(x.grad[0, 0]) < 0  # the right salt pixel is still pushed up; relu gives it 0


def test_elu_hinge_is_differentiable_and_symmetric_like_the_relu_one():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(2, 3, 3, generator=generator) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: lovasz_hinge(x, labels, kind="elu"), (logits,))
    expected = (lovasz_hinge(logits, labels, kind="elu") + lovasz_hinge(-logits, 1 - labels, kind="elu")) / 2
    assert torch.allclose(lovasz_hinge(logits, labels, symmetric=True, kind="elu"), expected)


def test_lovasz_hinge_option_reaches_the_training_loss_and_is_validated():
    logits, target = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    for kind in ("relu", "elu"):
        loss, _ = SegLoss(LossConfig(name="lovasz", symmetric_lovasz=True, lovasz_hinge=kind))({"mask": logits}, target, 0)
        assert torch.allclose(loss, lovasz_hinge(logits[:, 0], target[:, 0], symmetric=True, kind=kind))
    with pytest.raises(PipelineError, match="loss.lovasz_hinge"):
        load_config(None, ["loss.lovasz_hinge=softplus"])


def stage_loss_by_selection(loss_fn: SegLoss, stages, target, name):
    """The stage term as it was written before: the main loss on the salt images only, selected
    by a boolean index (a host sync per stage on a GPU)."""
    non_empty = target.flatten(1).amax(dim=1) > 0
    if not bool(non_empty.any()):
        return torch.stack([s.sum() * 0.0 for s in stages]).mean()
    return torch.stack([loss_fn.mask_loss(s[non_empty], F.adaptive_max_pool2d(target, s.shape[-2:])[non_empty],
                                          name)[0] for s in stages]).mean()


@pytest.mark.parametrize("empty", [(), (1,), (0, 2, 3), (0, 1, 2, 3)])
@pytest.mark.parametrize("name", ["bce", "lovasz", "bce_lovasz"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weighted_stage_loss_equals_the_selected_images_loss_and_gradient(empty, name, symmetric):
    logits, target = batch(seed=5, empty=empty)
    loss_fn = SegLoss(LossConfig(name=name, symmetric_lovasz=symmetric, bce_weight=0.3), deep_supervision=True)
    stages = deep_outputs(logits, seed=7)["stages"]
    weighted = loss_fn.stage_loss(stages, target, name)
    (weighted_grads) = torch.autograd.grad(weighted, stages)
    selected = stage_loss_by_selection(loss_fn, stages, target, name)
    selected_grads = torch.autograd.grad(selected, stages)
    assert torch.allclose(weighted, selected, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(weighted_grads, selected_grads))
    # images without salt get exactly no stage gradient
    assert all(float(g[list(empty)].abs().sum()) == 0.0 for g in weighted_grads)


@pytest.mark.parametrize("name", ["bce", "lovasz", "bce_lovasz"])
def test_the_training_loss_and_its_backward_read_nothing_back_to_the_host(name):
    from benchmarks.syncs import count_host_syncs

    logits, target = batch(empty=(0, 3))
    outputs = deep_outputs(logits)
    loss_fn = SegLoss(LossConfig(name=name, symmetric_lovasz=True), deep_supervision=True)
    with count_host_syncs() as syncs:
        loss, parts = loss_fn(outputs, target, epoch=0)
        loss.backward()
    assert dict(syncs) == {}
    # the logged floats are still there when asked for: one read for all of them
    with count_host_syncs() as syncs:
        assert parts["total"] == pytest.approx(float(loss.detach())) and set(parts) >= {"salt", "stages"}
        parts["salt"]
    assert syncs["tolist"] == 1


def test_dice_is_one_minus_the_smoothed_soft_dice_of_each_image():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1.0  # 8 salt pixels of 16; image 1 is empty
    logits = torch.zeros(2, 1, 4, 4)  # p = 0.5 everywhere
    loss, parts = SegLoss(LossConfig(name="dice"))({"mask": logits}, target, epoch=0)
    salt = 1 - (2 * 0.5 * 8 + 1) / (0.5 * 16 + 8 + 1)
    empty = 1 - 1 / (0.5 * 16 + 1)
    assert float(loss) == pytest.approx((salt + empty) / 2) and parts["dice"] == pytest.approx(float(loss))
    sure = SegLoss(LossConfig(name="dice"))({"mask": (target * 2 - 1) * 30}, target, epoch=0)[0]
    assert float(sure) == pytest.approx(0.0, abs=1e-6)  # right everywhere, the empty image included
