"""Run by tests/test_alt_moe_training.py under `accelerate launch --num_processes 2 --cpu`."""

import json
import sys

from transformers import TrainingArguments

sys.path.insert(0, sys.argv[2])  # the tests folder
from test_alt_moe_training import toy_features, toy_model  # noqa: E402

from multimodal_moe.training.alt_moe import AltMoETrainer  # noqa: E402

out = sys.argv[1]
model = toy_model()
args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, learning_rate=3e-3, max_steps=12,
                         logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
trainer = AltMoETrainer(model=model, args=args, train_dataset=toy_features())
trainer.train()
rank = trainer.args.process_index
checksum = sum(p.double().sum().item() for p in model.parameters() if p.requires_grad)
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
json.dump({"world": trainer.args.world_size, "checksum": checksum, "losses": losses},
          open(f"{out}/rank{rank}.json", "w"))
