"""Runs the Uni-MoE pipeline with a recipe JSON; launched by tests/test_uni_moe_training.py, once directly and once
with `accelerate launch --multi_gpu --num_processes 2` (gloo DDP on a CPU-only machine)."""

import json
import sys

from multimodal_moe.training.uni_moe import run_pipeline

recipe_path, output_dir = sys.argv[1], sys.argv[2]
run_pipeline(json.loads(open(recipe_path).read()), output_dir, progress=False)
