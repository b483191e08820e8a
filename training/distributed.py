"""Distributed-training helpers: DeepSpeed ZeRO-3 and the sparse MoE blocks.

ZeRO-3 partitions every parameter and gathers a module's parameters through hooks when its forward starts. A sparse MoE
block only runs the experts its tokens were routed to, so different ranks touch different experts, and the per-expert
gathers fall out of step (hangs or "parameters not available" errors). Marking the whole MoE block as a ZeRO-3 *leaf*
makes DeepSpeed gather all of its parameters (router and every expert) at once, before its forward:

```python
>>> model = UniMoEForConditionalGeneration.from_pretrained(...)
>>> zero3_leaf_modules(model)   # before Trainer / deepspeed.initialize; works on a peft-wrapped model too
[<class '...UniMoESparseMoeBlock'>]
```

Use with `recipes/deepspeed/zero3.json` (`TrainingArguments(deepspeed="recipes/deepspeed/zero3.json")`).
"""

from __future__ import annotations

import logging

import torch


logger = logging.getLogger(__name__)

_LEAF_CLASS_NAMES = ("UniMoESparseMoeBlock",)


def _moe_block_classes(model: torch.nn.Module) -> list[type]:
    """The sparse MoE block classes present in `model`, found through `model.modules()`.

    Matching by class name as well as by `isinstance` covers a peft wrapper (its modules are the base model's) and a
    checkpoint loaded with `trust_remote_code=True`, whose classes come from a copied module, not from this package.
    """
    from ..modeling.modeling_uni_moe import UniMoESparseMoeBlock

    found: list[type] = []
    for module in model.modules():
        cls = type(module)
        if (isinstance(module, UniMoESparseMoeBlock) or cls.__name__ in _LEAF_CLASS_NAMES) and cls not in found:
            found.append(cls)
    return found


def zero3_leaf_modules(model: torch.nn.Module) -> list[type]:
    """Registers every `UniMoESparseMoeBlock` of `model` as a DeepSpeed ZeRO-3 leaf module and returns the classes.

    Calls `deepspeed.utils.set_z3_leaf_modules(model, classes)`. Harmless without ZeRO-3 (the flag is only read by
    ZeRO-3's parameter hooks); a dense model (no MoE block) registers nothing and returns `[]`.

    Raises:
        ImportError: DeepSpeed is not installed (`pip install deepspeed`).
    """
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as err:
        raise ImportError(
            "zero3_leaf_modules needs DeepSpeed, which is not installed: `pip install deepspeed`"
        ) from err

    classes = _moe_block_classes(model)
    if not classes:
        logger.info("zero3_leaf_modules: no sparse MoE block in the model (dense?): nothing to register")
        return []
    set_z3_leaf_modules(model, classes)
    return classes
