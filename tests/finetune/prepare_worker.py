"""One rank of `speechlm prepare` under accelerate launch: prepares, then records which chunks it wrote."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from speechlm.finetune.prepare import prepare


def main(manifest: str, codec: str, out: str) -> None:
    before = set(os.listdir(Path(out) / "out" / "chunks")) if (Path(out) / "out" / "chunks").is_dir() else set()
    prepare(manifest, codec, Path(out) / "out", chunk_size=5, progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()  # set up by prepare's PartialState
    mine = [k for k in range(3) if k % world == rank]
    written = sorted(int(name[6:11]) for name in os.listdir(Path(out) / "out" / "chunks")
                     if name.endswith(".json") and name not in before and int(name[6:11]) in mine)
    record = {"world_size": world, "rank": rank, "chunks": written}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
