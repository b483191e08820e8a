# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Adds SMOLA to peft's `PeftType` enum: `peft.register_peft_method` only accepts names the enum already has."""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)  # Enum's __setattr__ refuses new members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


SMOLA_PEFT_TYPE = _extend_peft_type("SMOLA")
