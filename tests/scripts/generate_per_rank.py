"""Each rank started by the deepspeed launcher generates for its own prompt and writes the result."""

import json
import sys

import torch

from capo_fast.config import SamplingConfig
from capo_fast.distributed import start_process_group
from capo_fast.engines import VLLMEngine

model_dir, out_dir = sys.argv[-2], sys.argv[-1]
start_process_group()  # as train.py joins: gloo here, its /dev/shm names released
rank = torch.distributed.get_rank()
engine = VLLMEngine(model_dir, seed=0, max_model_len=256)
prompt = [5 + rank, 6, 7]  # a different prompt per rank
completions = engine.generate([prompt], SamplingConfig(temperature=1.0, max_tokens=8), n=2, seeds=[100 + rank])[0]
with open(f"{out_dir}/rank{rank}.json", "w") as f:
    json.dump({"prompt": prompt, "seed": 100 + rank, "token_ids": [c.token_ids for c in completions]}, f)
