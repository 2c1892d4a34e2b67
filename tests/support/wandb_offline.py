"""Read back what an offline wandb run recorded (the `run-*.wandb` file), without a wandb server.

The file is a 7-byte header (":W&B", magic, version) then LevelDB-log-style records in 32 KiB blocks:
each chunk has a CRC (4 bytes), a length (2, little-endian) and a type (1: full, 2: first, 3: middle,
4: last); the payloads are wandb's `Record` protobuf messages."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER, CHUNK_HEADER = 32768, 7, 7


def records(path: Path):
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending = HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end
            break
        payload = data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def offline_run(run_folder: Path) -> dict:
    """An offline run's name, project, tags, config (updates merged) and number of history rows,
    from its folder (`<WANDB_DIR>/wandb/offline-run-*`)."""
    run_file = next(Path(run_folder).glob("run-*.wandb"))
    found = {"config": {}, "history_steps": 0}
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found.update(name=record.run.display_name, project=record.run.project, tags=list(record.run.tags))
            for item in record.run.config.update:
                found["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                found["config"][item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            found["history_steps"] += 1
    return found
