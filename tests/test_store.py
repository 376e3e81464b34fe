import os

import pandas as pd
import pytest
import torch

from scdd_ray.errors import StoreError
from scdd_ray.exports import export_imagefolder
from scdd_ray.store.distilled import read_distilled, read_encoded
from scdd_ray.store.encoded import images_digest
from scdd_ray.store.shards import ShardStore


def _imgs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def test_shards_roundtrip_losslessly_and_are_readable_by_pandas(tmp_path):
    st = ShardStore(str(tmp_path / "d"))
    st.open("abc")
    a, b = _imgs(2, 0), _imgs(2, 1)
    assert st.write_shard("ipc0001", [0, 1], [1, 1], b)
    assert st.write_shard("ipc0000", [0, 1], [0, 0], a)
    images, cls, ipc = st.read()
    assert cls.tolist() == [0, 0, 1, 1] and ipc.tolist() == [0, 1, 0, 1]
    assert torch.equal(images[0], a[0]) and torch.equal(images[1], b[0]) and torch.equal(images[3], b[1])
    df = pd.read_parquet(st.files()[0])
    assert list(df.columns) == ["class_id", "ipc_index", "image", "height", "width", "channels"]
    assert df["height"].tolist() == [8, 8]


def test_rewriting_a_recorded_shard_is_a_no_op(tmp_path):
    st = ShardStore(str(tmp_path))
    st.open("abc")
    st.write_shard("s0", [0], [0], _imgs(1, 0))
    assert not st.write_shard("s0", [0], [0], _imgs(1, 5))
    images, _, _ = st.read()
    assert len(images) == 1 and torch.equal(images[0], _imgs(1, 0)[0])


def test_store_refuses_another_configuration(tmp_path):
    st = ShardStore(str(tmp_path))
    st.open("abc")
    st.open("abc")
    with pytest.raises(StoreError, match="different configuration"):
        ShardStore(str(tmp_path)).open("xyz")


def test_recover_seconds_sum_every_shard_whoever_wrote_it(tmp_path):
    st = ShardStore(str(tmp_path))
    assert st.recover_seconds() is None  # no set yet
    st.open("abc")
    st.write_shard("s0", [0], [0], _imgs(1), extra={"seconds": 30.5})
    ShardStore(str(tmp_path)).write_shard("s1", [1], [0], _imgs(1, 1), extra={"seconds": 12.0})  # a later process
    assert st.recover_seconds() == 42.5
    st.write_shard("s2", [2], [0], _imgs(1, 2))  # a shard that did not record its time: the sum would undercount
    assert st.recover_seconds() is None


def test_orphan_file_without_manifest_entry_is_ignored(tmp_path):
    st = ShardStore(str(tmp_path))
    st.open("abc")
    st.write_shard("s0", [0], [0], _imgs(1))
    # a crash after the file rename but before the manifest update leaves an orphan
    (tmp_path / "shard-s1.parquet").write_bytes(open(st.files()[0], "rb").read())
    assert st.done() == {"s0"}
    assert len(st.read()[0]) == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_imagefolder_export_uses_reference_layout(tmp_path):
    imgs = _imgs(3)
    export_imagefolder(str(tmp_path), imgs, [0, 0, 12], [0, 1, 0])
    assert sorted(os.listdir(tmp_path)) == ["new000", "new012"]
    assert sorted(os.listdir(tmp_path / "new000")) == ["class000_id000.png", "class000_id001.png"]
    back, cls, ipc = read_distilled(str(tmp_path))
    assert cls.tolist() == [0, 0, 12] and torch.equal(back, imgs)


@pytest.mark.parametrize("layout", ["shards", "imagefolder"])
def test_encoded_sets_decode_to_the_written_pixels_in_reader_order(tmp_path, layout):
    """What a post-train worker keeps encoded decodes, row by row, to exactly the images written."""
    a, b = _imgs(3, 0), _imgs(3, 1)
    if layout == "shards":
        st = ShardStore(str(tmp_path))
        st.open("abc")
        st.write_shard("ipc0001", [2, 0, 1], [1, 1, 1], b)  # out of order on disk, in two files
        st.write_shard("ipc0000", [1, 0, 2], [0, 0, 0], a)
    else:
        export_imagefolder(str(tmp_path), torch.cat([b, a]), [2, 0, 1, 1, 0, 2], [1, 1, 1, 0, 0, 0])
    want = torch.stack([a[1], b[1], a[0], b[2], a[2], b[0]])  # (class, ipc) order
    enc = read_encoded(str(tmp_path))
    assert len(enc) == 6 and enc.class_ids.tolist() == [0, 0, 1, 1, 2, 2] and enc.ipc_indices.tolist() == [0, 1] * 3
    assert torch.equal(enc.decode(range(6)), want)
    assert torch.equal(enc.decode([4, 1]), want[[4, 1]])
    assert torch.equal(read_distilled(str(tmp_path))[0], want)
    assert enc.digest() == images_digest(want)
