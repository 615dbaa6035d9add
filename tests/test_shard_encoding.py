"""Shard frame encodings (png | raw): the same batches for the same seed, verify and reencode
round trips, the batched network conversion against the per-sample one, real shards."""
import filecmp

import numpy as np
import pytest
import torch

from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG, main as data_main
from data_tools.config import load_config
from data_tools.shards import decode_image, decode_sample, iter_shard
from data_tools.sources import Source, load_sources
from data_tools.synth import SynthConfig, write_corpus
from data_tools.transforms import RoICropConfig, normalize_ir, to_unit_intensity
from data_tools.verify import verify_shards
from pretrain.data import PretrainStream, StreamConfig, load_shard_set
from pretrain.engine import EpochLoader
from tests.conftest import folder_locked_by_another_process, shared_path


def _build(sources, out, encoding, *overrides):
    cfg = load_config(DEFAULT_BUILD_CONFIG, [f"shards.encoding={encoding}", "shards.max_samples=6", *overrides])
    return build_shards(sources, cfg, out, progress=False)


@pytest.fixture(scope="module", params=[8, 16], ids=["8bit", "16bit"])
def both_encodings(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"enc{request.param}")
    write_corpus(root / "synth", SynthConfig(num_images=14, width=96, height=80, bit_depth=request.param))
    sources = load_sources(root / "synth" / "sources.yaml")
    for encoding in ("png", "raw"):
        _build(sources, root / encoding, encoding)
    return root, request.param


def _batches(folder, seed=7, batches=4):
    cfg = StreamConfig(batch_size=3, batches_per_epoch=batches, shuffle_buffer=5, roi=RoICropConfig(output_size=(32, 48)))
    return list(EpochLoader(PretrainStream([load_shard_set(str(folder))], cfg, seed), 0).epoch(0))


def test_same_seed_gives_identical_batches_from_png_and_raw(both_encodings):
    root, bits = both_encodings
    png, raw = _batches(root / "png"), _batches(root / "raw")
    assert len(png) == len(raw) == 4
    for a, b in zip(png, raw):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
        # 8-bit crops travel as uint8 (a quarter of the bytes), 16-bit ones as float32.
        assert a["images"].dtype == (torch.uint8 if bits == 8 else torch.float32)
        assert a["bad_samples"] == b["bad_samples"] == 0
    first = next(iter_shard(str(root / "raw" / "shard-000000.tar")))[1]
    assert "npy" in first and "png" not in first and decode_image(first).dtype == (np.uint8 if bits == 8 else np.uint16)


def test_verify_and_reencode_round_trip(both_encodings, tmp_path):
    root, _ = both_encodings
    assert verify_shards(root / "raw") == [] and verify_shards(root / "png") == []
    assert data_main(["reencode", str(root / "png"), "--out", str(tmp_path / "to_raw"), "--encoding", "raw"]) == 0
    assert data_main(["reencode", str(tmp_path / "to_raw"), "--out", str(tmp_path / "back"), "--encoding", "png"]) == 0
    assert verify_shards(tmp_path / "to_raw") == [] and verify_shards(tmp_path / "back") == []
    for name in sorted(p.name for p in (root / "png").glob("*.tar")):
        # PNG -> raw equals a raw build, byte for byte; raw -> PNG gives back the original shards.
        assert filecmp.cmp(root / "raw" / name, tmp_path / "to_raw" / name, shallow=False)
        assert filecmp.cmp(root / "png" / name, tmp_path / "back" / name, shallow=False)
        for (k1, m1), (k2, m2) in zip(iter_shard(str(root / "png" / name)), iter_shard(str(tmp_path / "to_raw" / name))):
            a, pa, ma = decode_sample(m1)
            b, pb, mb = decode_sample(m2)
            assert k1 == k2 and np.array_equal(a, b) and a.dtype == b.dtype and np.array_equal(pa, pb) and ma == mb
    # A reencoded folder is what `build` with that encoding makes: the same manifest (but for where it came
    # from) and config.yaml, a shard folder to every tool.
    import json

    from data_tools.files import folder_kind

    reencoded = load_shard_set(str(tmp_path / "to_raw"))
    assert reencoded.samples == 14 and sum(reencoded.shard_samples) == 14
    built, made = (json.loads((folder / "manifest.json").read_text()) for folder in (root / "raw", tmp_path / "to_raw"))
    png_hash = json.loads((root / "png" / "manifest.json").read_text())["config_hash"]
    assert made.pop("reencoded_from") == {"folder": str(root / "png"), "config_hash": png_hash}
    assert made == built
    assert (tmp_path / "to_raw" / "config.yaml").read_text() == (root / "raw" / "config.yaml").read_text()
    assert folder_kind(tmp_path / "to_raw") == "shards"


def test_reencode_refusals(both_encodings, tmp_path, capsys):
    root, _ = both_encodings
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert data_main(["reencode", str(root / "png"), "--out", str(tmp_path / "full"), "--encoding", "raw"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert data_main(["reencode", str(tmp_path), "--out", str(tmp_path / "o"), "--encoding", "raw"]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_reencode_to_another_png_level_and_its_refusals(both_encodings, tmp_path, monkeypatch):
    import errno
    import json

    import data_tools.reencode as reencode
    from data_tools.reencode import ReencodeError, reencode_shards

    root, _ = both_encodings
    for level in (0, 9):
        m = reencode_shards(root / "raw", tmp_path / f"png{level}", "png", png_compression=level)
        assert m["config"]["shards"]["png_compression"] == level and verify_shards(tmp_path / f"png{level}") == []
    assert m["config_hash"] != json.loads((root / "png" / "manifest.json").read_text())["config_hash"]
    sizes = {level: sum(p.stat().st_size for p in (tmp_path / f"png{level}").glob("*.tar")) for level in (0, 9)}
    assert sizes[0] > sizes[9]
    with pytest.raises(ReencodeError, match=r"encoding must be one of \['png', 'raw'\], got 'jpeg'"):
        reencode_shards(root / "raw", tmp_path / "jpeg", "jpeg")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "shard-000000.tar.tmp").write_bytes(b"part")  # killed inside its first shard
    with pytest.raises(ReencodeError, match="holds 1 shard files but no manifest.json: a conversion that was stopped"):
        reencode_shards(root / "raw", tmp_path / "cut", "png")
    m = json.loads((root / "raw" / "manifest.json").read_text())
    m["shards"][1]["samples"] += 1
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for p in (root / "raw").glob("*.tar"):
        (fewer / p.name).write_bytes(p.read_bytes())
    (fewer / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ReencodeError, match="shard-000001.tar: read 6 samples, the manifest lists 7"):
        reencode_shards(fewer, tmp_path / "from_fewer", "png")

    def disk_full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device", self.tmp_path)

    monkeypatch.setattr(reencode.ShardFile, "write", disk_full)
    with pytest.raises(ReencodeError, match=f"writing {tmp_path / 'full'} failed \\(No space left on device: "
                                            f".*shard-000000.tar.tmp\\): free space"):
        reencode_shards(root / "raw", tmp_path / "full", "png")
    assert not list((tmp_path / "full").glob("*.tar*"))  # the shard begun is removed


def test_a_stopped_reencode_is_named_and_a_live_one_refused(both_encodings, tmp_path, monkeypatch, capsys):
    import shutil

    import data_tools.reencode as reencode

    root, _ = both_encodings
    real_encode, calls = reencode.encode_image, []

    def encode_then_stop(*args):
        calls.append(1)
        if len(calls) == 8:  # in the second shard: the first is finished, the manifest never written
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(reencode, "encode_image", encode_then_stop)
    assert data_main(["reencode", str(root / "png"), "--out", str(tmp_path / "out"), "--encoding", "raw"]) == 130
    assert capsys.readouterr().err == (f"interrupted: {tmp_path / 'out'} holds part of the conversion: remove the "
                                       "folder and run again\n")  # Ctrl-C: one line, no traceback
    monkeypatch.setattr(reencode, "encode_image", real_encode)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "shard-000000.tar"]
    assert data_main(["reencode", str(root / "png"), "--out", str(tmp_path / "out"), "--encoding", "raw"]) == 2
    assert "holds 1 shard files but no manifest.json: a conversion that was stopped" in capsys.readouterr().err

    shutil.rmtree(tmp_path / "out")
    with folder_locked_by_another_process(tmp_path / "out") as pid:
        assert data_main(["reencode", str(root / "png"), "--out", str(tmp_path / "out"), "--encoding", "raw"]) == 2
        assert f"is in use by PID {pid} on " in capsys.readouterr().err
    assert data_main(["reencode", str(root / "png"), "--out", str(tmp_path / "out"), "--encoding", "raw"]) == 0
    assert verify_shards(str(tmp_path / "out")) == []


def test_a_reader_of_a_folder_being_built_is_told_to_wait(tmp_path):
    """A training (or reencode, verify) started on a shard folder while its build still runs."""
    import json

    from data_tools.manifest import ManifestError, read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"status": "building"}))
    with pytest.raises(ManifestError, match="not complete .status 'building'.; rerun it to finish"):
        read_manifest(tmp_path)  # no build holds it: one that was stopped
    with folder_locked_by_another_process(tmp_path) as pid:
        with pytest.raises(ManifestError, match=rf"a shard build is writing it now \(PID {pid} on .*wait for"):
            read_manifest(tmp_path)
        with pytest.raises(ValueError, match="a shard build is writing it now"):
            load_shard_set(str(tmp_path))
    with pytest.raises(ManifestError, match="rerun it to finish"):
        read_manifest(tmp_path)


def test_a_raw_member_never_unpickles_and_must_be_a_frame():
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickled object array
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_image({"npy": buf.getvalue()})
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="expected 2-D uint8 or uint16"):
        decode_image({"npy": buf.getvalue()})
    with pytest.raises(ValueError, match="frame members"):
        decode_image({"npy": b"", "png": b""})


def test_shipped_uint8_batches_become_the_per_sample_network_input():
    """8-bit crops ship as uint8 and become float32 in network_input, with exactly the numbers of
    the per-sample numpy conversion (to_unit_intensity, then PAD's mean / std)."""
    from pretrain.data import network_input

    stream = PretrainStream.__new__(PretrainStream)
    stream.cfg = StreamConfig()
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (16, 24), dtype=np.uint8) for _ in range(5)]
    per_sample = np.stack([normalize_ir(to_unit_intensity(c), 0.3801, 0.1871) for c in crops])[:, None]
    shipped = stream._to_network(crops)
    assert shipped.dtype == torch.uint8 and shipped.shape == (5, 1, 16, 24)
    net = network_input(shipped, 0.3801, 0.1871)
    assert net.dtype == torch.float32 and np.array_equal(net.numpy(), per_sample.astype(np.float32))
    crops16 = [rng.integers(0, 65536, (16, 24), dtype=np.uint16) for _ in range(3)]  # per-crop percentiles
    expected = np.stack([normalize_ir(to_unit_intensity(c), 0.3801, 0.1871) for c in crops16])[:, None]
    shipped16 = stream._to_network(crops16)
    assert shipped16.dtype == torch.float32 and torch.equal(network_input(shipped16, 0.3801, 0.1871),
                                                            torch.from_numpy(expected.astype(np.float32)))


def test_real_frames_raw_equals_png(tmp_path):
    root = shared_path("msrs20", "ir")
    sources = [Source("msrs", str(root), stride=4)]
    png, raw = _build(sources, tmp_path / "png", "png"), _build(sources, tmp_path / "raw", "raw")
    assert png["encoding"] == "png" and raw["encoding"] == "raw"
    assert raw["totals"]["bytes"] > png["totals"]["bytes"]  # the size cost of raw frames
    assert [s["first_key"] for s in png["shards"]] == [s["first_key"] for s in raw["shards"]]
    a, b = _batches(tmp_path / "png", batches=1), _batches(tmp_path / "raw", batches=1)
    assert torch.equal(a[0]["images"], b[0]["images"])


@pytest.mark.parametrize("members,said", [
    ({"png": b""}, "ValueError: image member is empty"),  # was OpenCV's assertion, a crash of the loader
    ({"png": b"\x89PNG\r\n\x1a\n" + bytes(40)}, "ValueError: image bytes do not decode as PNG"),
    ({"npy": b""}, "EOFError: No data left in file"),  # numpy's word for an empty .npy
    ({"npy": "cut"}, "ValueError: EOF: reading array data"),
    ({"png": "frame", "proposals.npy": b""}, "EOFError: No data left in file"),
    ({"png": "frame", "proposals.npy": None}, "KeyError: 'proposals.npy'"),
    ({"png": "frame", "npy": "frame"}, "ValueError: sample has 2 frame members"),
])
def test_each_damaged_member_is_a_decode_error_naming_the_sample(members, said):
    """What the training loader skips and counts (never a crash of a loader worker): every way a stored
    member fails to decode is a SampleDecodeError that names the sample."""
    from data_tools.shards import SampleDecodeError, decode_for_training, encode_image, npy_bytes

    frame = np.arange(48, dtype=np.uint8).reshape(6, 8)
    made = {"png": encode_image(frame, "png")[1], "npy": encode_image(frame, "raw")[1]}
    sample = {"__key__": "cam-00000003", "proposals.npy": npy_bytes(np.zeros((0, 4), np.int32))}
    for ext, data in members.items():
        if data is None:
            sample.pop(ext)
        else:
            sample[ext] = made[ext] if data == "frame" else made[ext][:-4] if data == "cut" else data
    with pytest.raises(SampleDecodeError, match=f"^sample cam-00000003: {said}"):
        decode_for_training(sample)


def test_a_frame_encodes_to_the_same_bytes_whatever_its_memory_layout():
    """Byte-identical shards for the same samples: a transposed or sliced view of a frame stores as
    its contiguous copy does (numpy would otherwise write a Fortran-ordered header)."""
    from data_tools.shards import encode_image

    frame = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    for view in (frame.T, frame[::2, 1:]):
        for encoding in ("raw", "png"):
            assert encode_image(view, encoding) == encode_image(np.ascontiguousarray(view), encoding)
    assert decode_image({"npy": encode_image(frame.T, "raw")[1]}).flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match=r"shards.encoding must be one of \['png', 'raw'\], got 'jpeg'"):
        encode_image(frame, "jpeg")


def test_the_png_compression_level_changes_the_bytes_not_the_frame():
    from data_tools.shards import encode_image

    frame = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
    stored = {level: encode_image(frame, "png", level)[1] for level in (0, 9)}
    assert len(stored[0]) > 2 * len(stored[9])
    for data in stored.values():
        np.testing.assert_array_equal(decode_image({"png": data}), frame)


@pytest.mark.parametrize("array", [np.zeros((2, 3, 3), np.uint8), np.zeros((4, 5), np.float32),
                                   np.zeros((4, 5), np.int16), np.zeros(20, np.uint16)])
def test_a_raw_member_must_be_one_channel_of_8_or_16_bits(array):
    from data_tools.shards import npy_bytes

    with pytest.raises(ValueError, match=f"and dtype {array.dtype}: expected 2-D uint8 or uint16"):
        decode_image({"npy": npy_bytes(array)})


def test_a_sample_stores_int32_boxes_and_canonical_metadata():
    """Same sample, same bytes: boxes as (N, 4) int32 whatever they came as, metadata JSON with
    sorted keys and no spaces (the tar's sha256 in the manifest depends on it)."""
    from data_tools.shards import encode_sample, npy_array

    sample = encode_sample("cam-00000001", "png", b"frame", np.array([1, 2, 3, 4, 5, 6, 7, 8], np.int64),
                           {"source": "cam", "frame": 1, "crop": [0, 0]})
    boxes = npy_array(sample["proposals.npy"])
    assert boxes.dtype == np.int32 and boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert sample["json"] == b'{"crop":[0,0],"frame":1,"source":"cam"}'
    assert (sample["__key__"], sample["png"]) == ("cam-00000001", b"frame")


def test_a_sample_without_its_boxes_or_metadata_is_named_so():
    from data_tools.shards import encode_image, npy_bytes

    png = encode_image(np.zeros((4, 4), np.uint8), "png")[1]
    with pytest.raises(ValueError, match=r"sample lacks member\(s\) \['proposals.npy', 'json'\]"):
        decode_sample({"png": png})
    with pytest.raises(ValueError, match=r"sample lacks member\(s\) \['json'\]"):
        decode_sample({"png": png, "proposals.npy": npy_bytes(np.zeros((0, 4), np.int32))})


def test_a_shards_counted_bytes_are_its_tar_less_the_end_blocks(tmp_path):
    """``shards.max_bytes`` cuts shards by this count: every member's 512-byte header and its data
    padded to whole 512-byte blocks; the tar then ends with two zero blocks, padded to a 10 KiB record."""
    import math
    import tarfile

    from data_tools.shards import ShardFile

    shard = ShardFile(str(tmp_path / "s.tar"))
    for index, size in enumerate((0, 1, 511, 512, 513, 5000)):
        shard.write({"__key__": f"k-{index}", "png": bytes(size), "json": b"{}"})
    sha = shard.close()
    assert shard.bytes == sum(512 + math.ceil(size / 512) * 512 for size in (0, 1, 511, 512, 513, 5000)) + 6 * 1024
    record = tarfile.RECORDSIZE
    assert (tmp_path / "s.tar").stat().st_size == math.ceil((shard.bytes + 1024) / record) * record
    assert shard.count == 6 and shard.keys == [f"k-{i}" for i in range(6)] and len(sha) == 64
    assert not (tmp_path / "s.tar.tmp").exists()
    with tarfile.open(tmp_path / "s.tar") as tar:
        headers = {(info.mode, info.mtime, info.uname, info.gname, info.uid) for info in tar}
    assert headers == {(0o444, 0, "irpt", "irpt", 0)}  # fixed: same samples, same bytes, on any machine


def test_a_tar_with_folders_reads_one_sample_per_folder_and_key(tmp_path):
    """WebDataset tars written by other tools may hold folder entries and keys under folders
    (``day/000.png``, ``night/000.png``): two samples, not one; the folder entries are no members."""
    import io
    import tarfile

    from data_tools.shards import iter_shard, read_indexed_sample, shard_index

    path = tmp_path / "other.tar"
    with tarfile.open(path, "w") as tar:
        for folder in ("day", "night"):
            entry = tarfile.TarInfo(folder)
            entry.type = tarfile.DIRTYPE
            tar.addfile(entry)
            for ext, data in (("png", folder.encode() * 300), ("json", b"{}")):
                info = tarfile.TarInfo(f"{folder}/000.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = shard_index(str(path))
    assert [(key, [m.name for m in members]) for key, members in index] == [
        ("day/000", ["day/000.png", "day/000.json"]), ("night/000", ["night/000.png", "night/000.json"])]
    assert read_indexed_sample(str(path), index[1][1]) == {"png": b"night" * 300, "json": b"{}"}
    assert [(key, sorted(m)) for key, m in iter_shard(str(path))] == [("day/000", ["json", "png"]),
                                                                       ("night/000", ["json", "png"])]
    day_png = index[0][1][0]
    path.write_bytes(path.read_bytes()[: day_png.offset_data + 100])  # cut inside the first frame
    with pytest.raises(EOFError, match="member day/000.png is cut short"):
        read_indexed_sample(str(path), index[0][1])


def _tampered(folder, tmp_path, shard=None, change=None, manifest=None):
    """A copy of a shard folder with ``change(index, key, members) -> [(key, members), ...]`` applied to
    each sample of ``shard`` (its sha256 in the manifest updated, so only the change itself shows)
    and ``manifest(m)`` to the manifest."""
    import json
    import shutil

    from data_tools.shards import ShardFile

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    m = json.loads((copy / "manifest.json").read_text())
    if shard is not None:
        samples = [s for i, (key, members) in enumerate(iter_shard(str(copy / shard))) for s in change(i, key, members)]
        writer = ShardFile(str(copy / shard))
        for key, members in samples:
            writer.write({"__key__": key, **members})
        next(e for e in m["shards"] if e["shard"] == shard)["sha256"] = writer.close()
    if manifest is not None:
        manifest(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


def _with(**changes):
    """A sample change: members replaced (``meta`` keys merged into its JSON) on the sample at index 1."""
    import json

    from data_tools.shards import npy_bytes

    def change(i, key, members):
        if i != 1:
            return [(key, members)]
        members = dict(members)
        if "meta" in changes:
            members["json"] = json.dumps({**json.loads(members["json"]), **changes["meta"]}).encode()
        if "proposals" in changes:
            members["proposals.npy"] = npy_bytes(changes["proposals"])
        if "frame" in changes:
            members["npy"] = changes["frame"]
        if "png" in changes:  # the frame stored as PNG instead
            members.pop("npy")
            members["png"] = changes["png"]
        return [(changes.get("key", key), members)]
    return change


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def test_verify_names_every_way_a_shard_folder_differs_from_its_manifest(both_encodings, tmp_path):
    """`data_tools verify` after copying a corpus: each problem a line naming the shard (and sample)."""
    import shutil

    from data_tools.shards import encode_image

    root, bits = both_encodings
    folder = root / "raw"
    keys = [[key for key, _ in iter_shard(str(folder / f"shard-00000{i}.tar"))] for i in range(3)]
    dtype = "uint8" if bits == 8 else "uint16"
    cases = {
        "unlisted": (lambda c: shutil.copy(c / "shard-000002.tar", c / "shard-000099.tar"),
                     ["shard-000099.tar: shard not listed in the manifest"]),
        "missing": (lambda c: (c / "shard-000001.tar").unlink(),
                    ["shard-000001.tar: missing", "8 samples in shards, manifest totals say 14"]),
        "count": (lambda c: None, ["shard-000002.tar: 2 samples, manifest says 3",
                                   "14 samples in shards, manifest totals say 15",
                                   "totals: found 14 != written 15 + skipped 0"]),
        "size": ("shard-000000.tar", _with(meta={"height": 81}),
                 [f"shard-000000.tar/{keys[0][1]}: image 96x80 != meta 96x81"]),
        "dtype": ("shard-000000.tar", _with(meta={"dtype": "float32"}),
                  [f"shard-000000.tar/{keys[0][1]}: image dtype {dtype} != meta float32"]),
        "proposal dtype": ("shard-000001.tar", _with(proposals=np.zeros((3, 4), np.int64)),
                           [f"shard-000001.tar/{keys[1][1]}: proposals have shape (3, 4) / dtype int64"]),
        "proposal shape": ("shard-000001.tar", _with(proposals=np.zeros((3, 5), np.int32)),
                           [f"shard-000001.tar/{keys[1][1]}: proposals have shape (3, 5) / dtype int32"]),
        "right edge": ("shard-000001.tar", _with(proposals=np.array([[0, 0, 4, 4], [90, 0, 7, 4]], np.int32)),
                       [f"shard-000001.tar/{keys[1][1]}: a proposal leaves the image"]),
        "bottom edge": ("shard-000001.tar", _with(proposals=np.array([[0, 70, 4, 11]], np.int32)),
                        [f"shard-000001.tar/{keys[1][1]}: a proposal leaves the image"]),
        "above": ("shard-000001.tar", _with(proposals=np.array([[3, -1, 4, 4]], np.int32)),
                  [f"shard-000001.tar/{keys[1][1]}: a proposal leaves the image"]),
        "duplicate": ("shard-000001.tar", _with(key=keys[0][0]), [f"shard-000001.tar: duplicate key {keys[0][0]}"]),
        "undecodable": ("shard-000002.tar", _with(frame=b"junk"),
                        [f"shard-000002.tar/{keys[2][1]}: does not decode (ValueError: "]),
        "source": (None, None, ["source synth: found 15 != written + skipped"]),
        "colour": ("shard-000000.tar", _with(png=encode_image(np.zeros((80, 96, 3), np.uint8), "png")[1]),
                   [f"shard-000000.tar/{keys[0][1]}: image has shape (80, 96, 3), expected one channel"]
                   + ([] if bits == 8 else [f"shard-000000.tar/{keys[0][1]}: image dtype uint8 != meta uint16"])),
        "flat proposals": ("shard-000001.tar", _with(proposals=np.zeros(4, np.int32)),
                           [f"shard-000001.tar/{keys[1][1]}: proposals have shape (4,) / dtype int32"]),
        "flipped byte": (lambda c: c.joinpath("shard-000001.tar").write_bytes(
            _flip(c.joinpath("shard-000001.tar").read_bytes(), 3000)), ["shard-000001.tar: sha256 differs"]),
        "not a tar": (lambda c: c.joinpath("shard-000002.tar").write_bytes(b"junk" * 300),
                      ["shard-000002.tar: sha256 differs", "shard-000002.tar: unreadable tar (ReadError: ",
                       "shard-000002.tar: 0 samples, manifest says 2", "12 samples in shards"]),
        "unfinished": (lambda c: None, [f"{tmp_path / 'copy'}: the shard build is not complete (status 'building')"]),
    }
    manifests = {"count": lambda m: (m["shards"][2].update(samples=3), m["totals"].update(written=15)),
                 "unfinished": lambda m: m.update(status="building"),
                 "source": lambda m: m["sources"]["synth"].update(found=15)}
    for kind, case in cases.items():
        if len(case) == 2:
            copy = _tampered(folder, tmp_path, manifest=manifests.get(kind))
            case[0](copy)
        else:
            copy = _tampered(folder, tmp_path, *case[:2], manifest=manifests.get(kind))
        problems, expected = verify_shards(copy), case[-1]
        assert len(problems) == len(expected) and all(p.startswith(e) for p, e in zip(problems, expected)), \
            (kind, problems)
        if kind == "source":
            assert data_main(["verify", str(copy)]) == 1
        shutil.rmtree(copy)
    assert verify_shards(folder) == [] and data_main(["verify", str(folder)]) == 0
