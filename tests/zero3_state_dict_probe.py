"""Run as a script (its own process: it initialises torch.distributed): a 2-layer Llama under ZeRO-3
on one CPU rank; prints whether ``full_state_dict`` gives back every weight of the unpartitioned model."""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR: DeepSpeed picks its accelerator at import)
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from blsp_ray.train.loop import full_state_dict, skip_shared_memory_allreduce_build  # noqa: E402

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
want = LlamaForCausalLM(config).state_dict()
ds = {"train_batch_size": 1, "zero_optimization": {"stage": 3},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
skip_shared_memory_allreduce_build(deepspeed)  # as the training workers do
deepspeed.init_distributed(dist_backend="gloo")
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = LlamaForCausalLM(config)
engine, *_ = deepspeed.initialize(model=model, config=ds)
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0):
    engine.module.load_state_dict(want)
got = full_state_dict(engine, rank=0)
print(json.dumps({
    "partitioned_numel": sum(p.numel() for p in engine.module.parameters()),  # 0: nothing gathered outside
    "missing": sorted(set(want) - set(got)),
    "extra": sorted(set(got) - set(want)),
    "max_abs_diff": max(float((got[k].float() - want[k].float()).abs().max()) for k in want if k in got),
}))
