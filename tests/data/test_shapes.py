import itertools

import numpy as np
import pytest
import torch

from difflab.data.shapes import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    ShapesDataset,
    caption_for,
    encode_attributes,
    make_shapes,
    parse_caption,
    render,
    render_batch,
    sample_attributes,
)


def _coverage_from_image(image, attrs, which=""):
    """Recover the coverage of one object from its colour: (x - bg) / (colour - bg), in the
    channel where colour and background differ most."""
    x01 = (image.double() + 1) / 2  # (3, H, W)
    bg = torch.tensor(BACKGROUND_RGB[BACKGROUNDS[attrs["background"]]], dtype=torch.float64)
    col = torch.tensor(COLOR_RGB[COLORS[attrs["color" + which]]], dtype=torch.float64)
    ch = int((col - bg).abs().argmax())
    return (x01[ch] - bg[ch]) / (col[ch] - bg[ch])


def test_deterministic_by_seed_and_index():
    a = make_shapes(64, seed=3)
    b = make_shapes(64, seed=3)
    c = make_shapes(64, seed=4)
    assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    assert not torch.equal(a["images"], c["images"])
    # item i depends on (seed, i) only: not on n, nor on how the set was built
    ds = ShapesDataset(10, seed=3)
    tail = make_shapes(20, seed=3, start=40)
    for i in range(10):
        assert torch.equal(ds[i]["image"], a["images"][i])
        assert ds[i]["caption"] == a["captions"][i]
    assert torch.equal(tail["images"], a["images"][40:60])


def test_item_format():
    item = ShapesDataset(5, size=24, seed=1)[2]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (1, 24, 24)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    assert set(item["attributes"]) == set(ATTRIBUTES) | {"template"}
    assert all(isinstance(v, int) for v in item["attributes"].values())
    with pytest.raises(IndexError):
        ShapesDataset(5)[5]


def test_mask_is_where_image_differs_from_background():
    b = make_shapes(300, seed=7)
    for i in range(300):
        attrs = {k: int(v[i]) for k, v in b["attributes"].items()}
        image, mask = b["images"][i], b["masks"][i, 0].bool()
        bg = torch.tensor(BACKGROUND_RGB[BACKGROUNDS[attrs["background"]]]) * 2 - 1
        differs = (image - bg[:, None, None]).abs().amax(0) > 1e-6
        cov = _coverage_from_image(image, attrs)  # (H, W), ~ k / 64
        assert cov.min() > -1e-5 and cov.max() < 1 + 1e-5
        assert torch.equal(differs, cov > 1e-5)  # background elsewhere
        assert not (mask & ~differs).any()
        sure = (cov - 0.5).abs() > 1e-4  # off the 50% level
        assert torch.equal(mask[sure], (cov >= 0.5)[sure])
        assert mask.sum() >= 9  # the object is visible


def test_two_object_mask_is_union_of_objects():
    b = make_shapes(50, seed=8, objects=2)
    for i in range(50):
        a = {k: int(v[i]) for k, v in b["attributes"].items()}
        first = {k: a[k] for k in ("shape", "color", "size", "position", "background")}
        second = {k: a[k + "2"] for k in ("shape", "color", "size", "position")}
        _, m1 = render(first, return_mask=True)
        _, m2 = render({**second, "background": a["background"]}, return_mask=True)
        assert not (m1.bool() & m2.bool()).any()  # never overlapping
        assert torch.equal(b["masks"][i], torch.maximum(m1, m2))


def test_captions_match_attributes():
    b = make_shapes(400, seed=11)
    seen = set()
    for i, cap in enumerate(b["captions"]):
        attrs = {k: int(v[i]) for k, v in b["attributes"].items()}
        assert cap == caption_for(attrs)
        parsed = parse_caption(cap)
        for k in ("shape", "color", "size", "position"):
            assert parsed[k] == attrs[k], (cap, k)
        if "background" in parsed:
            assert parsed["background"] == attrs["background"]
        assert SHAPES[attrs["shape"]] in cap and COLORS[attrs["color"]] in cap
        seen.add(attrs["template"])
    assert seen == set(range(len(TEMPLATES)))
    assert (
        caption_for({"shape": "circle", "color": "red", "size": "large", "position": "left"})
        == "a large red circle on the left"
    )


def test_two_object_captions_parse():
    b = make_shapes(100, seed=2, objects=2)
    for i, cap in enumerate(b["captions"]):
        parsed = parse_caption(cap)
        for k in ("shape", "color", "size", "position", "shape2", "color2", "size2", "position2"):
            assert parsed[k] == int(b["attributes"][k][i])
        assert " and " in cap


def test_vectorised_and_per_item_renderers_agree():
    combos = list(itertools.product(range(len(SHAPES)), range(len(SIZES)), range(len(POSITIONS))))
    attrs = {"shape": [], "color": [], "size": [], "position": [], "background": []}
    for j, (s, z, p) in enumerate(combos):
        for k, v in zip(attrs, (s, j % len(COLORS), z, p, j % len(BACKGROUNDS))):
            attrs[k].append(v)
    images, masks = render_batch(attrs, 32)
    for j in range(len(combos)):
        one = {k: v[j] for k, v in attrs.items()}
        x, m = render(one, 32, return_mask=True)
        torch.testing.assert_close(x, images[j], atol=1e-6, rtol=0)
        assert torch.equal(m, masks[j])
    # all 50 layouts are distinct, and large objects cover more than small ones
    flat = masks.flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == len(combos)
    area = flat.sum(1).reshape(len(SHAPES), len(SIZES), len(POSITIONS))
    assert (area[:, 1] > 1.8 * area[:, 0]).all()


def test_positions_are_where_captions_say():
    for s, p in itertools.product(SHAPES, POSITIONS):
        _, m = render({"shape": s, "color": "red", "size": "small", "position": p}, return_mask=True)
        ys, xs = torch.nonzero(m[0], as_tuple=True)
        cy, cx = ys.double().mean() / 31, xs.double().mean() / 31
        expect = {
            "left": (0.5, 0.25),
            "right": (0.5, 0.75),
            "top": (0.25, 0.5),
            "bottom": (0.75, 0.5),
            "center": (0.5, 0.5),
        }[p]
        assert abs(cy - expect[0]) < 0.08 and abs(cx - expect[1]) < 0.08, (s, p, cy, cx)


def test_render_edit_changes_only_the_colour():
    a = {"shape": "star", "color": "red", "size": "large", "position": "left", "background": "light"}
    x1, m1 = render(a, return_mask=True)
    x2, m2 = render({**a, "color": "blue"}, return_mask=True)
    assert torch.equal(m1, m2)
    bg = torch.tensor(BACKGROUND_RGB["light"])[:, None, None] * 2 - 1
    painted1 = (x1 - bg).abs().amax(0) > 1e-6
    painted2 = (x2 - bg).abs().amax(0) > 1e-6
    changed = (x1 - x2).abs().amax(0) > 1e-6
    assert torch.equal(painted1, painted2) and torch.equal(changed, painted1)


def test_exclude_holds_out_combinations():
    rules = [{"shape": "circle", "color": "red"}, {"shape": "star", "size": "small"}]
    attrs = sample_attributes(3000, seed=5, exclude=rules)
    bad = ((attrs["shape"] == 0) & (attrs["color"] == 0)) | ((attrs["shape"] == 4) & (attrs["size"] == 0))
    assert not bad.any()
    # everything else still appears; unaffected items are unchanged
    pairs = {(s, c) for s, c in zip(attrs["shape"], attrs["color"])}
    assert len(pairs) == len(SHAPES) * len(COLORS) - 1
    plain = sample_attributes(3000, seed=5)
    keep = ~(((plain["shape"] == 0) & (plain["color"] == 0)) | ((plain["shape"] == 4) & (plain["size"] == 0)))
    assert all(np.array_equal(attrs[k][keep], plain[k][keep]) for k in attrs)


def test_attribute_distribution_roughly_uniform():
    attrs = sample_attributes(6000, seed=0)
    for k, vocab in ATTRIBUTES.items():
        counts = np.bincount(attrs[k], minlength=len(vocab))
        expect = 6000 / len(vocab)
        assert np.all(np.abs(counts - expect) < 5 * np.sqrt(expect)), (k, counts)


def test_colours_contrast_with_backgrounds():
    for c, b in itertools.product(COLOR_RGB.values(), BACKGROUND_RGB.values()):
        assert np.abs(np.subtract(c, b)).max() > 0.3


def test_bad_attributes_are_explained():
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        render({"shape": "circle", "color": "pink", "size": "large", "position": "left"})
    with pytest.raises(ValueError, match="lack"):
        encode_attributes({"shape": "circle"})
    with pytest.raises(ValueError, match="opposite|left, right, top or bottom"):
        encode_attributes(
            {"shape": 0, "color": 0, "size": 0, "position": "center", "shape2": 1, "color2": 1, "size2": 1}
        )


def test_make_shapes_is_fast():
    import time

    make_shapes(16, seed=0)  # table warm-up
    t = time.perf_counter()
    b = make_shapes(10_000, seed=1)
    assert time.perf_counter() - t < 5.0
    assert b["images"].shape == (10_000, 3, 32, 32) and len(b["captions"]) == 10_000


def test_two_colour_objects_are_scored_exactly():
    from difflab.data.shapes import make_two_colour, two_colour_score

    x = make_two_colour(40, seed=3)
    assert x.shape == (40, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, make_two_colour(40, seed=3))
    s = two_colour_score(x)
    assert s["split"].all() and s["two_colours"].all()
    mirrored = two_colour_score(x.flip(-1))  # blue left, red right: two colours, the wrong order
    assert not mirrored["split"].any() and mirrored["either_order"].all()
    one = two_colour_score(make_shapes(40, seed=3)["images"])  # single-colour objects: never two colours
    assert not one["two_colours"].any() and not one["either_order"].any()
    # every object pixel red on the left of its centre and blue on its right
    rgb = (x[0] + 1) / 2
    red, blue = torch.tensor(COLOR_RGB["red"]), torch.tensor(COLOR_RGB["blue"])
    is_red = (rgb - red[:, None, None]).abs().amax(0) < 1e-5
    is_blue = (rgb - blue[:, None, None]).abs().amax(0) < 1e-5
    cols = torch.arange(32)
    assert is_red.any() and is_blue.any()
    assert cols[is_red.any(0)].max() < cols[is_blue.any(0)].min()
    with pytest.raises(ValueError, match="two different colours"):
        make_two_colour(2, colors=("red", "red"))
    with pytest.raises(ValueError, match="hexagon"):
        make_two_colour(2, shape="hexagon")
