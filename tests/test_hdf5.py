"""HDF5 data sets: preprocess then train equals the in-memory path; damaged shards are clear errors."""

from __future__ import annotations

import copy
import json

import h5py
import pytest
import torch

from blip.data.hdf5 import H5Store
from blip.errors import DataError
from blip.train.datasets import prepare_data, preprocess
from blip.train.loop import Trainer
from conftest import tiny_config


def _cfg(tmp_path, **training):
    return tiny_config(tmp_path, model={"dtype": "float64"}, data={"max_train": 10},
                       training={"epochs": 1, "batch_size": 4, "tensorboard": False, **training})


def test_preprocess_then_train_equals_the_in_memory_path(tmp_path):
    cfg = _cfg(tmp_path / "mem")
    header = preprocess(cfg, tmp_path / "ds", shard_size=16)  # several shards
    assert len(header["shards"]) > 1 and header["statistics"]["n_train"] == 10
    streamed = copy.deepcopy(_cfg(tmp_path / "h5", num_workers=1))
    streamed["data"]["train_file"] = str(tmp_path / "ds")

    mem_data, h5_data = prepare_data(cfg), prepare_data(streamed)
    assert mem_data.summary == h5_data.summary
    assert [len(s.atoms) for s in mem_data.valid] == [len(s.atoms) for s in h5_data.valid]
    a = Trainer(cfg, progress=False).run(mem_data).members[0].state_dict()
    b = Trainer(streamed, progress=False).run(h5_data).members[0].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_truncated_or_foreign_shard_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path / "run")
    preprocess(cfg, tmp_path / "ds", shard_size=64)
    shard = tmp_path / "ds" / "shard-00000.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard-00000.h5: not a readable HDF5 shard"):
        H5Store(tmp_path / "ds")
    with h5py.File(shard, "w") as f:  # a foreign HDF5 file
        f["x"] = [1, 2, 3]
    with pytest.raises(DataError, match="not a BLIP data shard"):
        H5Store(tmp_path / "ds")
    (tmp_path / "ds" / "header.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a BLIP HDF5 data set header"):
        H5Store(tmp_path / "ds")
