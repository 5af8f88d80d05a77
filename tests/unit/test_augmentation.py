"""Augmentation: hand-checked operations, reproducible from the key, train batches only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shipyard.config import load_config
from shipyard.data.augmentation import Augmenter, mixup, shift_rotate
from shipyard.data.config import AugmentationConfig
from shipyard.errors import DataError
from shipyard.train.trainer import Trainer


def _image() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) + 1  # values 1..16


def test_shift_moves_whole_pixels_and_fills_zeros() -> None:
    x = _image()
    right_down = shift_rotate(x, torch.tensor([[1.0, 1.0]]), None)  # dx=1, dy=1
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 1:, 1:] = x[..., :3, :3]
    assert torch.allclose(right_down, expected, atol=1e-5)
    assert torch.allclose(shift_rotate(x, torch.zeros(1, 2), None), x, atol=1e-5)


def test_rotation_by_90_degrees_is_rot90() -> None:
    x = _image()
    turned = shift_rotate(x, torch.zeros(1, 2), torch.tensor([90.0]))
    # +90 degrees turns the image counter-clockwise, exactly (pixel centres land on centres)
    assert torch.allclose(turned, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4)


def test_mixup_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [10.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    perm = torch.tensor([2, 0, 1])
    out = mixup(x, y, perm, 0.75, blend_targets=False)
    # row 0: 0.75*[1,2] + 0.25*[10,0] = [3.25, 1.5]; row 1: 0.75*[3,5] + 0.25*[1,2] = [2.5, 4.25]
    assert torch.allclose(out.x[0], torch.tensor([3.25, 1.5]))
    assert torch.allclose(out.x[1], torch.tensor([2.5, 4.25]))
    assert out.y.tolist() == [0, 1, 2] and out.y_mix.tolist() == [2, 0, 1] and out.lam == 0.75  # type: ignore[union-attr]
    reg = mixup(x, torch.tensor([[1.0], [2.0], [4.0]]), perm, 0.75, blend_targets=True)
    assert reg.y_mix is None
    assert torch.allclose(reg.y[:, 0], torch.tensor([1.75, 1.75, 3.5]))  # 0.75*y + 0.25*y[perm]


def test_mixup_loss_blend_matches_the_formula() -> None:
    torch.manual_seed(0)
    out = torch.randn(4, 3)
    y, y_perm, lam = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 0, 1, 1]), 0.3
    ce = torch.nn.functional.cross_entropy
    blended = lam * ce(out, y, reduction="sum") + (1 - lam) * ce(out, y_perm, reduction="sum")
    soft = lam * torch.nn.functional.one_hot(y, 3) + (1 - lam) * torch.nn.functional.one_hot(
        y_perm, 3
    )
    by_soft_targets = -(soft * out.log_softmax(-1)).sum()  # the mixed one-hot labels
    assert torch.allclose(blended, by_soft_targets, atol=1e-5)


def test_same_key_same_batch_other_key_other_batch() -> None:
    cfg = AugmentationConfig(
        crop_padding=1,
        hflip=0.5,
        rotation=10,
        brightness=0.2,
        contrast=0.2,
        noise_std=0.1,
        mixup_alpha=0.4,
    )
    aug = Augmenter(cfg, (1, 8, 8), "classification")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    a, b, c = aug(x, y, (0, 5, 0, 0)), aug(x, y, (0, 5, 0, 0)), aug(x, y, (0, 6, 0, 0))
    assert torch.equal(a.x, b.x) and a.lam == b.lam and torch.equal(a.y_mix, b.y_mix)  # type: ignore[arg-type]
    assert not torch.equal(a.x, c.x)
    assert not torch.equal(a.x, x) and torch.equal(
        x, torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    )  # input untouched


def test_image_operations_need_images_and_tokens_are_refused() -> None:
    with pytest.raises(DataError, match=r"need images of shape \(C, H, W\).*noise_std and mixup"):
        Augmenter(AugmentationConfig(hflip=0.5), (8,), "regression")
    rows = Augmenter(AugmentationConfig(noise_std=0.1), (8,), "regression")
    assert rows(torch.zeros(4, 8), torch.zeros(4, 1), (0,)).x.abs().sum() > 0
    with pytest.raises(DataError, match="token ids"):
        rows(torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 1), (0,))
    with pytest.raises(DataError, match="not language modeling"):
        Augmenter(AugmentationConfig(noise_std=0.1), (16,), "language-modeling")


def _record(tmp_path: Path, name: str, augmentation: dict[str, Any] | None) -> dict[str, Any]:
    """Train digits-cnn briefly; record the inputs the model saw in training and evaluation."""
    data: dict[str, Any] = {
        "source": "builtin:digits",
        "splits": {"train": 0.7, "val": 0.15, "test": 0.15},
    }
    if augmentation is not None:
        data["augmentation"] = augmentation
    config = load_config(
        {
            "name": name,
            "task": "classification",
            "data": data,
            "model": {"name": "cnn", "channels": [4], "hidden_size": 16},
            "train": {"epochs": 1, "max_steps": 6, "batch_size": 32},
            "eval": {"every_steps": 3},
        }
    )
    trainer = Trainer(
        config,
        run_dir=tmp_path / name,
        resume=None,
        progress=False,
        callbacks=(),
        runs_root=tmp_path,
    )
    seen: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
    trainer.model.register_forward_pre_hook(
        lambda m, args: seen["train" if m.training else "eval"].append(args[0].detach().clone())
    )
    result = trainer.run()
    return {"seen": seen, "data": trainer.data, "metrics": result.metrics}


def test_augmentation_changes_only_training_batches(tmp_path: Path) -> None:
    aug = {"crop_padding": 1, "rotation": 10, "noise_std": 0.1, "mixup_alpha": 0.4}
    plain = _record(tmp_path, "plain", None)
    first = _record(tmp_path, "aug1", aug)
    again = _record(tmp_path, "aug2", aug)
    # the datasets are the same with and without augmentation
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(plain["data"], split).x, getattr(first["data"], split).x)
    # every evaluation input is an unchanged row batch of val or test
    evals = torch.cat(first["seen"]["eval"])
    assert torch.equal(evals, torch.cat(plain["seen"]["eval"]))
    val, test = first["data"].val.x, first["data"].test.x
    # validations at steps 3 and 6, the final val, then the final test
    assert torch.equal(evals, torch.cat([val, val, val, test]))
    # training inputs differ from the plain run's, and repeat exactly with the same seed
    assert len(first["seen"]["train"]) == len(plain["seen"]["train"]) == 6
    for a, b, p in zip(
        first["seen"]["train"], again["seen"]["train"], plain["seen"]["train"], strict=True
    ):
        assert torch.equal(a, b)
        assert not torch.equal(a, p)
