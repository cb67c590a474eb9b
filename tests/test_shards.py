"""Shard writing/reading, make_shards CLI, the bundled sample set."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp

import cv2
import numpy as np
import pytest
import webdataset as wds

from asuka.data.make_shards import main as make_shards_main
from asuka.data.samples import SAMPLE_SET_NAME, ensure_sample_shards
from asuka.data.shapes import ShapeBank
from asuka.data.shards import (clean_key, decode_image, encode_image, read_manifest, unique_keys,
                               write_manifest, write_shards)


def test_clean_and_unique_keys():
    assert clean_key("dir/sub dir/img.v2.final.jpg") == "dir_sub_dir_img_v2_final_jpg"
    assert clean_key("...") == "sample"
    assert list(unique_keys(["a.b", "a_b", "a b", "c"])) == ["a_b", "a_b_1", "a_b_2", "c"]


def test_shard_round_trip_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"img_{i}": rng.integers(0, 256, size=(24 + i, 32, 3), dtype=np.uint8) for i in range(7)}
    samples = ({"__key__": k, "png": encode_image(v, "png"), "json": json.dumps({"i": k}).encode()}
               for k, v in images.items())
    paths = write_shards(samples, tmp_path, "train", maxcount=3)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    manifest = read_manifest(write_manifest(tmp_path, {"train": paths}).parent)
    assert [e["samples"] for e in manifest["splits"]["train"]["shards"]] == [3, 3, 1]
    read = {s["__key__"]: s for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)}
    assert read.keys() == images.keys()
    for k, v in images.items():
        assert np.array_equal(decode_image(read[k]["png"]), v)
        assert json.loads(read[k]["json"]) == {"i": k}


def test_write_shards_rejects_dirty_keys(tmp_path):
    with pytest.raises(ValueError, match="not clean"):
        write_shards([{"__key__": "a.b", "txt": b"x"}], tmp_path)


def test_decode_image_errors():
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(b"not an image")


def _image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub dir").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ["a.jpg", "b.v2.png", "sub dir/c.png", "sub dir/d.jpg"]:
        cv2.imwrite(str(folder / name), rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return folder


def test_make_shards_cli(tmp_path, capsys):
    folder = _image_folder(tmp_path)
    coco = {"images": [{"id": 7, "file_name": "a.jpg", "height": 60, "width": 80}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "iscrowd": 0, "area": 800.0,
                             "segmentation": [[10, 10, 50, 10, 50, 30, 10, 30]]}]}
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "shards"
    assert make_shards_main(["--images", str(folder), "--out", str(out), "--coco-annotations", str(ann),
                             "--size", "30", "--maxcount", "2"]) == 0
    assert "1 unreadable images skipped" in capsys.readouterr().out
    manifest = read_manifest(out)
    train = manifest["splits"]["train"]
    assert train["samples"] == 4 and manifest["skipped"]["train"] == 1 and len(train["shards"]) == 2
    for entry in train["shards"]:
        assert hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    samples = {s["__key__"]: s for s in wds.WebDataset([str(out / e["name"]) for e in train["shards"]],
                                                        shardshuffle=False)}
    assert set(samples) == {"a", "b_v2", "sub_dir_c", "sub_dir_d"}
    assert all("." not in k for k in samples)
    meta = json.loads(samples["a"]["json"])
    assert meta["size"] == [40, 30] and meta["original_size"] == [80, 60]
    assert meta["objects"][0]["polygons"][0][:2] == [[5.0, 5.0], [25.0, 5.0]]  # scaled by 0.5
    assert decode_image(samples["a"]["jpg"]).shape == (30, 40, 3)
    assert json.loads(samples["b_v2"]["json"])["objects"] == []
    assert len(ShapeBank.load(out / manifest["object_shapes"])) == 1

    # a second split goes into the same folder and keeps the first one in the manifest
    make_shards_main(["--images", str(folder / "sub dir"), "--out", str(out), "--split", "val"])
    manifest = read_manifest(out)
    assert manifest["splits"]["val"]["samples"] == 2 and manifest["splits"]["train"]["samples"] == 4


def test_make_shards_errors(tmp_path, capsys):
    assert make_shards_main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error: --images folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert make_shards_main(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "error: no images" in capsys.readouterr().err


def _build(root, queue):
    queue.put(ensure_sample_shards(root))


def test_sample_shards_idempotent_and_race_safe(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]
    again = ensure_sample_shards(tmp_path)
    assert again == results[0]
    assert len(again["train"]) >= 4 and len(again["val"]) >= 1  # 2 ranks x 2 workers get a shard each
    assert sorted(p.name for p in tmp_path.iterdir()) == [SAMPLE_SET_NAME]  # no leftover temp folders
    manifest = read_manifest(tmp_path / SAMPLE_SET_NAME)
    assert manifest["splits"]["train"]["samples"] == 64 and manifest["splits"]["val"]["samples"] == 8
    first = next(iter(wds.WebDataset(again["train"][:1], shardshuffle=False)))
    assert decode_image(first["jpg"]).shape == (320, 320, 3)


def test_samples_command(tmp_path, capsys):
    from asuka.data.samples import main

    main(["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "train: 8 shards" in out and "val: 2 shards" in out
    assert str(tmp_path / SAMPLE_SET_NAME / "train-000000.tar") in out
