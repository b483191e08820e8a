"""Registers every architecture of multimodal-moe with the transformers Auto classes.

This file is not copied into checkpoints (nothing below imports it); the flat files next to it are.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from ..processing.processing_alt_moe import AltMoEProcessor
from ..processing.processing_uni_moe import UniMoEProcessor
from .configuration_alt_moe import AltMoEConfig
from .configuration_uni_moe import UniMoEConfig
from .configuration_omni_smola import OmniSMoLAConfig
from .modeling_alt_moe import AltMoEModel, AltMoEPreTrainedModel
from .modeling_omni_smola import OmniSMoLAForConditionalGeneration, OmniSMoLAPreTrainedModel
from .modeling_uni_moe import UniMoEForConditionalGeneration, UniMoEModel, UniMoEPreTrainedModel


def _register(config_cls, auto_models: dict, processor_cls=None):
    # exist_ok: re-importing after a reload must not fail.
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    config_cls.register_for_auto_class()
    for auto_cls, model_cls in auto_models.items():
        auto_cls.register(config_cls, model_cls, exist_ok=True)
        model_cls.register_for_auto_class(auto_cls.__name__)
    if processor_cls is not None:
        AutoProcessor.register(config_cls, processor_cls, exist_ok=True)
        processor_cls.register_for_auto_class()


_register(AltMoEConfig, {AutoModel: AltMoEModel}, AltMoEProcessor)
_register(
    UniMoEConfig,
    {
        AutoModel: UniMoEModel,
        AutoModelForCausalLM: UniMoEForConditionalGeneration,
        AutoModelForImageTextToText: UniMoEForConditionalGeneration,
    },
    UniMoEProcessor,
)
_register(OmniSMoLAConfig, {AutoModelForCausalLM: OmniSMoLAForConditionalGeneration})

__all__ = [
    "AltMoEConfig",
    "AltMoEModel",
    "AltMoEPreTrainedModel",
    "AltMoEProcessor",
    "OmniSMoLAConfig",
    "OmniSMoLAForConditionalGeneration",
    "OmniSMoLAPreTrainedModel",
    "UniMoEConfig",
    "UniMoEForConditionalGeneration",
    "UniMoEModel",
    "UniMoEPreTrainedModel",
    "UniMoEProcessor",
]
