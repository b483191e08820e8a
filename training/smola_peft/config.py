# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""`SMoLAConfig`: the peft configuration of Omni-SMoLA adapters (soft mixtures of low-rank experts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .registration import SMOLA_PEFT_TYPE


@dataclass
class SMoLAConfig(PeftConfig):
    """Configuration of [`SMoLAModel`].

    Args:
        num_experts (`int`): low-rank experts per group.
        r (`int`): rank of every expert.
        alpha (`float`): scaling numerator; an expert's output is scaled by alpha / r.
        dropout (`float`): dropout on the experts' input (the router sees the clean input).
        target_modules (`list[str]` or `str`): linear layers to adapt (names or a regex, as for LoRA).
        expert_groups (`list[str]`): expert groups; the non-shared ones are the modalities, in order
            (`modality_ids` value m selects the m-th one).
        shared_groups (`list[str]`): groups every token uses (the multimodal experts).
        modules_to_save (`list[str]`): other modules to train and save (for example a new classification head).
    """

    num_experts: int = field(default=4, metadata={"help": "Low-rank experts per group."})
    r: int = field(default=4, metadata={"help": "Rank of every expert."})
    alpha: float = field(default=8.0, metadata={"help": "Scaling numerator (scaling = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of the linear layers to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    expert_groups: list[str] = field(
        default_factory=lambda: ["text", "vision", "multimodal"], metadata={"help": "Expert groups."}
    )
    shared_groups: list[str] = field(
        default_factory=lambda: ["multimodal"], metadata={"help": "Groups every token uses."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the SMoLA layers to train and save."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SMOLA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.num_experts < 1 or self.r < 1:
            raise ValueError(f"num_experts and r must be positive, got {self.num_experts} and {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.expert_groups, self.shared_groups = list(self.expert_groups), list(self.shared_groups)
        unknown = [g for g in self.shared_groups if g not in self.expert_groups]
        if len(set(self.expert_groups)) != len(self.expert_groups) or unknown:
            raise ValueError(f"expert_groups must be unique and contain shared_groups, got {self.expert_groups}, "
                             f"{self.shared_groups}")
