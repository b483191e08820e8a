# Copyright 2026 The multimodal-moe authors. Apache-2.0.
"""Omni-SMoLA as a peft method: importing this package registers it, so `get_peft_model(model, SMoLAConfig(...))`,
`save_pretrained` and `PeftModel.from_pretrained` work like for LoRA (import it before loading a SMoLA adapter).

    >>> from multimodal_moe.training.smola_peft import SMoLAConfig
    >>> model = get_peft_model(base, SMoLAConfig(num_experts=4, r=4, target_modules=["q_proj", "v_proj"]))
    >>> model(input_ids, modality_ids=modality_ids, labels=input_ids)   # modality_ids optional
    >>> with smola_modality_ids(model, modality_ids):   # generate() refuses unknown kwargs: use the context
    ...     model.generate(input_ids=input_ids, max_new_tokens=20)        # generated tokens count as text (0)
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import SMoLAConfig
from .layer import SMoLALayer, SMoLAPeftLinear, smola_modality_ids
from .model import SMoLAModel
from .registration import SMOLA_PEFT_TYPE

if SMOLA_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:  # importing twice (reloads) must not fail
    register_peft_method(name="smola", config_cls=SMoLAConfig, model_cls=SMoLAModel)

__all__ = ["SMOLA_PEFT_TYPE", "SMoLAConfig", "SMoLALayer", "SMoLAModel", "SMoLAPeftLinear", "smola_modality_ids"]
