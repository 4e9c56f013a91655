"""One rank of a launched training run (accelerate, torchrun, the deepspeed launcher): the recipe `speechlm train`
runs, plus a record of what this rank saw, written to OUT/rank-R.json for the test to compare."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from speechlm.configfile import apply_overrides, build_dataclass, read_yaml
from speechlm.finetune import recipe
from speechlm.finetune.config import TrainConfig


def main(config_path: str, *overrides: str) -> None:
    config = build_dataclass(TrainConfig, apply_overrides(read_yaml(config_path), list(overrides)))
    model, tokenizer = recipe.build_model(config)
    processor = recipe.build_processor(config, model, tokenizer)
    dataset = recipe.build_datasets(config, processor)
    seen: list[int] = []
    fetch = dataset.__getitem__
    # Dunder lookups skip the instance, so the wrapper goes on the class (this process has one dataset).
    type(dataset).__getitem__ = lambda self, index: (seen.append(int(index)), fetch(index))[1]
    trainer = recipe.build_trainer(config, model, processor, dataset)
    recipe.train(config, trainer)
    recipe.save(config, trainer)
    record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "trainer_world_size": trainer.args.world_size,
              "deepspeed": trainer.is_deepspeed_enabled, "seen": seen}
    Path(config.training.output_dir, f"rank-{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    # the deepspeed launcher adds --local_rank=N (LOCAL_RANK in the environment says the same)
    main(*(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank=")))
