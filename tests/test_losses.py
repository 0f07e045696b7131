"""The release's losses on hand-computed cases: BCE/Dice values, ignored pixels, padding prompts, the
uncertainty split and the boundary band target."""

from __future__ import annotations

import math

import pytest
import torch

from pasam_hf.losses import dice_loss, pasam_loss, pasam_loss_components, sigmoid_bce, uncertainty_target


def test_bce_and_dice_values() -> None:
    logits = torch.zeros(1, 2, 2)
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    weights = torch.ones(1, 2, 2)
    assert sigmoid_bce(logits, targets, weights).item() == pytest.approx(math.log(2))
    # probs 0.5 everywhere: 1 - (2 * 0.5 * 1 + 1) / (0.5 * 4 + 1 + 1)
    assert dice_loss(logits, targets, weights).item() == pytest.approx(1 - 2 / 4)
    # A confident, correct prediction has near-zero BCE and Dice loss.
    confident = (targets * 2 - 1) * 20
    assert sigmoid_bce(confident, targets, weights).item() < 1e-6
    assert dice_loss(confident, targets, weights).item() < 1e-6


def test_ignored_pixels_do_not_count() -> None:
    logits = torch.tensor([[[5.0, -5.0], [30.0, 0.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    weights = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0], targets[0, 0])
    assert sigmoid_bce(logits, targets, weights).item() == pytest.approx(expected.item(), rel=1e-6)


def _outputs(batch: int, prompts: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    final = torch.randn(batch, prompts, 1, 32, 32, generator=generator)
    coarse = torch.randn(batch, prompts, 1, 8, 8, generator=generator)
    refined = torch.randn(batch, prompts, 1, 8, 8, generator=generator)
    uncertainty = torch.rand(batch, prompts, 1, 8, 8, generator=generator)
    return final, coarse, refined, uncertainty


def _labels(batch: int, prompts: int) -> torch.Tensor:
    labels = torch.zeros(batch, prompts, 64, 64, dtype=torch.uint8)
    labels[..., 16:48, 20:40] = 1
    return labels


def test_padding_prompts_add_nothing() -> None:
    """A prompt whose labels are all void (batch padding) leaves every loss term as without it."""
    final, coarse, refined, uncertainty = _outputs(2, 2)
    labels = _labels(2, 2)
    labels[1, 1] = 255
    padded = pasam_loss_components(final, coarse, refined, uncertainty, labels)
    # The same three real prompts, evaluated without the padding one.
    real = [(0, 0), (0, 1), (1, 0)]
    pick = lambda t: torch.stack([t[b, p] for b, p in real]).unsqueeze(0)  # noqa: E731
    alone = pasam_loss_components(pick(final), pick(coarse), pick(refined), pick(uncertainty), pick(labels))
    for name in padded:
        assert padded[name].item() == pytest.approx(alone[name].item(), rel=1e-6), name


def test_uncertainty_selects_coarse_or_refined() -> None:
    final, coarse, refined, _ = _outputs(1, 1)
    labels = _labels(1, 1)
    certain = pasam_loss_components(final, coarse, refined, torch.zeros(1, 1, 1, 8, 8), labels)
    uncertain = pasam_loss_components(final, coarse, refined, torch.ones(1, 1, 1, 8, 8), labels)
    up = lambda t: torch.nn.functional.interpolate(t[0], size=(64, 64), mode="bilinear")[:, 0]  # noqa: E731
    targets = labels[0].float()
    ones = torch.ones_like(targets)
    assert certain["adapter_bce"].item() == pytest.approx(sigmoid_bce(up(coarse), targets, ones).item(), rel=1e-5)
    assert uncertain["adapter_bce"].item() == pytest.approx(sigmoid_bce(up(refined), targets, ones).item(), rel=1e-5)
    # Dice on an empty selection is 1 - 1/1 = 0, so only the selected mask's Dice counts.
    assert uncertain["adapter_dice"].item() == pytest.approx(dice_loss(up(refined), targets, ones).item(), rel=1e-5)
    total = pasam_loss(final, coarse, refined, torch.ones(1, 1, 1, 8, 8), labels)
    assert total.item() == pytest.approx(sum(v.item() for v in uncertain.values()), rel=1e-6)


def test_uncertainty_target_band() -> None:
    """Band = inner boundary of the foreground + inner boundary of the background, width round(0.005 x diag)."""
    mask = torch.zeros(1, 100, 100, dtype=torch.bool)
    mask[0, 30:70, 30:70] = True
    band = uncertainty_target(mask)[0]
    # diagonal 141 -> width max(1, round(0.705)) = 1: the ring just inside and just outside the square.
    expected = torch.zeros(100, 100)
    expected[29:71, 29:71] = 1
    expected[31:69, 31:69] = 0
    assert torch.equal(band, expected)
    # The image frame is not a boundary of the background.
    assert band[0].sum() == 0 and band[:, 0].sum() == 0


def test_multimask_outputs_rejected() -> None:
    final, coarse, refined, uncertainty = _outputs(1, 1)
    with pytest.raises(ValueError, match="multimask_output=False"):
        pasam_loss(final.expand(1, 1, 3, 32, 32), coarse, refined, uncertainty, _labels(1, 1))
    with pytest.raises(ValueError, match="one mask per prompt"):
        pasam_loss(final, coarse, refined, uncertainty, _labels(1, 2))
