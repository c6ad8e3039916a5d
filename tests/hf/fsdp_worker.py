"""A few LoRA training steps of a tiny Sparse-X Llama, sharded by PyTorch FSDP2 (``fully_shard``) over the processes
of a ``torchrun`` launch (gloo on the CPU), or in one process on the whole batch. Each step's loss (the mean over
the global batch) goes to the JSON file given. Run by ``test_training.py``; not a test module itself."""

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/ (utils)
from utils import tiny_model  # noqa: E402

import sparsex_hf  # noqa: E402,F401  (registers "sparsex")

STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 96


def main(out_path: str) -> None:
    distributed = dist.is_available() and "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = tiny_model("llama", "sparsex", seed=0)
    model.config.sparsex = dict(block_size=16, sink_tokens=16, window=32, stride=16, topk=2, backend="torch")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             lora_dropout=0.0))
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(3, 250, (1, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    per = GLOBAL_BATCH // world
    losses = []
    for _ in range(STEPS):
        ids = data[0, rank * per : (rank + 1) * per]  # the same batch every step: the loss must fall
        loss = model(input_ids=ids, labels=ids).loss  # the mean over this process's tokens (equal counts)
        loss.backward()  # FSDP averages the gradients over the processes: the global batch's mean gradient
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(dict(losses=losses, world=world, sharded=sharded), fh)
    if distributed:
        dist.barrier()  # both ranks done before gloo tears down (a rank leaving early aborted the other)
        # gloo's threads sometimes abort in their C++ destructors ("terminate called without an active exception",
        # about one run in five on a 2-core CPU): the results are written and both ranks are past the barrier, so
        # each process leaves without running them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
