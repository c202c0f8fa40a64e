"""Labelled shards: the Parquet rows the collect stage writes and the train stage and the
convergence figures read, and the split of their tokens into training and validation by example.

One row per reference token (`SCHEMA`): the example and position, the token and both models'
greedy tokens there, the SLM's hidden state (float16), the label (1 = the SLM suffices), the case
(1-3) and, for case 3, whether the rollout was correct.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import CiterError
from pipeline.rundir import collect_dir
from pipeline.storage import StoragePath, arrow_paths

SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("position", pa.int32()),
    ("token_id", pa.int32()),
    ("slm_token", pa.int32()),
    ("llm_token", pa.int32()),
    ("slm_hidden", pa.list_(pa.float16())),
    ("label", pa.int8()),
    ("case", pa.int8()),
    ("rollout_correct", pa.bool_()),
])


def labels_table(labels) -> pa.Table:
    """TokenLabel objects -> a table with SCHEMA."""
    cols = {
        "example_id": [x.example_id for x in labels],
        "position": [x.position for x in labels],
        "token_id": [x.token_id for x in labels],
        "slm_token": [x.slm_token for x in labels],
        "llm_token": [x.llm_token for x in labels],
        "slm_hidden": [np.asarray(x.slm_hidden, dtype=np.float16) for x in labels],
        "label": [x.label for x in labels],
        "case": [x.case for x in labels],
        "rollout_correct": [x.rollout_correct for x in labels],
    }
    return pa.table({name: pa.array(cols[name], type=SCHEMA.field(name).type) for name in SCHEMA.names},
                    schema=SCHEMA)


def damaged_shard(path: StoragePath, error: Exception) -> CiterError:
    return CiterError(f"{path}: damaged labelled shard, not Parquet ({error}); rerun the collect stage (`citer "
                      "collect` or `citer train`), which labels it again")


def read_shard(path: StoragePath, columns: list[str] | None = None) -> pa.Table:
    """One labelled shard; a file that does not read as Parquet is named in the error."""
    (where,), fs = arrow_paths([path])
    try:
        return pq.read_table(where, columns=columns, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise damaged_shard(path, e) from None


def shard_reads(path: StoragePath) -> bool:
    """Whether a shard's Parquet footer reads (a killed copy or a truncated file does not)."""
    (where,), fs = arrow_paths([path])
    try:
        pq.read_metadata(where, filesystem=fs)
        return True
    except (pa.ArrowException, OSError):
        return False


def read_labels(run: str | StoragePath, iteration: int, columns: list[str] | None = None) -> pa.Table:
    """All complete shards of an iteration's collect stage, as one table sorted by (example, position)."""
    directory = collect_dir(run, iteration)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise CiterError(f"{directory}: no labelled shards (run `citer collect` for iteration {iteration} first)")
    if columns is not None:
        columns = ["example_id", "position", *[c for c in columns if c not in ("example_id", "position")]]
    table = pa.concat_tables([read_shard(f, columns).replace_schema_metadata(None) for f in files])
    return table.sort_by([("example_id", "ascending"), ("position", "ascending")])


def is_validation(example_id: str, seed: int, fraction: float) -> bool:
    """Whether an example's tokens go to validation: a seeded hash of its id below `fraction`."""
    digest = hashlib.blake2b(f"{seed}:{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def to_arrays(batch: pa.Table, seed: int, fraction: float, validation: bool) -> dict[str, np.ndarray]:
    """A batch of labelled rows -> {"x": (n, hidden) float16, "y": (n,) float32} for one split."""
    keep = np.fromiter((is_validation(i, seed, fraction) == validation
                        for i in batch.column("example_id").to_pylist()), dtype=bool, count=batch.num_rows)
    batch = batch.filter(pa.array(keep))
    hidden = batch.column("slm_hidden").combine_chunks()
    width = len(hidden[0]) if len(hidden) else 0
    x = hidden.flatten().to_numpy(zero_copy_only=False).reshape(len(hidden), width)
    return {"x": x, "y": np.asarray(batch.column("label"), dtype=np.float32)}
