"""WebDataset shards (``wds:``) and Hugging Face datasets on disk (``hf:``): real shards written with the
webdataset library and `vitlab data pack`, a real Arrow dataset saved with ``save_to_disk``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import load_data
from vitlab.errors import DataError

wds = pytest.importorskip("webdataset")

CLASSES = ("apple", "kiwi", "lemon")


def write_photos(root, per_class=(8, 3), size=(14, 12)):
    """An image folder with train/ and test/ (JPEGs, as photos are)."""
    rng = np.random.default_rng(7)
    for split, n in zip(("train", "test"), per_class):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def jpeg_bytes(seed=0, size=(10, 10)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture()
def packed(tmp_path):
    from vitlab.data.sources.wds import pack

    photos = write_photos(tmp_path / "photos")
    meta = pack(f"folder:{photos}", tmp_path / "shards", shard_size=4)
    return photos, tmp_path / "shards", meta


def test_pack_writes_shards_that_load_as_the_folder_does(packed, tmp_path):
    photos, shards, meta = packed
    assert meta["classes"] == list(CLASSES) and meta["splits"]["train"]["samples"] == 24
    assert meta["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(6)]
    assert json.loads((shards / "dataset.json").read_text()) == meta
    folder = load_data(f"folder:{photos}", image_size=8, cache_dir=tmp_path / "c")
    streamed = load_data(f"wds:{shards}", image_size=8, cache_dir=tmp_path / "c")
    assert streamed.classes == folder.classes and len(streamed.train) == 24 and len(streamed.test) == 9
    assert streamed.train.class_counts() == folder.train.class_counts() == [8, 8, 8]
    # the same JPEG bytes went in: every streamed image is one of the folder's, pixel for pixel
    want = {folder.train.take([i]).numpy().tobytes(): int(folder.train.labels[i]) for i in range(24)}
    got = [(image.tobytes(), label) for shard in range(6) for image, label in streamed.train.samples(shard)]
    assert len(got) == 24 and all(want[pixels] == label for pixels, label in got)
    assert len({pixels for pixels, _ in got}) == 24
    # a pattern names the same shards; its test split is found beside it
    pattern = load_data(f"wds:{shards}/train-{{000000..000005}}.tar", image_size=8, cache_dir=tmp_path / "c")
    assert len(pattern.train) == 24 and len(pattern.test) == 9 and pattern.classes == list(CLASSES)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_the_order_is_a_function_of_seed_and_epoch_whatever_the_number_of_loader_processes(packed, tmp_path):
    _, shards, _ = packed
    train = load_data(f"wds:{shards}", image_size=8, cache_dir=tmp_path / "c").train
    loader = train.loader(batch_size=4, shuffle=True, seed=3, drop_last=True)
    assert len(loader) == 6
    train.workers = 0  # decoded in a thread of this process
    threaded = [_epoch(loader, e) for e in (0, 1)]
    train.workers = 2  # two DataLoader processes
    assert _same(_epoch(loader, 0), threaded[0]) and _same(_epoch(loader, 1), threaded[1])
    assert not _same(threaded[0], threaded[1])  # another epoch, another order
    # shards of equal size: an epoch is every sample once
    seen = sorted(x.numpy().tobytes() for batch, _ in threaded[0] for x in batch)
    assert len(seen) == 24 and len(set(seen)) == 24


def test_ranks_read_disjoint_shards_and_take_the_same_number_of_batches(packed, tmp_path):
    _, shards, _ = packed
    train = load_data(f"wds:{shards}", image_size=8, cache_dir=tmp_path / "c").train
    train.workers = 0
    loaders = [train.loader(batch_size=3, shuffle=True, seed=0, drop_last=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(x) for x in loaders] == [4, 4]  # 24 samples / 2 ranks / batches of 3
    dealt = [set(x.rank_shards()) for x in loaders]
    assert not dealt[0] & dealt[1] and dealt[0] | dealt[1] == set(range(6))
    assert all(len(_epoch(x, 0)) == 4 for x in loaders)  # the rank with fewer samples goes round again
    # an evaluation's shares hold every test image once
    test = load_data(f"wds:{shards}", image_size=8, cache_dir=tmp_path / "c").test
    parts = [test.part(r, 2) for r in (0, 1)]
    assert sum(len(p) for p in parts) == len(test) == 9
    with pytest.raises(DataError, match="6 shards for 7 processes"):
        train.loader(batch_size=1, shuffle=True, drop_last=True, rank=0, world_size=7)


def test_a_validation_split_is_held_out_of_a_stream_stratified(tmp_path):
    from vitlab.data.sources.wds import pack

    photos = write_photos(tmp_path / "photos")
    pack(f"folder:{photos / 'train'}", tmp_path / "shards", shard_size=7)  # no test split
    d = load_data(f"wds:{tmp_path / 'shards'}", image_size=8, val_fraction=0.25, cache_dir=tmp_path / "c")
    assert d.val.class_counts() == [2, 2, 2] and d.train.class_counts() == [6, 6, 6]
    d.train.workers = d.val.workers = 0
    val = torch.cat([y for _, y in _epoch(d.val.loader(batch_size=4, shuffle=False, drop_last=False), 0)])
    assert sorted(val.tolist()) == [0, 0, 1, 1, 2, 2]
    seen = {x.numpy().tobytes() for x, _ in _epoch(d.train.loader(batch_size=1, shuffle=False, drop_last=False), 0)}
    held = {x.numpy().tobytes() for x, _ in _epoch(d.val.loader(batch_size=1, shuffle=False, drop_last=False), 0)}
    assert len(seen) == 18 and len(held) == 6 and not seen & held


def test_bad_shards_are_named_in_one_line_or_skipped(tmp_path):
    good = [{"__key__": f"s{i}", "jpg": jpeg_bytes(i), "cls": b"%d" % (i % 2)} for i in range(6)]
    write_shard(tmp_path / "train-000000.tar", good[:3] + [{"__key__": "nolabel", "jpg": jpeg_bytes(9)}])
    write_shard(tmp_path / "train-000001.tar", good[3:] + [{"__key__": "noimage", "cls": b"1"}])
    spec = f"wds:{tmp_path}/train-{{000000..000001}}.tar"
    with pytest.raises(DataError, match=r"train-000000.tar: sample nolabel has no label \(cls\) \(1 more\); or "
                                        r"pass skip_bad_files=True") as caught:
        load_data(spec, image_size=8, cache_dir=tmp_path / "c")
    assert "\n" not in str(caught.value)
    d = load_data(spec, image_size=8, skip_bad_files=True, val_fraction=0.34, cache_dir=tmp_path / "c")
    assert len(d.train) + len(d.val) == 6 and len(d.skipped_files) == 2
    assert any("noimage has no image" in m for m in d.skipped_files)
    # a truncated shard: the index names it
    write_shard(tmp_path / "cut" / "train-000000.tar", good[:3])
    write_shard(tmp_path / "cut" / "train-000001.tar", good[3:])
    data = (tmp_path / "cut" / "train-000001.tar").read_bytes()
    (tmp_path / "cut" / "train-000001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-000001.tar: (truncated inside sample|not a readable tar shard)"):
        load_data(f"wds:{tmp_path / 'cut'}", image_size=8, cache_dir=tmp_path / "c2")
    d = load_data(f"wds:{tmp_path / 'cut'}", image_size=8, skip_bad_files=True, val_fraction=0.34,
                  cache_dir=tmp_path / "c2")
    assert 3 <= len(d.train) + len(d.val) < 6
    with pytest.raises(DataError, match=r"train-000002.tar: shard not found \(8 of the 10 shards"):
        load_data(f"wds:{tmp_path}/train-{{000000..000009}}.tar", cache_dir=tmp_path / "c")


def test_an_image_that_does_not_decode_names_the_shard_and_key(tmp_path):
    samples = [{"__key__": f"s{i}", "jpg": jpeg_bytes(i), "cls": b"0"} for i in range(3)]
    samples.append({"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "cls": b"1"})
    write_shard(tmp_path / "train-000000.tar", samples)
    with pytest.raises(DataError, match=r"train-000000.tar#broken: not a readable image .* or pass skip_bad_files"):
        load_data(f"wds:{tmp_path}", image_size=8, cache_dir=tmp_path / "c", val_fraction=0.5)  # its mean and std
    d = load_data(f"wds:{tmp_path}", image_size=8, cache_dir=tmp_path / "c", val_fraction=0.5, skip_bad_files=True)
    assert len(list(d.train.samples(0))) + len(list(d.val.samples(0))) == 3  # the broken one left out


def test_training_on_shards_resumes_exactly(packed, tmp_path):
    import vitlab
    from _train_fixtures import tiny_config
    from vitlab._files import load_safetensors

    _, shards, _ = packed
    spec = f"wds:{shards}"
    settings = dict(data=spec, image_size=8, model_overrides=dict(in_channels=3, image_size=8, patch_size=4,
                                                                    hidden_dim=16, depth=1, num_heads=2, mlp_dim=16),
                    batch_size=4, epochs=2, workers=0, threads=1, cache_dir=str(tmp_path / "c"), hflip=True)
    straight = vitlab.train(tiny_config(tmp_path, "straight", **settings), progress=False)
    vitlab.train(tiny_config(tmp_path, "split", stop_after_epoch=1, **settings), progress=False)
    resumed = vitlab.train(tiny_config(tmp_path, "x", resume=str(tmp_path / "split"), **settings), progress=False)
    a = load_safetensors(straight.run_dir / "last/model.safetensors")
    b = load_safetensors(resumed.run_dir / "last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]
    assert straight.history[-1]["top1"] is not None  # evaluated on the test shards


def test_cli_pack_and_info(tmp_path, capsys):
    from vitlab.cli import main

    photos = write_photos(tmp_path / "photos")
    assert main(["data", "pack", f"folder:{photos}", str(tmp_path / "out"), "--shard-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "train  24 samples in 3 shards" in out and f"use it as --data wds:{tmp_path / 'out'}" in out
    assert main(["data", "info", f"wds:{tmp_path / 'out'}", "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "images    train 24, test 9" in out and "train: 3 shards" in out and "apple (8)" in out
    assert main(["data", "info", f"folder:{photos}", "--image-size", "8"]) == 0
    assert "train: memory map " in capsys.readouterr().out


# ---------------------------------------------------------------- Hugging Face datasets
datasets = pytest.importorskip("datasets")


def _hf_dataset(tmp_path, labels_as="classlabel"):
    rng = np.random.default_rng(3)
    rows = {"img": [], "fine": []}
    for i in range(12):
        rows["img"].append(Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)))
        rows["fine"].append(i % 3)
    features = datasets.Features({"img": datasets.Image(),
                                  "fine": datasets.ClassLabel(names=list(CLASSES)) if labels_as == "classlabel"
                                  else datasets.Value("int64")})
    full = datasets.Dataset.from_dict(rows, features=features)
    split = full.train_test_split(test_size=3, shuffle=False)
    split.save_to_disk(str(tmp_path / "hfds"))
    return split


def test_a_saved_hugging_face_dataset_is_decoded_once_into_the_cache_and_mapped(tmp_path):
    split = _hf_dataset(tmp_path)
    d = load_data(f"hf:{tmp_path / 'hfds'}", cache_dir=tmp_path / "c")
    assert d.classes == list(CLASSES) and len(d.train) == 9 and len(d.test) == 3
    assert d.image_size == (9, 11) and d.channels == 3 and d.train.cache_file.endswith(".npy")
    for i in (0, 8):
        expected = np.asarray(split["train"][i]["img"].convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(d.train.take([i])[0].numpy(), expected)
    assert d.train.labels.tolist() == split["train"]["fine"]
    again = load_data(f"hf:{tmp_path / 'hfds'}", cache_dir=tmp_path / "c")
    assert again.train.cache_file == d.train.cache_file


def test_hugging_face_columns_are_named_by_option_and_missing_ones_say_so(tmp_path):
    _hf_dataset(tmp_path, labels_as="int")
    d = load_data(f"hf:{tmp_path / 'hfds'}?image=img&label=fine", image_size=8, cache_dir=tmp_path / "c")
    assert d.classes == ["0", "1", "2"] and d.image_size == (8, 8)
    with pytest.raises(DataError, match=r"hfds: no column 'picture'; its columns are img \(Image\), fine \(Value\); "
                                        r"name it with hf:.*\?image=COLUMN"):
        load_data(f"hf:{tmp_path / 'hfds'}?image=picture", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="unknown option"):
        load_data(f"hf:{tmp_path / 'hfds'}?colour=red")
    with pytest.raises(DataError, match="not found"):
        load_data(f"hf:{tmp_path / 'nothere'}")
