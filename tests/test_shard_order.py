"""The order samples are written in: a seeded shuffle over the whole corpus (default), so that a
shard, and each pre-training loader stream's run of consecutive samples, mixes the sources."""
import json

import cv2
import numpy as np
import pytest

from data_tools.build import BuildError, build_shards, write_order
from data_tools.cli import DEFAULT_BUILD_CONFIG
from data_tools.config import ConfigError, load_config
from data_tools.shards import iter_shard
from data_tools.sources import Source
from pretrain.data import PretrainStream, StreamConfig, corpus_order_note, load_shard_set

FRAMES = 30  # per source, 3 sequences of 10


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    sources = []
    for s, name in enumerate(("cars", "ships")):
        for i in range(FRAMES):
            frame = np.random.default_rng([s, i]).integers(0, 256, (64, 80), np.uint8)
            (root / name / f"seq{i // 10}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / name / f"seq{i // 10}" / f"{i % 10:03d}.png"), frame)
        sources.append(Source(name, str(root / name)))
    return root, sources


def _build(root, sources, out, *overrides, workers=1):
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false", "shards.max_samples=10", *overrides])
    return build_shards(sources, cfg, root / out, workers=workers, progress=False)


def _shard_keys(root, out, manifest) -> list[list[str]]:
    return [[key for key, _ in iter_shard(str(root / out / e["shard"]))] for e in manifest["shards"]]


def _samples(root, out, manifest) -> dict[str, dict[str, bytes]]:
    return {key: members for e in manifest["shards"] for key, members in iter_shard(str(root / out / e["shard"]))}


def test_shards_mix_the_sources_in_a_seeded_order(two_sources):
    root, sources = two_sources
    shuffled = _build(root, sources, "shuffled")
    corpus = _build(root, sources, "corpus", "shards.order=corpus")
    by_source = [{key.split("-")[0] for key in keys} for keys in _shard_keys(root, "corpus", corpus)]
    assert by_source == [{"cars"}] * 3 + [{"ships"}] * 3  # source by source: a shard holds one
    mixed = _shard_keys(root, "shuffled", shuffled)
    assert [len(keys) for keys in mixed] == [10] * 6
    assert all({key.split("-")[0] for key in keys} == {"cars", "ships"} for keys in mixed)
    # The same samples, byte for byte, under the same keys; only their order differs.
    assert _samples(root, "shuffled", shuffled) == _samples(root, "corpus", corpus)
    assert shuffled["sources"] == corpus["sources"] and shuffled["totals"] == corpus["totals"]
    # Same seed, same shards whatever the worker count; another seed, another order.
    again = _build(root, sources, "again", workers=2)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in shuffled["shards"]]
    other = _build(root, sources, "other", "shards.seed=1")
    assert _shard_keys(root, "other", other) != mixed
    assert sorted(sum(_shard_keys(root, "other", other), [])) == sorted(sum(mixed, []))


def test_a_loader_stream_run_of_a_shuffled_build_holds_every_source(two_sources):
    """Each stream (rank x loader worker) reads a contiguous run of each pass's samples: from a build in
    corpus order that run, and so every batch it makes, is one source's (here: 4 streams, 15 samples each)."""
    root, sources = two_sources
    cfg = StreamConfig(batch_size=15, batches_per_epoch=1, shuffle_buffer=15)

    def sources_per_stream(out):
        shard_set = load_shard_set(str(root / out))
        return [{key.split("-")[0] for batch in PretrainStream([shard_set], cfg, seed=0, rank=r, world_size=4)
                 for key in batch["keys"]} for r in range(4)]

    _build(root, sources, "stream_corpus", "shards.order=corpus", "shards.max_samples=15")
    assert sorted(sources_per_stream("stream_corpus"), key=sorted) == [{"cars"}, {"cars"}, {"ships"}, {"ships"}]
    _build(root, sources, "stream_shuffled", "shards.max_samples=15")
    assert sources_per_stream("stream_shuffled") == [{"cars", "ships"}] * 4
    # Training says so of a set in corpus order (or built before the setting), and names it.
    corpus_set, shuffled_set = (load_shard_set(str(root / out)) for out in ("stream_corpus", "stream_shuffled"))
    assert (corpus_set.order, shuffled_set.order) == ("corpus", "shuffled")
    assert corpus_order_note([shuffled_set]) is None
    assert "stream_corpus" in corpus_order_note([shuffled_set, corpus_set]) and "--overwrite" in corpus_order_note(
        [corpus_set])
    manifest = json.loads((root / "stream_shuffled" / "manifest.json").read_text())
    del manifest["config"]["shards"]["order"]  # as a build of an earlier version wrote it
    (root / "stream_shuffled" / "manifest.json").write_text(json.dumps(manifest))
    assert load_shard_set(str(root / "stream_shuffled")).order == "corpus"


def test_write_order_is_a_permutation_and_a_resume_continues_it(two_sources):
    order = write_order(1000, {"order": "shuffled", "seed": 3})
    assert sorted(order.tolist()) == list(range(1000)) and order.tolist() != list(range(1000))
    assert np.array_equal(order, write_order(1000, {"order": "shuffled", "seed": 3}))
    assert write_order(5, {"order": "corpus", "seed": 3}).tolist() == [0, 1, 2, 3, 4]
    root, sources = two_sources
    full = _build(root, sources, "full")
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false", "shards.max_samples=10"])
    assert build_shards(sources, cfg, root / "partial", progress=False, stop_after_shards=2)["status"] == "stopped"
    resumed = build_shards(sources, cfg, root / "partial", workers=2, progress=False)
    assert resumed["shards"] == full["shards"]


def test_the_order_is_part_of_the_build_config(two_sources, tmp_path):
    root, sources = two_sources
    with pytest.raises(ConfigError, match="shards.order"):
        _build(root, sources, "bad", "shards.order=random")
    built = _build(root, sources, "kept")
    manifest = json.loads((root / "kept" / "manifest.json").read_text())
    assert manifest["config"]["shards"]["order"] == "shuffled" and manifest["config"]["shards"]["seed"] == 0
    assert built["config_hash"] != _build(root, sources, "kept_corpus", "shards.order=corpus")["config_hash"]


def test_a_resume_on_frames_that_changed_since_is_refused_naming_them(tmp_path):
    """The write order continues where the finished shards end: with frames added or removed since (a
    download still unpacking), its positions name other frames, and the shards would repeat some and
    miss others. Refused, naming the sources and their counts; --overwrite builds it again."""
    root = tmp_path / "frames"
    for i in range(30):
        (root / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
        frame = np.random.default_rng(i).integers(0, 256, (64, 80), np.uint8)
        cv2.imwrite(str(root / f"s{i % 2}" / f"{i:03d}.png"), frame)
    sources = [Source("a", str(root / "s0")), Source("b", str(root / "s1"))]
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false", "shards.max_samples=5"])
    assert build_shards(sources, cfg, tmp_path / "out", progress=False, stop_after_shards=2)["status"] == "stopped"
    cv2.imwrite(str(root / "s1" / "999.png"), np.full((64, 80), 7, np.uint8) + np.eye(64, 80, dtype=np.uint8))
    with pytest.raises(BuildError, match=r"the frames of the sources changed since this build started \(b: 15 then, "
                                         r"16 now\): its 2 finished shard record\(s\) hold frames of the old list"):
        build_shards(sources, cfg, tmp_path / "out", progress=False)
    (root / "s1" / "999.png").rename(root / "s1" / "998.png")
    (root / "s1" / "001.png").unlink()  # the same counts, another frame
    with pytest.raises(BuildError, match="the same counts, other frames"):
        build_shards(sources, cfg, tmp_path / "out", progress=False)
    (root / "s1" / "998.png").unlink()
    cv2.imwrite(str(root / "s1" / "001.png"), np.random.default_rng(1).integers(0, 256, (64, 80), np.uint8))
    resumed = build_shards(sources, cfg, tmp_path / "out", progress=False)  # the frames as they were: resumes
    assert resumed["totals"]["written"] == 30
    assert build_shards(sources, cfg, tmp_path / "whole", progress=False)["shards"] == resumed["shards"]
