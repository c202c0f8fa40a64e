"""Labelled shards: the Parquet rows the collect stage writes and the train stage and the
convergence figures read, the train stage's checks of an iteration's shards, and the split of
their tokens into training and validation by example.

One row per reference token (`SCHEMA`): the example and position, the token and both models'
greedy tokens there, the SLM's hidden state (float16), the label (1 = the SLM suffices), the case
(1-3), and for case 3 whether the rollout was correct. Optional columns follow: the router's other
inputs when its config reads them (`FEATURE_SCHEMA`), and for the tokens the shortcut audit
sampled whether the rollouts from the SLM's and from the LLM's token were (`AUDIT_SCHEMA`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import CiterError
from pipeline.rundir import DONE, collect_dir
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
# Optional columns: the router's inputs besides the hidden state (`router.features`), and the
# shortcut audit's outcomes (`collect.audit_rate` > 0; null where a token was not audited).
FEATURE_SCHEMA = {"topk": pa.field("slm_topk", pa.list_(pa.float16())),
                  "token_embedding": pa.field("slm_token_embedding", pa.list_(pa.float16()))}
AUDIT_SCHEMA = [pa.field("audit_slm_correct", pa.bool_()), pa.field("audit_llm_correct", pa.bool_())]


def shard_schema(features: tuple[str, ...] | list[str] = (), audit: bool = False) -> pa.Schema:
    """SCHEMA with the columns of the router `features` besides the hidden state, and the audit's."""
    schema = SCHEMA
    for f in features:
        if f in FEATURE_SCHEMA:
            schema = schema.append(FEATURE_SCHEMA[f])
    for f in AUDIT_SCHEMA if audit else []:
        schema = schema.append(f)
    return schema


def labels_table(labels, features: tuple[str, ...] | list[str] = (), audit: bool = False) -> pa.Table:
    """TokenLabel objects -> a table with `shard_schema(features, audit)`."""
    schema = shard_schema(features, audit)
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
        "audit_slm_correct": [x.audit_slm_correct for x in labels],
        "audit_llm_correct": [x.audit_llm_correct for x in labels],
        **{FEATURE_SCHEMA[f].name: [np.asarray(x.slm_features[f], dtype=np.float16) for x in labels]
           for f in features if f in FEATURE_SCHEMA},
    }
    return pa.table({name: pa.array(cols[name], type=schema.field(name).type) for name in schema.names},
                    schema=schema)


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


def labelled_shards(run: StoragePath, iteration: int, features: tuple[str, ...], slm: str,
                    trust_remote_code: bool = False) -> tuple[list[StoragePath], dict[str, int]]:
    """The iteration's complete shards and the width of each of the router's `features` in them
    (`hidden` is the SLM's hidden size, from its config); refuse a missing or unfinished collect
    stage, shards whose hidden states do not have that size, or shards without a column a
    feature needs."""
    from transformers import AutoConfig

    directory = collect_dir(run, iteration)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise CiterError(f"{directory}: no labelled shards to train on (run `citer collect CONFIG --run {run} "
                         f"--iteration {iteration}` first)")
    if not (directory / DONE).is_file():
        raise CiterError(f"{directory}: the collect stage is not complete ({DONE} is missing); rerun collect to "
                         "finish it before training")
    hidden = AutoConfig.from_pretrained(slm, trust_remote_code=trust_remote_code).hidden_size
    columns = dict(zip(features, feature_columns(features), strict=True))
    widths = {"hidden": hidden}
    wheres, fs = arrow_paths(files)
    for f, where in zip(files, wheres, strict=True):
        try:
            with pq.ParquetFile(where, filesystem=fs) as shard:
                missing = [c for c in columns.values() if c not in shard.schema_arrow.names]
                if missing:
                    raise CiterError(f"{f}: no column {missing[0]}, which router.features="
                                     f"{list(features)} reads; these labels were collected for other "
                                     "router features: collect again")
                first = shard.read_row_group(0, columns=sorted({"slm_hidden", *columns.values()}))
        except (pa.ArrowException, OSError) as e:
            raise damaged_shard(f, e) from None
        if first.num_rows and len(first.column("slm_hidden")[0]) != hidden:
            raise CiterError(f"{f}: field 'slm_hidden' has {len(first.column('slm_hidden')[0])} values per token, "
                             f"but the SLM {slm} has hidden size {hidden}; these labels were collected "
                             "with another SLM")
        for name, column in columns.items():
            if first.num_rows and name != "hidden":
                widths[name] = len(first.column(column)[0])
    return files, widths


def split_counts(run: StoragePath, iteration: int, seed: int, fraction: float) -> dict[str, Any]:
    """Rows and label shares of the train and validation splits, from the label column alone."""
    table = read_labels(run, iteration, columns=["label"])
    ids = table.column("example_id").to_pylist()
    labels = np.asarray(table.column("label"), dtype=np.int64)
    val = np.fromiter((is_validation(i, seed, fraction) for i in ids), dtype=bool, count=len(ids))
    out = {"train_rows": int((~val).sum()), "val_rows": int(val.sum()),
           "train_label_1_share": float(labels[~val].mean()) if (~val).any() else math.nan,
           "val_label_1_share": float(labels[val].mean()) if val.any() else math.nan,
           "train_examples": len(set(np.asarray(ids)[~val])), "val_examples": len(set(np.asarray(ids)[val]))}
    if not out["train_rows"] or not out["val_rows"]:
        raise CiterError(f"train.val_fraction={fraction} leaves {out['train_examples']} training and "
                         f"{out['val_examples']} validation examples; both splits need examples")
    return out


def seeded_unit(seed: int, key: str) -> float:
    """A number in [0, 1) from a seeded hash of `key`: the same on every machine and run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(example_id: str, seed: int, fraction: float) -> bool:
    """Whether an example's tokens go to validation: a seeded hash of its id below `fraction`."""
    return seeded_unit(seed, example_id) < fraction


def feature_columns(features: tuple[str, ...] | list[str] = ("hidden",)) -> list[str]:
    """The shard columns the router's `features` are read from, in the router's input order."""
    from pipeline.config import ROUTER_FEATURES

    names = {"hidden": "slm_hidden", **{f: field.name for f, field in FEATURE_SCHEMA.items()}}
    return [names[f] for f in ROUTER_FEATURES if f in features]


def list_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of equal-length lists -> an (n, width) array."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = len(column[0]) if len(column) else 0
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)


def to_arrays(batch: pa.Table, seed: int, fraction: float, validation: bool,
              features: tuple[str, ...] | list[str] = ("hidden",)) -> dict[str, np.ndarray]:
    """A batch of labelled rows -> {"x": (n, f) float16, the router's `features` side by side in
    its input order, "y": (n,) float32} for one split."""
    keep = np.fromiter((is_validation(i, seed, fraction) == validation
                        for i in batch.column("example_id").to_pylist()), dtype=bool, count=batch.num_rows)
    batch = batch.filter(pa.array(keep))
    x = np.concatenate([list_matrix(batch.column(c)) for c in feature_columns(features)], axis=1)
    return {"x": x, "y": np.asarray(batch.column("label"), dtype=np.float32)}
