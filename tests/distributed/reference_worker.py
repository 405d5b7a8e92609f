"""Run by test_reference_shards.py, under torchrun or alone: the reference pass over the tiny pairs twice
(a cache miss, then a hit), recording which pairs this process computed, batch by batch; writes
OUT/rank-R.json. ENGINE fsdp2 shards the model first (every forward pass is then a collective).

python tests/distributed/reference_worker.py MODEL_DIR PAIRS_FILE CACHE_DIR OUT BATCH_SIZE [ENGINE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launching import exit_worker

from dpokit.data.prepare import load_pairs
from dpokit.distributed import Engine, make_accelerator, shard_model
from dpokit.logprobs import padded_pair_logps
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.reference.cache import cached_reference_logps


def main(
    model_dir: str, pairs_file: str, cache_dir: str, out: str, batch_size: str, engine: str = ""
) -> None:
    accelerator = make_accelerator()
    tokenizer = load_tokenizer(model_dir)
    pairs, _ = load_pairs(pairs_file, tokenizer, 64, "train_data")
    model = load_model(model_dir).eval()
    if engine == "fsdp2":
        shard_model(model, Engine("fsdp2"), compute_dtype=None)
    position = {id(pair): index for index, pair in enumerate(pairs)}
    computed: list[list[int]] = []

    def counting_logps(model, batch):
        computed.append([position[id(pair)] for pair in batch])
        return padded_pair_logps(model, batch, pad_token_id=tokenizer.pad_token_id)

    record = {}
    for attempt in ("miss", "hit"):
        computed.clear()
        logps, hit = cached_reference_logps(
            model, pairs, counting_logps, Path(cache_dir), batch_size=int(batch_size), accelerator=accelerator
        )
        record[attempt] = {
            "hit": hit,
            "computed": list(computed),
            "table": [t.tolist() for t in vars(logps).values()],
        }
    Path(out, f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_worker()
