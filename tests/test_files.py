"""The file helpers every stage shares: our JSONL logs, checksums, atomic writes, and the checks
that tell a user which folder is in the way (a file, no permission, another kind of output)."""
import errno
import hashlib
import json
import os

import numpy as np
import pytest

from data_tools import files
from tests.conftest import disk_full_when_saving


def test_a_log_reads_back_its_records_and_its_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert files.read_jsonl(log) == ([{"step": 1}, {"step": 2}], '{"step": 3, "lo')
    log.write_text('{"step": 1}\n')
    assert files.read_jsonl(log) == ([{"step": 1}], None)
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # not an append cut short: corruption
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON \(.*\); the log is corrupt"):
        files.read_jsonl(log)


def test_trimming_a_log_keeps_the_records_asked_for_and_says_it_dropped_a_torn_line(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"st')
    files.trim_jsonl(log, lambda r: r["step"] <= 3)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert "dropped a torn final line (4 characters; a run was killed mid-write)" in capsys.readouterr().err
    files.trim_jsonl(log, lambda r: True)
    assert capsys.readouterr().err == "" and not (tmp_path / "metrics.jsonl.tmp").exists()


def test_checksums_and_atomic_writes(tmp_path):
    data = os.urandom((1 << 20) * 2 + 123)  # more than one read of the checksum
    (tmp_path / "big").write_bytes(data)
    assert files.sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    files.atomic_write_text(tmp_path / "latest", "step00000002")
    files.atomic_write_text(tmp_path / "latest", "step00000004")
    assert (tmp_path / "latest").read_text() == "step00000004" and sorted(os.listdir(tmp_path)) == ["big", "latest"]


def test_a_png_is_written_exactly_and_a_full_disk_raises_leaving_the_earlier_file(tmp_path, monkeypatch):
    import cv2

    from data_tools.imageio import write_png

    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (9, 7), dtype=np.uint8), rng.integers(0, 65536, (9, 7), dtype=np.uint16),
                  rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)):
        write_png(tmp_path / "a.png", image)
        read = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)
        assert read.dtype == image.dtype and np.array_equal(read, image)
    # cv2.imwrite says a full disk only by returning False: here it raises, and nothing half-written is left
    disk_full_when_saving(monkeypatch, "/a.png.tmp")
    with pytest.raises(OSError, match="No space left"):
        write_png(tmp_path / "a.png", np.zeros((9, 7), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["a.png"]
    assert np.array_equal(cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED), image)


def test_a_storage_error_is_said_as_one_and_any_other_is_not():
    assert files.storage_problem(OSError(errno.ENOSPC, "No space left on device", "/d/x")) == \
        "No space left on device: /d/x"
    assert files.storage_problem(OSError(errno.EROFS, "Read-only file system")) == "Read-only file system"
    assert files.storage_problem(OSError(errno.EDQUOT, "Disk quota exceeded", "/d")) == "Disk quota exceeded: /d"
    assert files.storage_problem(OSError(errno.EACCES, "Permission denied", "/d")) is None


def test_a_file_where_a_folder_is_expected_is_named_with_its_folder(tmp_path):
    (tmp_path / "frame.png").write_bytes(b"x")
    assert files.file_not_folder(tmp_path / "frame.png") == (
        f"{tmp_path / 'frame.png'} is a file where a folder is expected (the folder holding it: {tmp_path})")
    assert files.file_not_folder(tmp_path) is None and files.file_not_folder(tmp_path / "none") is None


def test_an_unwritable_place_names_the_folder_in_the_way(tmp_path, monkeypatch):
    """Checked with os.access (the tests may run as root, whom a mode does not stop)."""
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(locked)) else real_access(p, mode))
    assert files.unwritable(locked / "sub") == (f"{locked / 'sub'}: this user cannot write it: no permission, or a "
                                                "read-only mount; choose another place")
    assert files.unwritable(locked / "new" / "deeper" / "out.pth") == (
        f"{locked / 'new' / 'deeper' / 'out.pth'}: this user cannot write {locked} (where it would go): no permission, "
        "or a read-only mount; choose another place")
    (locked / "sub" / "file.json").write_text("{}")
    assert files.unwritable(locked / "sub" / "file.json").startswith(f"{locked / 'sub' / 'file.json'}: this user "
                                                                     f"cannot write {locked / 'sub'} (where")
    assert files.unwritable(tmp_path / "free" / "out") is None and files.unwritable(tmp_path) is None


def test_folders_below_are_found_nearest_first_then_by_name(tmp_path):
    for folder in ("MSRS-main/train", "b/MSRS/train", "a/MSRS/train", "c/d/e/train", "zz/train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "zz" / "data.yaml").write_text("x")
    found = list(files.folders_below(tmp_path, ["train"]))
    assert found == [tmp_path / "MSRS-main", tmp_path / "zz", tmp_path / "a" / "MSRS", tmp_path / "b" / "MSRS"]
    assert list(files.folders_below(tmp_path, ["train", "data.yaml"])) == [tmp_path / "zz"]  # every one of them
    assert list(files.folders_below(tmp_path, ["train"], depth=1)) == [tmp_path / "MSRS-main", tmp_path / "zz"]


@pytest.mark.parametrize("config,kind", [
    ({"build": {}, "sources": []}, "shards"),
    ({"sources": [], "image": {}}, None),  # a manifest's identity, not a build's config
    ({"data": {"shards": []}}, "pretrain"),
    ({"data": {"layout": "msrs", "boxes": {}}}, "det"),
    ({"data": {"layout": "msrs"}}, "seg"),
    ({"data": "shards and layout"}, None),  # not a section
    ([1, 2], None),
    ("a: [", None),  # no YAML
])
def test_each_of_our_output_folders_is_told_apart_by_its_config(tmp_path, config, kind):
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "config.yaml").write_text(text)
    assert files.folder_kind(tmp_path) == kind
    if kind is not None and kind != "shards":
        with pytest.raises(ValueError, match=f"{tmp_path} is a .*, not a shard folder"):
            files.check_folder_kind(tmp_path, ("shards",))
        files.check_folder_kind(tmp_path, (kind,))


def test_a_folder_of_another_kind_is_refused_saying_what_it_is_for(tmp_path):
    (tmp_path / "config.yaml").write_text(json.dumps({"data": {"shards": []}}))
    with pytest.raises(ValueError, match=f"^{tmp_path} is a pre-training run, not a fine-tuning run "
                                         rf"\(python -m pretrain export {tmp_path} --out backbone.pth"):
        files.check_folder_kind(tmp_path, ("seg", "det"))
    files.check_folder_kind(tmp_path / "none", ("seg",))  # not one of ours: no word
    assert files.folder_kind(tmp_path / "none") is None


def test_a_seeded_split_covers_every_frame_once_with_at_least_one_on_each_side(tmp_path):
    from data_tools.splits import write_split

    images = tmp_path / "Ir"
    images.mkdir()
    for i in range(10):
        (images / f"{i:03d}.png").write_bytes(b"")
    (images / "003.JPG").write_bytes(b"")  # the same frame in another format: one name
    (images / "010.JPG").write_bytes(b"")
    (images / "notes.txt").write_text("")
    assert write_split(tmp_path, "Ir", 0.3, seed=4) == (8, 3)
    train, val = ((tmp_path / n).read_text().split("\n") for n in ("train.txt", "val.txt"))
    assert train[-1] == val[-1] == ""  # one name per line, each line ended
    train, val = train[:-1], val[:-1]
    assert train == sorted(train) and val == sorted(val) and sorted(train + val) == [f"{i:03d}" for i in range(11)]
    assert write_split(tmp_path, "Ir", 0.3, seed=4, overwrite=True) == (8, 3)
    assert (tmp_path / "val.txt").read_text().split() == val  # same seed, same lists
    vals = set()
    for seed in range(5):
        write_split(tmp_path, "Ir", 0.3, seed=seed, overwrite=True)
        vals.add((tmp_path / "val.txt").read_text())
    assert len(vals) > 1  # the seed chooses
    for fraction, counts in ((0.01, (10, 1)), (0.99, (1, 10)), (0.25, (8, 3)), (0.35, (7, 4))):  # rounded
        assert write_split(tmp_path, "Ir", fraction, overwrite=True, names=("a.txt", "b.txt")) == counts
    with pytest.raises(FileExistsError, match=r"a.txt, .*b.txt exist\(s\): pass --overwrite to replace"):
        write_split(tmp_path, "Ir", 0.3, names=("a.txt", "b.txt"))


def test_a_split_is_the_same_in_every_python_process(tmp_path):
    """'The same files, fraction and seed give the same lists on any machine': not on the order a set
    of names happens to have in one interpreter (string hashing is salted per process)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    for i in range(30):
        (tmp_path / "Ir").mkdir(exist_ok=True)
        (tmp_path / "Ir" / f"frame{i}.png").write_bytes(b"")
    lists = set()
    for hash_seed in ("1", "2", "3"):
        code = ("import sys; from data_tools.splits import write_split; "
                "write_split(sys.argv[1], 'Ir', 0.3, seed=0, names=(sys.argv[2] + '_t.txt', sys.argv[2] + '_v.txt'))")
        subprocess.run([sys.executable, "-c", code, str(tmp_path), hash_seed], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)})
        lists.add((tmp_path / f"{hash_seed}_v.txt").read_text())
    assert len(lists) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_a_split_fraction_outside_0_to_1_is_refused(tmp_path, fraction):
    from data_tools.splits import write_split

    (tmp_path / "Ir").mkdir()
    with pytest.raises(ValueError, match=f"--val-fraction must be between 0 and 1, got {fraction}"):
        write_split(tmp_path, "Ir", fraction)


def test_a_missing_folder_is_said_with_what_the_folder_above_holds(tmp_path):
    for name in ("Visible", "Label", "IR"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("")
    assert files.missing_folder(tmp_path / "train" / "visible") == (
        f"{tmp_path / 'train' / 'visible'}: no such folder; {tmp_path / 'train' / 'Visible'} differs in case only "
        "(names are case-sensitive here)")
    assert files.missing_folder(tmp_path / "train" / "Infrared") == (
        f"{tmp_path / 'train' / 'Infrared'}: no such folder; {tmp_path / 'train'} holds IR, Label, Visible")
    assert files.missing_folder(tmp_path / "test" / "Infrared") == f"{tmp_path / 'test' / 'Infrared'}: no such folder"
    assert "is a file where a folder is expected" in files.missing_folder(tmp_path / "train" / "notes.txt")
    for i in range(14):
        (tmp_path / "many" / f"d{i:02d}").mkdir(parents=True)
    assert files.missing_folder(tmp_path / "many" / "x").endswith("holds d00, d01, d02, d03, d04, d05, d06, d07, "
                                                                 "d08, d09, d10, d11, ...")


def test_a_split_of_no_folder_or_a_single_frame_is_refused(tmp_path):
    from data_tools.splits import write_split

    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'Ir'}: no such folder"):
        write_split(tmp_path, "Ir", 0.3)
    (tmp_path / "Ir").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file where a folder is expected"):
        write_split(tmp_path, "Ir", 0.3)
    (tmp_path / "Ir").unlink()
    (tmp_path / "Ir" / "day").mkdir(parents=True)
    (tmp_path / "Ir" / "one.png").write_bytes(b"")
    for i in range(3):
        (tmp_path / "Ir" / "day" / f"{i}.png").write_bytes(b"")
    day = tmp_path / "Ir" / "day"
    with pytest.raises(ValueError, match=f"Ir holds 1 image\\(s\\): nothing to split; {day} holds 3 image files"):
        write_split(tmp_path, "Ir", 0.3)
    assert not (tmp_path / "train.txt").exists()
