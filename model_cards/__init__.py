"""Model cards (README.md with Hub metadata) and publishing to the Hugging Face Hub.

    from multimodal_moe.model_cards import build_model_card, push_checkpoint
"""

from .card import build_model_card, eval_results_from_json
from .push import push_checkpoint

__all__ = ["build_model_card", "eval_results_from_json", "push_checkpoint"]
