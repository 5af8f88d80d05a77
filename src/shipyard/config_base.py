"""Base class for every config section (strict: unknown keys are errors), and the task names."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys, so a typo is an error naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


Task = Literal["classification", "regression", "language-modeling"]
"""What a model predicts: one of TASKS. Run configs, data, metrics and packages all use this one."""
TASKS: tuple[Task, ...] = get_args(Task)
LM_TASK: Task = "language-modeling"
