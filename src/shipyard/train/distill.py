"""Knowledge distillation: train a student on a teacher's outputs as well as the labels.

    loss = alpha * T² * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard

(Hinton et al., 2015): the T² keeps the soft term's gradients on the scale of the hard term's as
the temperature T softens both distributions. For regression the soft term is the squared error
to the teacher's outputs. Like every loss in `shipyard.train.losses`, terms are sums over rows
(tokens for language models), so gradient accumulation normalises them correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shipyard.errors import TrainError


@dataclass(frozen=True)
class DistillParams:
    """How to mix the teacher's soft targets with the hard labels.

    alpha: weight of the soft (teacher) term, 0..1; 1 - alpha goes to the hard-label loss.
    temperature: softens both distributions (classification and language modeling).
    """

    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise TrainError(f"distillation temperature must be > 0, got {self.temperature}")


def soft_target_loss(student: Tensor, teacher: Tensor, task: str, temperature: float) -> Tensor:
    """Sum over rows (tokens) of T²·KL(teacher_T || student_T), or of the squared error for
    regression. student/teacher: (B, C), (B, T, V) or (B, k) outputs of the same shape."""
    if student.shape != teacher.shape:
        raise TrainError(
            f"student outputs {tuple(student.shape)} and teacher outputs {tuple(teacher.shape)} "
            "differ; the student must predict the same classes/tokens/targets as the teacher"
        )
    if task == "regression":
        return F.mse_loss(student.float(), teacher.float(), reduction="none").mean(-1).sum()
    t = temperature
    width = student.shape[-1]
    log_p_student = F.log_softmax(student.float().reshape(-1, width) / t, dim=-1)  # (N, C)
    log_p_teacher = F.log_softmax(teacher.float().reshape(-1, width) / t, dim=-1)  # (N, C)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return kl * (t * t)


def distillation_loss(
    student: Tensor, teacher: Tensor, hard_sum: Tensor, task: str, params: DistillParams
) -> Tensor:
    """alpha·soft + (1 - alpha)·hard, both summed over the batch's rows (tokens)."""
    with torch.autocast(student.device.type, enabled=False):
        soft = soft_target_loss(student, teacher, task, params.temperature)
    return params.alpha * soft + (1.0 - params.alpha) * hard_sum
