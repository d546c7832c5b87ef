import numpy as np
import pytest
import SimpleITK as sitk

from factories import write_image
from nnfast.errors import GeometryError, ImageReadError, LabelError
from nnfast.io.image import ImageGeometry, read_image, read_images, read_label, write_segmentation


def _img(tmp_path, name, arr, spacing=(3.0, 0.8, 0.7), **kw):
    return write_image(arr, tmp_path / name, spacing, **kw)


@pytest.mark.compat
@pytest.mark.parametrize("ndim", [3, 4])
def test_reader_matches_nnunet_simpleitkio(tmp_path, ndim):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rng = np.random.default_rng(0)
    shape = (5, 6, 7) if ndim == 3 else (2, 5, 6, 7)
    a = rng.normal(size=shape).astype(np.float32)
    p1 = _img(tmp_path, "a_0000.nii.gz", a, origin=(1.0, 2.0, 3.0))
    p2 = _img(tmp_path, "a_0001.nii.gz", (a * 2).astype(np.int16))
    ours, geom = read_images([p1, p2])
    theirs, props = SimpleITKIO().read_images([str(p1), str(p2)])
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    assert geom.spacing == tuple(props["spacing"])
    assert geom.origin == tuple(props["sitk_stuff"]["origin"])[:3]


def test_2d_image_becomes_a_single_slice(tmp_path):
    img = sitk.GetImageFromArray(np.arange(12, dtype=np.float32).reshape(3, 4))
    img.SetSpacing((0.5, 0.25))
    sitk.WriteImage(img, str(tmp_path / "x.nii.gz"))
    data, g = read_image(tmp_path / "x.nii.gz")
    assert data.shape == (1, 1, 3, 4)
    assert g.spacing == (999 * 0.5, 0.25, 0.5)


def test_channels_must_share_the_grid(tmp_path):
    p1 = _img(tmp_path, "a_0000.nii.gz", np.zeros((4, 5, 6), np.float32))
    p2 = _img(tmp_path, "a_0001.nii.gz", np.zeros((4, 5, 7), np.float32))
    with pytest.raises(GeometryError, match="a_0001.nii.gz"):
        read_images([p1, p2])
    p3 = _img(tmp_path, "a_0002.nii.gz", np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="spacing"):
        read_images([p1, p3])


def test_truncated_file_is_a_clear_error(tmp_path):
    p = _img(tmp_path, "t.nii.gz", np.ones((8, 16, 16), np.int16))
    raw = p.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 20):  # SimpleITK itself reads both without an error
        p.write_bytes(raw[:cut])
        with pytest.raises(ImageReadError, match="t.nii.gz"):
            read_images([p])


def test_float_labels_are_rejected(tmp_path):
    p = _img(tmp_path, "l.nii.gz", np.full((3, 3, 3), 0.5, np.float32))
    with pytest.raises(LabelError, match="non-integer"):
        read_label(p)
    q = _img(tmp_path, "m.nii.gz", np.full((3, 3, 3), 2.0, np.float32))
    arr, _ = read_label(q)
    assert arr.dtype == np.int16 and arr.shape == (1, 3, 3, 3) and (arr == 2).all()


def test_4d_label_is_rejected(tmp_path):
    p = _img(tmp_path, "l4.nii.gz", np.zeros((2, 3, 3, 3), np.uint8))
    with pytest.raises(LabelError, match="4D"):
        read_label(p)


def test_write_segmentation_round_trips_geometry(tmp_path):
    src = _img(tmp_path, "src.nii.gz", np.zeros((4, 5, 6), np.int16), origin=(10.0, -5.0, 2.5),
               direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    _, g = read_image(src)
    seg = np.arange(120).reshape(4, 5, 6) % 3
    out = tmp_path / "pred.nii.gz"
    write_segmentation(seg, g, out)
    back, g2 = read_image(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back[0], seg)
    assert g2 == g
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"
    assert ImageGeometry.from_json(g.to_json()) == g


@pytest.mark.parametrize("dtype,values,want", [
    (np.uint8, (0, 3, 127), np.int8), (np.int16, (-1, 0, 5), np.int8), (np.float32, (0.0, 2.0, 7.0), np.int8),
    (np.uint8, (0, 200, 3), np.int16), (np.int32, (0, 40000, 1), np.int32),
])
def test_small_labels_are_int8_where_they_fit(tmp_path, dtype, values, want):
    arr = np.zeros((3, 4, 5), dtype)
    arr[0, 0, :3] = values
    p = _img(tmp_path, "s.nii.gz", arr)
    got, _ = read_label(p, small=True)
    assert got.dtype == want and got.shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(got[0].astype(np.int64), arr.astype(np.int64))
    assert read_label(p)[0].dtype == (np.int32 if want == np.int32 else np.int16)  # the default is unchanged
