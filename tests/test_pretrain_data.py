"""The pre-training stream: determinism, rank balance, exact positions, bad input, mixing; the lr schedule."""
import dataclasses
import io
import math
import tarfile

import numpy as np
import pytest
import torch

from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG
from data_tools.config import load_config
from data_tools.manifest import ManifestError
from data_tools.shards import iter_shard, read_indexed_sample
from data_tools.sources import load_sources
from data_tools.synth import SynthConfig, write_corpus
from pretrain.data import (PretrainStream, ShardSet, StreamConfig, batches_per_epoch, load_shard_set,
                          micro_batches_per_epoch)
from pretrain.engine import DataError, EpochLoader, lr_at
from data_tools.transforms import RoICropConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_corpus(root / "synth", SynthConfig(num_images=20, width=96, height=80))
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=5", "proposals.enabled=false"])
    build_shards(load_sources(root / "synth" / "sources.yaml"), cfg, root / "shards", progress=False)
    return load_shard_set(str(root / "shards"))


def stream_cfg(batches, batch_size=2):
    return StreamConfig(batch_size=batch_size, batches_per_epoch=batches, shuffle_buffer=8,
                        roi=RoICropConfig(output_size=(32, 48)))


def run(stream, epoch=0, start=0, positions=None, workers=0):
    return list(EpochLoader(stream, workers).epoch(epoch, start, positions))


def test_same_seed_same_batches_and_epochs_differ(shards):
    a = run(PretrainStream([shards], stream_cfg(5), seed=3))
    b = run(PretrainStream([shards], stream_cfg(5), seed=3))
    assert len(a) == 5 and all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert a[0]["images"].shape == (2, 1, 32, 48)
    c = run(PretrainStream([shards], stream_cfg(5), seed=3), epoch=1)
    assert not torch.equal(a[0]["images"], c[0]["images"])


def test_every_rank_gets_the_same_number_of_batches_with_few_shards(shards, monkeypatch):
    """4 shards, 3 ranks x 2 workers = 6 slots: more slots than shards, and no rank starves."""
    import pretrain.engine.streams

    assert batches_per_epoch([shards], None, world_size=3, batch_size=2) == 20 // (3 * 2)
    bpe = 2  # the trainer rounds to a multiple of the loader workers
    seen = []
    for rank in range(3):
        s = PretrainStream([shards], stream_cfg(bpe), seed=0, rank=rank, world_size=3)
        batches = []
        for worker in range(2):  # what each of this rank's two loader workers yields
            info = type("WorkerInfo", (), {"id": worker, "num_workers": 2})()
            monkeypatch.setattr(pretrain.engine.streams, "get_worker_info", lambda info=info: info)
            batches += list(iter(s))
        assert len(batches) == bpe
        seen += [k for b in batches for k in b["keys"]]
    assert len(seen) == len(set(seen)) == 3 * bpe * 2  # disjoint samples across all six slots


@pytest.mark.parametrize("slots", [1, 3, 6, 7, 20, 25])
def test_slots_split_each_pass_evenly_and_read_only_their_own_samples(shards, slots, monkeypatch):
    """A pass over 20 samples in 4 shards of 5, split among `slots` ranks x loader workers: every
    sample once, each slot 20 // slots of them or one more (one each, repeating, past 20 slots), and
    each slot reads the data of its own samples only, from at most the shards its run touches. With
    whole shards per slot, 6 slots had each read all 4 shards (the corpus once per slot) and 3 slots
    got 10 / 5 / 5 samples."""
    import pretrain.data

    opened, data_read = [], []

    def counting(url, wanted=None):
        opened.append(url)
        for key, members in iter_shard(url, wanted):
            data_read.extend([key] if members is not None else [])
            yield key, members

    monkeypatch.setattr(pretrain.data, "iter_shard", counting)
    stream = PretrainStream([shards], stream_cfg(1), seed=5)
    stream.set_position(epoch=2, start_batch=0)
    per_slot = []
    for slot in range(slots):
        opened.clear()
        data_read.clear()
        keys = [sample["__key__"] for sample in stream._slot_pass(0, slot, slots, 0, {"bad_shard_urls": []})]
        assert data_read == keys  # nothing read but what the slot yields
        share = max(20 // slots, 1)
        assert len(keys) in (share, share + 1) and len(opened) <= -(-len(keys) // 5) + 1
        per_slot.append(keys)
    every = [k for keys in per_slot for k in keys]
    if slots <= 20:
        assert len(every) == len(set(every)) == 20
    else:  # the repeats spread over the pass, not piled on its first sample
        assert len(set(every)) == 20 and len(every) == slots
        assert max(every.count(k) for k in every) <= -(-slots // 20) + 1


def test_a_slot_reads_other_shards_each_epoch_and_each_pass(shards):
    """The shard order is drawn anew for each epoch and each pass of a slot over its share, as a
    distributed sampler reshuffles every epoch: a slot (a rank's loader worker) does not see the same
    half of the corpus every epoch, nor a slot that cycles its share the same samples in each pass."""
    stream = PretrainStream([shards], stream_cfg(1), seed=5)

    def share(epoch: int, cycle: int) -> frozenset:
        stream.set_position(epoch=epoch, start_batch=0)
        return frozenset(s["__key__"] for s in stream._slot_pass(0, 0, 2, cycle, {"bad_shard_urls": []}))

    assert share(0, 0) == share(0, 0) and len(share(0, 0)) == 10
    assert len({share(epoch, 0) for epoch in range(4)}) > 1
    assert len({share(0, cycle) for cycle in range(4)}) > 1
    # one shard: each pass holds the same samples, shuffled in another order
    one = dataclasses.replace(shards, urls=shards.urls[:1], samples=shards.shard_samples[0],
                              shard_samples=shards.shard_samples[:1])
    single = PretrainStream([one], stream_cfg(1), seed=5)
    single.set_position(epoch=0, start_batch=0)
    passes = single._slot_stream(0, 0, 1, {"bad_shard_urls": []})
    first, second = ([next(passes)["__key__"] for _ in range(5)] for _ in range(2))
    assert sorted(first) == sorted(second) and first != second


def test_resume_at_saved_positions_replays_exactly(shards):
    full = run(PretrainStream([shards], stream_cfg(8), seed=1), workers=2)
    assert [b["batch"] for b in full] == list(range(8)) and [b["worker"] for b in full] == [0, 1] * 4
    positions = [0, 0]
    for b in full[:5]:
        positions[b["worker"]] = b["position"]
    resumed = run(PretrainStream([shards], stream_cfg(8), seed=1), start=5, positions=positions, workers=2)
    assert [b["batch"] for b in resumed] == [5, 6, 7]
    for x, y in zip(full[5:], resumed):
        assert torch.equal(x["images"], y["images"])


def test_an_epoch_is_whole_steps_whatever_the_loader_workers():
    """MSIP (178,756 frames) at PAD's 4,096 samples a step is 43 steps an epoch, as MAE's loop takes them
    (a step every `accum` micro-batches of a drop_last loader), on 1, 8 or 32 GPUs; rounding the
    micro-batches to a multiple of accumulation x loader workers (4) had made it 40."""
    msip = [ShardSet("msip", ("a.tar",), 178_756, shard_samples=(178_756,))]
    for world, micro, accum in ((1, 64, 64), (8, 64, 8), (32, 32, 4), (64, 64, 1)):
        assert micro_batches_per_epoch(msip, None, world, micro, accum) // accum == 178_756 // 4096 == 43
    assert micro_batches_per_epoch(msip, 4096, 1, 64, 64) == 64 and micro_batches_per_epoch(msip, 4095, 1, 64, 64) == 0


@pytest.mark.parametrize("batch_size", [2, 3])
def test_loader_workers_may_yield_a_micro_batch_more_than_another(shards, batch_size):
    """7 micro-batches with 2 loader workers: worker 0 yields 4, worker 1 three, in order, epoch after
    epoch; at 3 samples a batch worker 0 needs 12 of its run of 10 and goes on into its next pass. A
    resume inside the epoch replays the same batches."""
    loader = EpochLoader(PretrainStream([shards], stream_cfg(7, batch_size), seed=2), 2)
    epochs = [list(loader.epoch(e, 0, None)) for e in (0, 1)]
    for batches in epochs:
        assert [b["batch"] for b in batches] == list(range(7)) and [b["worker"] for b in batches] == [0, 1] * 3 + [0]
    assert not torch.equal(epochs[0][0]["images"], epochs[1][0]["images"])
    first, second = ([k for b in epochs[0] if b["worker"] == w for k in b["keys"]] for w in (0, 1))
    assert (len(first), len(second)) == (4 * batch_size, 3 * batch_size)
    run = first[:10]  # its own run of the pass, each sample once, none of the other worker's
    assert len(set(run)) == len(run) and set(run).isdisjoint(second) and len(set(second)) == len(second)
    for start in (3, 4, 6):
        positions = [0, 0]
        for b in epochs[0][:start]:
            positions[b["worker"]] = b["position"]
        resumed = list(EpochLoader(PretrainStream([shards], stream_cfg(7, batch_size), seed=2), 2).epoch(
            0, start, positions))
        assert [b["batch"] for b in resumed] == list(range(start, 7))
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(epochs[0][start:], resumed))


def test_a_resume_reads_none_of_the_samples_it_skips(shards, monkeypatch):
    """A resume inside an epoch walks its stream up to the saved position to rebuild the shuffle
    buffer; the samples passed are not read (only their tar headers), the buffer's are read as they are
    used: the same batches, and per sample used at most one read more (the one that entered the buffer)."""
    import pretrain.data

    full = run(PretrainStream([shards], stream_cfg(8), seed=1))
    reads = []

    def counting(url, wanted=None):
        for key, members in iter_shard(url, wanted):
            reads.extend([key] if members is not None else [])
            yield key, members

    left = []

    def counting_one(url, members):
        reads.append(members[0].name)
        left.append(members[0].name)
        return read_indexed_sample(url, members)

    monkeypatch.setattr(pretrain.data, "iter_shard", counting)
    monkeypatch.setattr(pretrain.data, "read_indexed_sample", counting_one)
    pretrain.data._shard_index.cache_clear()
    resumed = run(PretrainStream([shards], stream_cfg(8), seed=1), start=5, positions=[full[4]["position"]])
    assert [b["batch"] for b in resumed] == [5, 6, 7] and full[4]["position"] == 10
    for x, y in zip(full[5:], resumed):
        assert torch.equal(x["images"], y["images"]) and x["keys"] == y["keys"]
    assert 6 <= len(reads) <= 12  # 6 samples used; the skipped 10 and the buffer's unused ones not read
    index = pretrain.data._shard_index.cache_info()  # each shard's headers walked once for its left samples
    assert left and index.misses <= len(shards.urls) and index.hits + index.misses == len(left)


def test_a_skipped_sample_whose_shard_went_since_is_a_bad_sample(shards, tmp_path):
    from data_tools.shards import SampleDecodeError
    from pretrain.data import _read_if_left

    first_key = next(iter_shard(shards.urls[0]))[0]
    assert _read_if_left({"__key__": "k", "__at__": (shards.urls[0], 0)})["__key__"] == first_key
    with pytest.raises(SampleDecodeError, match="cannot be read again"):
        _read_if_left({"__key__": "k", "__at__": (str(tmp_path / "gone.tar"), 0)})
    with pytest.raises(SampleDecodeError, match="ended before it"):
        _read_if_left({"__key__": "k", "__at__": (shards.urls[0], 99)})


def test_resume_needs_positions_and_the_same_worker_count(shards):
    s = PretrainStream([shards], stream_cfg(4), seed=0)
    with pytest.raises(ValueError, match="positions"):
        s.set_position(0, 2, None)
    with pytest.raises(ValueError, match="num_workers=3"):
        run(s, start=2, positions=[4, 4, 4], workers=0)


def _copy_with_bad_frames(src: str, dst: str, bad=lambda i: i == 1) -> list[str]:
    """Same tar, with the frame (PNG or raw) of each sample i where ``bad(i)`` replaced by garbage
    (by default the second's); returns their keys."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        names, replaced = [], []
        for m in tin:
            data = tin.extractfile(m).read()
            key = m.name.split(".")[0]
            if key not in names:
                names.append(key)
            if bad(len(names) - 1) and m.name.split(".", 1)[1] in ("png", "npy"):
                data = b"not a png at all"
                replaced.append(key)
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    return replaced


def test_corrupt_samples_and_shards_are_counted_and_skipped(shards, tmp_path):
    bad_sample = tmp_path / "bad_sample.tar"
    _copy_with_bad_frames(shards.urls[0], str(bad_sample))
    truncated = tmp_path / "truncated.tar"
    data = open(shards.urls[1], "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    missing = str(tmp_path / "missing.tar")
    # Cut at a third: with raw frames that is a tar block boundary, which reads as a valid, shorter
    # tar; the manifest's per-shard counts tell it is truncated.
    urls = (str(bad_sample), str(truncated), missing, *shards.urls[2:])
    mixed = ShardSet("mixed", urls, 20, shard_samples=(5,) * len(urls))
    out = run(PretrainStream([mixed], stream_cfg(6), seed=0))
    assert len(out) == 6  # the stream still fills every batch
    assert sum(b["bad_samples"] for b in out) >= 1
    assert sum(b["bad_shards"] for b in out) >= 2  # the truncated and the missing shard
    assert {url for b in out for url in b["bad_shard_urls"]} == {str(truncated), missing}  # each named


def test_a_set_with_nothing_readable_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
    bad = ShardSet("junk", (str(tmp_path / "junk.tar"),), 10, shard_samples=(10,))
    with pytest.raises(DataError, match="no readable sample"):  # the user's data: one line, no traceback
        run(PretrainStream([bad], stream_cfg(2), seed=0))


def test_weighted_mixing_of_shard_sets(shards, tmp_path):
    write_corpus(tmp_path / "other", SynthConfig(num_images=10, width=96, height=80, seed=9))
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=5", "proposals.enabled=false"])
    (tmp_path / "s.yaml").write_text(f"sources:\n  - {{name: other, root: {tmp_path / 'other' / 'ir'}}}\n")
    build_shards(load_sources(tmp_path / "s.yaml"), cfg, tmp_path / "other_shards", progress=False)
    other = load_shard_set(str(tmp_path / "other_shards"), weight=1.0)
    a = ShardSet(shards.name, shards.urls, shards.samples, weight=3.0, shard_samples=shards.shard_samples)
    s = PretrainStream([a, other], stream_cfg(1), seed=0)
    counters = {"bad_shards": 0, "bad_samples": 0}
    keys = [next(it)["__key__"] for it in [s._mixed_stream(0, 1, counters)] for _ in range(400)]
    share = np.mean([k.startswith("synth") for k in keys])
    assert abs(share - 0.75) < 0.06
    # each slot draws its own sequence of sets (not every slot the same set at the same place)
    slots = [[next(it)["__key__"].startswith("synth") for _ in range(50)]
             for it in (s._mixed_stream(slot, 2, counters) for slot in range(2))]
    assert slots[0] != slots[1]


def test_missing_or_unfinished_shard_folder(tmp_path):
    import subprocess
    import sys

    from data_tools.config import CONFIG_DIR

    with pytest.raises(ManifestError, match="no manifest.json"):
        load_shard_set(str(tmp_path))
    (tmp_path / "out" / "shards").mkdir(parents=True)  # the parent of a build given: the build is named
    (tmp_path / "out" / "shards" / "manifest.json").write_text('{"status": "complete"}')
    shards = f"data.shards=[{{path: {tmp_path / 'out'}, weight: 1.0}}]"
    res = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config",
                          str(CONFIG_DIR / "pretrain" / "tiny.yaml"), "--run-dir", str(tmp_path / "run"), shards],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"; the shard folder(s) below it: {tmp_path / 'out' / 'shards'}: give one" in res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory
    (tmp_path / "manifest.json").write_text('{"status": "building"}')
    with pytest.raises(ValueError, match="not complete"):
        load_shard_set(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"status": "compl')  # cut short by hand: our writes are atomic
    with pytest.raises(ManifestError, match="manifest.json is not readable JSON .*; rebuild the shards"):
        load_shard_set(str(tmp_path))


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(32, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert lr_at(150, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)  # past the end: the cosine does not rise again


def test_persistent_workers_follow_the_position_across_epochs(shards):
    """One loader, workers spawned once: each epoch (and a resume inside one) starts where told."""
    ref = [run(PretrainStream([shards], stream_cfg(4), seed=5), epoch=e, workers=2) for e in (0, 1)]
    loader = EpochLoader(PretrainStream([shards], stream_cfg(4), seed=5), 2)
    got0 = list(loader.epoch(0))
    positions = [0, 0]
    for b in ref[1][:3]:
        positions[b["worker"]] = b["position"]
    got1 = list(loader.epoch(1, 3, positions))
    assert [b["keys"] for b in got0] == [b["keys"] for b in ref[0]]
    assert [b["keys"] for b in got1] == [b["keys"] for b in ref[1][3:]]


def test_a_failing_transform_raises_with_the_sample_key_instead_of_spinning(shards):
    """A crop size of 0 fails on every sample: that is a setting, not bad data. Before, every
    exception counted as a bad sample and the stream retried forever."""
    cfg = StreamConfig(batch_size=2, batches_per_epoch=2, shuffle_buffer=4, roi=RoICropConfig(output_size=(0, 0)))
    with pytest.raises(RuntimeError, match=r"transform failed on sample synth-\d+"):
        run(PretrainStream([shards], cfg, seed=0))


def test_undecodable_samples_are_bounded(tmp_path):
    """Shards whose every frame is garbage: skipped and counted up to a bound, then one error."""
    import pretrain.data

    root = tmp_path / "bad"
    write_corpus(root / "synth", SynthConfig(num_images=6, width=96, height=80))
    build_shards(load_sources(root / "synth" / "sources.yaml"),
                 load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"]), root / "shards", progress=False)
    good = load_shard_set(str(root / "shards"))
    _copy_with_bad_frames(good.urls[0], str(tmp_path / "garbage.tar"), bad=lambda i: True)
    garbage = ShardSet("garbage", (str(tmp_path / "garbage.tar"),), 6, shard_samples=(6,))
    with pytest.raises(DataError, match=f"{pretrain.data.MAX_CONSECUTIVE_BAD_SAMPLES} consecutive samples "
                                           r"failed to decode, the last: sample synth-\d+"):
        run(PretrainStream([garbage], stream_cfg(2), seed=0))
    # every other frame garbage: the bound is on bad samples in a row, not in all; each is counted
    assert len(_copy_with_bad_frames(good.urls[0], str(tmp_path / "half.tar"), bad=lambda i: i % 2)) == 3
    half = ShardSet("half", (str(tmp_path / "half.tar"),), 6, shard_samples=(6,))
    batches = run(PretrainStream([half], stream_cfg(4, batch_size=40), seed=0))
    assert sum(b["bad_samples"] for b in batches) > pretrain.data.MAX_CONSECUTIVE_BAD_SAMPLES


def test_each_slot_draws_its_own_crops(shards, monkeypatch):
    """Sample i of two ranks' streams gets a crop and flip drawn from generators of their own (seeded
    by rank and loader worker as well as the position), not the same draws on other frames."""
    import pretrain.data

    draws = []
    real_crop = pretrain.data.object_sensitive_crop

    def recording(image, proposals, rng, cfg):
        draws.append(rng.bit_generator.state["state"]["state"])  # where the sample's generator starts
        return real_crop(image, proposals, rng, cfg)

    monkeypatch.setattr(pretrain.data, "object_sensitive_crop", recording)
    per_rank = []
    for rank in range(2):
        draws.clear()
        run(PretrainStream([shards], stream_cfg(2), seed=0, rank=rank, world_size=2))
        per_rank.append(list(draws))
    assert len(per_rank[0]) == len(per_rank[1]) == 4 and per_rank[0] != per_rank[1]


def test_previews_skip_a_corrupt_frame_like_training_does(shards, tmp_path, capsys):
    """The reconstruction preview reads the shards with the training stream's reader and rule:
    a corrupt frame (here the second sample's) is skipped with a warning, not a crash."""
    from pretrain.preview import fixed_frames

    bad = tmp_path / "bad.tar"
    [bad_key] = _copy_with_bad_frames(shards.urls[0], str(bad))
    frames = fixed_frames([str(bad), str(tmp_path / "missing.tar"), *shards.urls[1:]], 6, (32, 48), 0.3801, 0.1871)
    assert frames.shape == (6, 1, 32, 48)
    err = capsys.readouterr().err
    assert "skipped" in err and bad_key in err and "missing.tar" in err


def test_a_bad_shard_counts_once_however_often_it_is_read(shards, tmp_path, capsys):
    """One truncated shard read in 3 epochs (and once more on each pass) is one bad shard, named."""
    from pretrain.engine.loop import new_state, note_bad_shards

    truncated = tmp_path / "truncated.tar"
    data = open(shards.urls[1], "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    urls = (shards.urls[0], str(truncated), *shards.urls[2:])
    mixed = ShardSet("mixed", urls, 20, shard_samples=(5,) * len(urls))
    state = new_state(1)
    reads = 0
    for epoch in range(3):
        for batch in run(PretrainStream([mixed], stream_cfg(6), seed=0), epoch=epoch):
            reads += batch["bad_shards"]
            note_bad_shards(state, batch["bad_shard_urls"], rank=0)
    assert reads >= 3 and state["bad_shards"] == 1 and state["bad_shard_names"] == [str(truncated)]
    assert capsys.readouterr().err.count("truncated.tar is unreadable or truncated") == 1


def test_a_fine_tuning_stream_whose_frames_all_fail_is_a_data_error():
    """Frames moved or deleted while a fine-tuning run trains: each is counted and replaced by the
    next, and when none loads any more, a DataError (said in one line) instead of a spin or a bug's
    traceback."""
    from finetune.data.stream import MapBatchStream

    class Gone:
        listed = 0

        def __len__(self):
            return 4

        def names(self):  # a list of every frame: built once, for the message, not per failed frame
            Gone.listed += 1
            return [f"frame{i}" for i in range(4)]

        def train_sample(self, i, rng):
            raise FileNotFoundError(f"frame{i}.png")

    with pytest.raises(DataError, match=r"could be loaded any more \(the last, frame(\d): frame\1\.png\)"):
        next(iter(MapBatchStream(Gone(), batch_size=2, seed=0)))
    assert Gone.listed == 1
