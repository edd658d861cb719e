"""The reference policy's log-probabilities, precomputed once by a Ray Data batch-inference pass over the pairs
(preference.reference: precomputed), so that training holds no reference at all.

    pieces of each source ─► map_batches(pack, tasks): packed into rows exactly as the stream packs them
                         ─► map_batches(Scorer, actors): model.pretrained, a GPU each where the run has GPUs,
                            sums each sequence's completion log-probabilities in the training's precision
                         ─► the driver: one Parquet file per source, (piece, sample, sums) of every packed row

The files are cached next to the run (`<run>/reference/`), named by a fingerprint of everything that fixes them
(the source's shards, pieces and documents, the tokenizer, seq_len, the reference model and precision): a resumed
run reads them back, a changed one computes anew. The stream then puts each sequence's sum on its first token
(`data.pack.reference_column`), where the loss's per-sequence sums read it as if the reference had run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from llmray import storage
from llmray.data.pack import PACKED, Packer, StreamSpec, tokenize_env, tokenizer_stamp

FOLDER = "reference"  # under the run folder
PASS_RECORD = "pass.json"  # in FOLDER: the last pass's rows, seconds and actors


def model_identity(name: str) -> list:
    """What names a version of the reference model: a pinned Hub name or URI as it is; a local folder also by its
    files' sizes and change times (retrained in place: recomputed)."""
    if not os.path.isdir(name):
        return [name]
    return [name] + sorted((f, os.path.getsize(os.path.join(name, f)), os.path.getmtime(os.path.join(name, f)))
                           for f in os.listdir(name) if f.endswith((".safetensors", ".bin", ".json")))


def file_stamp(path: str) -> tuple[int | None, int | None]:
    """(size, change time) of a shard: conversation shards are rewritten in place when their input files change."""
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    return info.size, info.mtime_ns


def fingerprint(spec: StreamSpec, index: int, model: list, precision: str) -> str:
    """The cache name of source `index`'s reference sums: changes with anything that changes its packed rows (its
    shards' files, pieces and documents, the tokenizer, seq_len) or the reference's log-probabilities on them (the
    model's files, the precision)."""
    source = spec.sources[index]
    fixed = {"shards": [(path, *file_stamp(path)) for path in source.shards], "pieces": source.pieces.tolist(),
             "documents": repr(source.documents), "tokenizer": (spec.tokenizer, tokenizer_stamp(spec.tokenizer)),
             "seq_len": spec.seq_len, "model": model, "precision": precision}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pack_pieces(batch: dict, specs: list[StreamSpec]) -> dict[str, np.ndarray]:
    """A Ray Data task: (spec, source, piece) items in, those pieces' packed rows out, each with its ids."""
    parts = []
    for k, index, piece in zip(batch["spec"], batch["source"], batch["piece"]):
        rows = Packer(specs[int(k)]).piece_rows(int(index), 0, int(piece))
        n = len(rows["input_ids"])
        parts.append({"spec": np.full(n, k, dtype=np.int32), "source": np.full(n, index, dtype=np.int32),
                      "piece": np.full(n, piece, dtype=np.int64), "sample": rows["sample"],
                      **{c: rows[c] for c in PACKED}})
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def sequence_sums(model, batch: dict, device: torch.device) -> list[np.ndarray]:
    """Each row's completion log-probability sums, one per packed sequence in id order (the same sums as
    `preference.side_sums`, before they are paired)."""
    from llmray.objectives.preference import sequence_totals, token_log_probs

    def tensor(name):
        return torch.from_numpy(np.array(batch[name], dtype=np.int64)).to(device)

    ids, labels, sequence_ids = tensor("input_ids"), tensor("labels"), tensor("sequence_ids")
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=tensor("position_ids"), use_cache=False).logits
        logps = token_log_probs(logits, labels)
    sums = sequence_totals(logps, sequence_ids, int(sequence_ids.max()) + 1)
    counts = sequence_ids.max(dim=1).values.tolist()
    return [row[1:n + 1].cpu().numpy().astype(np.float32) for row, n in zip(sums, counts)]


class Scorer:
    """A batch-inference actor: the reference model loaded once, scoring batches of packed rows."""

    def __init__(self, pretrained: str, precision: str):
        from llmray.model.build import frozen, frozen_dtype

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = frozen(pretrained, "model.pretrained", self.device, frozen_dtype(precision))

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        sums = sequence_sums(self.model, batch, self.device)
        out = np.empty(len(sums), dtype=object)
        out[:] = sums
        return {"spec": batch["spec"], "source": batch["source"], "piece": batch["piece"], "sample": batch["sample"],
                "sums": out}


def write_sums(path: str, rows: list[tuple[int, int, np.ndarray]]) -> None:
    """One source's (piece, sample, sums) rows as Parquet, written whole or not at all (a pass killed midway leaves
    no file that looks complete)."""
    rows.sort(key=lambda r: (r[0], r[1]))
    table = pa.table({"piece": pa.array([r[0] for r in rows], pa.int64()),
                      "sample": pa.array([r[1] for r in rows], pa.int64()),
                      "sums": pa.array([r[2].tolist() for r in rows], pa.list_(pa.float32()))})
    fs, p = storage.resolve(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    with fs.open_output_stream(p + ".partial") as f:
        pq.write_table(table, f)
    fs.move(p + ".partial", p)


def precompute(specs: list[StreamSpec], run_folder: str, pretrained: str, precision: str, actors: int,
               cpus_per_actor: float, gpus_per_actor: float, batch_rows: int, env: dict) -> list[StreamSpec]:
    """`specs` with their reference sums attached (`StreamSpec.reference`), computing those not cached yet in one
    Ray Data pass."""
    model, folder = model_identity(pretrained), storage.join(run_folder, FOLDER)
    paths = [[storage.join(folder, f"{fingerprint(spec, i, model, precision)}.parquet")
              for i in range(len(spec.sources))] for spec in specs]
    todo = [(k, i) for k, spec in enumerate(specs) for i in range(len(spec.sources))
            if not storage.exists(*storage.resolve(paths[k][i]))]
    if not todo:
        print(f"[llmray] reference log-probabilities: reusing {folder}", flush=True)
    else:
        run_pass(specs, todo, paths, folder, pretrained, precision, actors, cpus_per_actor, gpus_per_actor, batch_rows,
                 env)
    return [dataclasses.replace(spec, reference=tuple(p)) for spec, p in zip(specs, paths)]


def run_pass(specs: list[StreamSpec], todo: list[tuple[int, int]], paths: list[list[str]], folder: str,
             pretrained: str, precision: str, actors: int, cpus_per_actor: float, gpus_per_actor: float, batch_rows: int,
             env: dict) -> None:
    items = [{"spec": k, "source": i, "piece": p} for k, i in todo for p in range(len(specs[k].sources[i].pieces))]
    spec = specs[0]
    started = time.perf_counter()
    each = f"{gpus_per_actor:g} GPU" if gpus_per_actor else f"{cpus_per_actor:g} CPU"
    print(f"[llmray] reference log-probabilities: one pass over {len(items)} pieces of pairs, {actors} actor"
          f"{'s' if actors > 1 else ''} x {each}", flush=True)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * spec.tasks)))
    ds = ds.map_batches(pack_pieces, fn_kwargs={"specs": specs}, batch_size=4, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=max(1, spec.tasks)), num_cpus=spec.cpus_per_task,
                        runtime_env={"env_vars": tokenize_env(spec)})
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"pretrained": pretrained, "precision": precision},
                        batch_size=batch_rows, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                        num_gpus=gpus_per_actor or None, runtime_env={"env_vars": env})
    out: dict[tuple[int, int], list] = {key: [] for key in todo}
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, i, piece, sample, sums in zip(batch["spec"], batch["source"], batch["piece"], batch["sample"],
                                              batch["sums"]):
            out[(int(k), int(i))].append((int(piece), int(sample), np.asarray(sums, dtype=np.float32)))
        rows += len(batch["sample"])
    for (k, i), source_rows in out.items():
        write_sums(paths[k][i], source_rows)
    seconds = time.perf_counter() - started
    fs, path = storage.resolve(storage.join(folder, PASS_RECORD))
    with fs.open_output_stream(path) as f:  # what the pass cost, for people
        f.write(json.dumps({"rows": rows, "seconds": round(seconds, 2), "actors": actors,
                            "gpus_per_actor": gpus_per_actor, "cpus_per_actor": cpus_per_actor}).encode())
    print(f"[llmray] reference log-probabilities: {rows} rows scored in {seconds:.0f}s, "
          f"cached in {folder}", flush=True)

