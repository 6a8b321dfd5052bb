"""``data.executor=ray``: the partitioned stages as Ray tasks on a local Ray (2 CPUs) write the very shards
one local process writes."""

import json

import pytest

from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data
from tests.conftest import require_module

ray = require_module("ray", "ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_writes_the_same_shards_as_a_local_run(tmp_path, corpus, shared, bpe_path, local_ray):
    base = dict(tokenizer=str(bpe_path), near_dedup=True, val_fraction=0.2, shard_tokens=20_000)
    base.update(worker_memory_mb=1, text_chunk_chars=3000)  # ~1 MB of input: 4 partitions
    sources = [str(corpus), str(shared / "en" / "pg1342_pride_and_prejudice.txt")]
    local = prepare_data(
        DataConfig(**base, executor="local", workers=1), sources, tmp_path / "a", progress=False
    )
    on_ray = prepare_data(
        DataConfig(**base, executor="ray", workers=2), sources, tmp_path / "b", progress=False
    )
    assert on_ray == local and json.loads((tmp_path / "b" / "job.json").read_text())["partitions"] == 4
    for split in local["splits"].values():
        for shard in split["shards"]:
            assert (tmp_path / "b" / shard["file"]).read_bytes() == (
                tmp_path / "a" / shard["file"]
            ).read_bytes()
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report == json.loads((tmp_path / "a" / "report.json").read_text())
