"""tasks/: ShapesVQA, the degradation suite, the JSONL / TSV loaders, the resumable sampler."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tasks import (
    CORRUPTIONS,
    DEFAULT_DEGRADATIONS,
    LEVELS,
    JsonlDataset,
    PromptItem,
    PromptSampler,
    RowError,
    ShapesVQA,
    TsvDataset,
    apply_degradation,
    build_dataset,
    degrade,
    degrade_folder,
    format_prompt,
)
from tasks.degrade import CATEGORIES, corruptions_in
from tasks.shapes import BACKGROUND, COLORS, _in_eval_bucket, render

# ----------------------------------------------------------------------------- helpers


def _foreground(img: np.ndarray, thresh: float = 60.0) -> np.ndarray:
    return np.abs(img.astype(float) - np.array(BACKGROUND, dtype=float)).sum(-1) > thresh


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    names = list(COLORS)
    pal = np.array([COLORS[n] for n in names], dtype=float)
    d = ((pixels[:, None, :].astype(float) - pal[None]) ** 2).sum(-1)
    return np.array(names)[d.argmin(1)]


def _components(mask: np.ndarray, min_size: int = 3) -> list[np.ndarray]:
    """8-connected components of a boolean mask (flood fill), as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    comps = []
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        if len(pts) >= min_size:
            comps.append(np.array(pts))
    return comps


def _test_image(size: int = 64) -> np.ndarray:
    """Shapes on a mid-gray gradient: edges, flat areas, all channels in range, no clipping."""
    objs = [
        {"kind": "circle", "color": "red", "cx": size * 0.3, "cy": size * 0.3, "r": size * 0.2},
        {"kind": "triangle", "color": "blue", "cx": size * 0.7, "cy": size * 0.68, "r": size * 0.22},
        {"kind": "square", "color": "yellow", "cx": size * 0.75, "cy": size * 0.22, "r": size * 0.12},
    ]
    img = render(objs, size).astype(float)
    xx = np.arange(size)[None, :, None]
    return np.clip(img * 0.8 + 40 * xx / size + 10, 0, 255).astype(np.uint8)


def _hf_energy(img: np.ndarray) -> float:
    x = img.astype(float)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float((lap**2).mean())


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- items


def test_format_prompt_letters_and_answer_tags():
    item = PromptItem("p", None, "What color is it?", ["red", "green", "blue", "yellow"], "C", {})
    text = format_prompt(item)
    assert text.startswith("What color is it?")
    assert "A) red B) green C) blue D) yellow" in text
    assert "<answer>" in text and "</answer>" in text
    assert item.answer_text == "blue"
    free = format_prompt(PromptItem("q", None, "Describe.", None, "a cat", {}))
    assert "A)" not in free and "<answer>" in free


# ----------------------------------------------------------------------------- ShapesVQA


def test_shapes_deterministic_and_seed_dependent():
    a = ShapesVQA(40, seed=3, split="train")
    b = ShapesVQA(40, seed=3, split="train")
    c = ShapesVQA(40, seed=4, split="train")
    same_as_c = 0
    for i in range(40):
        x, y, z = a[i], b[i], c[i]
        assert x.prompt_id == y.prompt_id
        assert np.array_equal(x.image, y.image) and np.array_equal(
            x.meta["clean_image"], y.meta["clean_image"]
        )
        assert (x.question, x.choices, x.answer) == (y.question, y.choices, y.answer)
        assert (x.meta["degradation"], x.meta["severity"]) == (y.meta["degradation"], y.meta["severity"])
        same_as_c += np.array_equal(x.meta["clean_image"], z.meta["clean_image"]) and x.question == z.question
    assert same_as_c < 5
    assert np.array_equal(a[-1].image, a[39].image)
    with pytest.raises(IndexError):
        a[40]
    item = a[0]
    assert item.image.shape == (32, 32, 3) and item.image.dtype == np.uint8
    assert len(item.choices) == 4 and item.answer in "ABCD"


def test_shapes_train_eval_disjoint():
    def keys(split, seed):
        ds = ShapesVQA(300, seed=seed, split=split, degrade_prob=0.0)
        return {(it.question, it.meta["clean_image"].tobytes()) for it in ds}

    train = keys("train", 0) | keys("train", 1)
    evals = keys("eval", 0)
    assert len(evals) > 250
    assert not train & evals
    # the partition is by content, whatever the seed: every eval item is in the eval bucket, no train item is
    for split, seed in (("train", 0), ("train", 9), ("eval", 0), ("eval", 9)):
        for it in ShapesVQA(40, seed=seed, split=split, degrade_prob=0.0):
            assert _in_eval_bucket(it.question, it.meta["clean_image"]) == (split == "eval")
    assert {ShapesVQA(5, 0, "train")[i].prompt_id for i in range(5)}.isdisjoint(
        {ShapesVQA(5, 0, "eval")[i].prompt_id for i in range(5)}
    )


def test_colour_is_the_default_majority_and_configurable():
    ds = ShapesVQA(300, seed=0, degrade_prob=0.0)
    kinds = [ds[i].meta["question_type"] for i in range(300)]
    assert kinds.count("color") > 0.4 * len(kinds)
    assert set(kinds) == {"color", "shape", "count", "position"}
    only = ShapesVQA(30, seed=0, question_types=["count"])
    assert {only[i].meta["question_type"] for i in range(30)} == {"count"}
    with pytest.raises(ValueError):
        ShapesVQA(3, question_types=["size"])


def test_colour_answers_match_dominant_colour():
    ds = ShapesVQA(120, seed=5, question_types=["color"], degrade_prob=0.0)
    letters = set()
    for it in ds:
        clean = it.meta["clean_image"]
        fg = clean[_foreground(clean)]
        assert len(fg) > 20
        names, counts = np.unique(_nearest_colour(fg), return_counts=True)
        assert names[counts.argmax()] == it.choices["ABCD".index(it.answer)]
        letters.add(it.answer)
    assert letters == set("ABCD")  # shuffled choices: the answer letter carries no signal


def test_count_position_shape_answers_match_images():
    for it in ShapesVQA(60, seed=1, question_types=["count"], degrade_prob=0.0):
        assert len(_components(_foreground(it.meta["clean_image"]))) == int(it.meta["answer_text"])
    for it in ShapesVQA(60, seed=2, question_types=["position"], degrade_prob=0.0):
        ys, xs = np.nonzero(_foreground(it.meta["clean_image"]))
        cy, cx = ys.mean() / 32, xs.mean() / 32
        where = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65}
        assert where[it.meta["answer_text"]], (it.meta["answer_text"], cx, cy)
        assert 0.3 < (cy if it.meta["answer_text"] in ("left", "right") else cx) < 0.7
    fill_by_shape = {"circle": [], "square": [], "triangle": []}
    for it in ShapesVQA(60, seed=3, question_types=["shape"], degrade_prob=0.0):
        mask = _foreground(it.meta["clean_image"], thresh=120)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill_by_shape[it.meta["answer_text"]].append(mask.sum() / box)
    assert max(fill_by_shape["triangle"]) < min(fill_by_shape["circle"])
    assert max(fill_by_shape["circle"]) < min(fill_by_shape["square"])


def test_shapes_degradation_meta():
    ds = ShapesVQA(60, seed=0, degrade_prob=0.8)
    kinds = set()
    for it in ds:
        deg, sev = it.meta["degradation"], it.meta["severity"]
        if deg == "none":
            assert sev == 0 and np.array_equal(it.image, it.meta["clean_image"])
        else:
            assert deg in DEFAULT_DEGRADATIONS and sev in (1, 2, 3)
            assert not np.array_equal(it.image, it.meta["clean_image"])
            kinds.add(deg)
    assert kinds == set(DEFAULT_DEGRADATIONS)
    clean = ShapesVQA(20, seed=0, degrade_prob=0.0)
    assert all(it.meta["degradation"] == "none" for it in clean)
    suite = ShapesVQA(20, seed=0, degradations=["fog", "pixelate"], severities=[3], degrade_prob=1.0)
    assert {it.meta["degradation"] for it in suite} <= {"fog", "pixelate"}
    assert {it.meta["severity"] for it in suite} == {3}
    big = ShapesVQA(2, seed=0, image_size=64)
    assert big[0].image.shape == (64, 64, 3)


# ----------------------------------------------------------------------------- degradations


def test_suite_has_16_corruptions_in_4_categories():
    assert len(CORRUPTIONS) == 16
    assert set(CATEGORIES) == {c for c, _ in CORRUPTIONS.values()}
    for cat in CATEGORIES:
        assert len(corruptions_in(cat)) == 4
    assert LEVELS == (0.23, 0.45, 0.9)
    for _, fn in CORRUPTIONS.values():
        assert fn.__doc__ and len(fn.__doc__.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_changes_image_and_is_deterministic(name):
    for size in (32, 96):
        img = _test_image(size)
        orig = img.copy()
        for level in LEVELS:
            a = degrade(img, name, level, seed=7, index=2)
            b = degrade(img, name, level, seed=7, index=2)
            assert a.shape == img.shape and a.dtype == np.uint8
            assert np.array_equal(a, b), f"{name} not deterministic at {level}"
            assert not np.array_equal(a, img), f"{name} left the image unchanged at {level}"
        assert np.array_equal(img, orig), f"{name} modified its input"


def test_random_corruptions_depend_on_seed_and_index():
    img = _test_image(64)
    for name in ("gaussian_noise", "motion_blur", "fog", "rain", "snow", "packet_loss", "elastic_warp"):
        a = degrade(img, name, 0.45, seed=0, index=0)
        assert not np.array_equal(a, degrade(img, name, 0.45, seed=1, index=0)), name
        assert not np.array_equal(a, degrade(img, name, 0.45, seed=0, index=1)), name


@pytest.mark.parametrize("name", DEFAULT_DEGRADATIONS)
def test_default_degradations_change_and_are_deterministic(name):
    img = _test_image(32)
    for sev in (1, 2, 3):
        a = apply_degradation(img, name, sev, seed=1, index=4)
        assert np.array_equal(a, apply_degradation(img, name, sev, seed=1, index=4))
        assert not np.array_equal(a, img)
    with pytest.raises(ValueError):
        apply_degradation(img, name, 4)


def test_severity_is_monotone():
    img = _test_image(64)

    def series_suite(name):
        return [degrade(img, name, lv, seed=0) for lv in LEVELS]

    def series_default(name):
        return [apply_degradation(img, name, s, seed=0) for s in (1, 2, 3)]

    def decreasing(values):
        return all(a > b for a, b in zip(values, values[1:]))

    for series in (series_suite("defocus_blur"), series_suite("motion_blur"), series_default("defocus_blur")):
        hf = [_hf_energy(img)] + [_hf_energy(x) for x in series]
        assert decreasing(hf), hf
    for series in (series_suite("gaussian_noise"), series_default("gaussian_noise")):
        var = [float(img.astype(float).var())] + [float(x.astype(float).var()) for x in series]
        assert decreasing([-v for v in var]), var
    for series in (series_suite("low_light"), series_default("low_light")):
        mean = [float(img.mean())] + [float(x.mean()) for x in series]
        assert decreasing(mean), mean
    for series in (series_suite("contrast_reduction"), series_suite("fog")):
        std = [float(img.std())] + [float(x.std()) for x in series]
        assert decreasing(std), std
    err = [float(np.abs(x.astype(float) - img).mean()) for x in series_default("jpeg_compression")]
    assert decreasing([-e for e in err]), err


def test_degrade_rejects_bad_arguments():
    img = _test_image(32)
    with pytest.raises(ValueError, match="unknown corruption"):
        degrade(img, "sparkle", 0.5)
    with pytest.raises(ValueError, match="intensity"):
        degrade(img, "fog", 1.5)
    with pytest.raises(ValueError, match="shape"):
        degrade(np.zeros((4, 4, 2), np.uint8), "fog", 0.5)


def test_degrade_folder_writes_levels_and_manifest(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.roll(_test_image(48), 5 * i, axis=1)).save(src / f"img{i}.png")
    (src / "notes.txt").write_text("not an image")
    manifest_path = degrade_folder(src, tmp_path / "out", seed=3)
    manifest = json.loads(manifest_path.read_text())
    entries = manifest["images"]
    assert len(entries) == 4 * 3
    assert {e["intensity"] for e in entries} == set(LEVELS)
    for e in entries:
        out = np.asarray(Image.open(tmp_path / "out" / e["file"]))
        assert out.shape == (48, 48, 3)
        assert e["file"].startswith(f"{e['intensity']}/")
        assert CORRUPTIONS[e["type"]][0] == e["category"]
        # the written file is exactly the corruption named in the manifest, and one type per source
        assert len({x["type"] for x in entries if x["source"] == e["source"]}) == 1
    for level in LEVELS:
        assert len(list((tmp_path / "out" / str(level)).glob("*.png"))) == 4
    # same seed -> same choice of corruptions and same pixels
    again = json.loads(degrade_folder(src, tmp_path / "out2", seed=3).read_text())["images"]
    assert [(e["file"], e["type"]) for e in again] == [(e["file"], e["type"]) for e in entries]
    e = entries[0]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "out" / e["file"])),
        np.asarray(Image.open(tmp_path / "out2" / e["file"])),
    )
    only = json.loads(degrade_folder(src, tmp_path / "out3", types=["fog"], seed=0).read_text())["images"]
    assert {x["type"] for x in only} == {"fog"}


def test_degrade_folder_names_corrupt_file(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_test_image(32)).save(src / "good.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        degrade_folder(src, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------------------- loaders


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_jsonl_loader_good_rows(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_test_image(16)).save(tmp_path / "imgs" / "a.png")
    _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "q1",
                "image": "imgs/a.png",
                "question": "Color?",
                "choices": ["red", "blue"],
                "answer": "b",
            },
            "",
            {"question": "Which is red?", "choices": ["sky", "apple"], "answer": "apple", "category": "x"},
            {"question": "How many?", "answer": 3},
        ],
    )
    ds = build_dataset("jsonl", path=tmp_path / "d.jsonl")
    assert len(ds) == 3 and ds.skipped == 0
    assert ds[0].image.shape == (16, 16, 3) and ds[0].answer == "B" and ds[0].prompt_id == "q1"
    assert ds[1].image is None and ds[1].answer == "B" and ds[1].meta["category"] == "x"
    assert ds[1].meta["line"] == 3
    assert ds[2].choices is None and ds[2].answer == "3"


def test_jsonl_loader_rejects_bad_rows_with_line_and_field(tmp_path):
    Image.fromarray(_test_image(16)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"PNG? no")
    good = {"image": "ok.png", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "A"}
    rows = [
        good,  # 1
        {"image": "ok.png", "choices": ["a", "b"], "answer": "A"},  # 2: no question
        {"question": "Q?", "choices": ["a", "b"], "answer": "E"},  # 3: answer out of range
        "{not json",  # 4
        {"image": "missing.png", "question": "Q?", "answer": "x"},  # 5: image not found
        {"image": "bad.png", "question": "Q?", "answer": "x"},  # 6: broken image
        {"question": "Q?", "choices": "a,b", "answer": "A"},  # 7: choices not a list
        {"question": "Q?", "choices": ["a", "b"]},  # 8: no answer
        good,  # 9
    ]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(RowError) as ei:
        JsonlDataset(tmp_path / "d.jsonl")
    assert ei.value.line == 2 and ei.value.field == "question"
    assert "d.jsonl:2" in str(ei.value) and "question" in str(ei.value)

    ds = JsonlDataset(tmp_path / "d.jsonl", on_bad_row="skip")
    assert len(ds) == 2 and ds.skipped == 7
    assert [(e.line, e.field) for e in ds.errors] == [
        (2, "question"),
        (3, "answer"),
        (4, None),
        (5, "image"),
        (6, "image"),
        (7, "choices"),
        (8, "answer"),
    ]
    assert "bad.png" in str(ds.errors[4])
    with pytest.raises(ValueError):
        JsonlDataset(tmp_path / "d.jsonl", on_bad_row="ignore")


def _tsv(path, header, rows):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def test_tsv_loader_vlmevalkit_format(tmp_path):
    b64 = base64.b64encode(_png_bytes(_test_image(16))).decode()
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    _tsv(
        tmp_path / "b.tsv",
        header,
        [
            ["0", b64, "What is red?", "", "circle", "square", "triangle", "star", "A", "color"],
            ["1", "0", "Two options?", "", "yes", "no", "", "", "B", "other"],  # image reused from row 0
        ],
    )
    ds = build_dataset("tsv", path=tmp_path / "b.tsv")
    assert len(ds) == 2
    assert ds[0].choices == ["circle", "square", "triangle", "star"] and ds[0].answer == "A"
    assert ds[0].image.shape == (16, 16, 3) and ds[0].meta["category"] == "color"
    assert ds[1].choices == ["yes", "no"] and np.array_equal(ds[1].image, ds[0].image)
    assert "A) yes B) no" in format_prompt(ds[1])


def test_tsv_loader_bad_rows(tmp_path):
    b64 = base64.b64encode(_png_bytes(_test_image(16))).decode()
    junk = base64.b64encode(b"not an image at all").decode()
    header = ["index", "image", "question", "A", "B", "C", "D", "answer"]
    rows = [
        ["0", b64, "Q?", "a", "b", "c", "d", "A"],  # line 2
        ["1", "%%%notbase64", "Q?", "a", "b", "c", "d", "A"],  # line 3
        ["2", junk, "Q?", "a", "b", "c", "d", "A"],  # line 4
        ["3", b64, "Q?", "a", "b", "", "", "D"],  # line 5: answer has no option
        ["4", b64, "Q?", "a", "b"],  # line 6: short row
        ["5", b64, "Q?", "a", "b", "c", "d", "C"],  # line 7
    ]
    _tsv(tmp_path / "b.tsv", header, rows)
    with pytest.raises(RowError) as ei:
        TsvDataset(tmp_path / "b.tsv")
    assert ei.value.line == 3 and ei.value.field == "image" and "b.tsv:3" in str(ei.value)
    ds = TsvDataset(tmp_path / "b.tsv", on_bad_row="skip")
    assert [it.prompt_id for it in ds] == ["0", "5"] and ds.skipped == 4
    assert [(e.line, e.field) for e in ds.errors] == [(3, "image"), (4, "image"), (5, "answer"), (6, None)]
    _tsv(tmp_path / "nohead.tsv", ["index", "image", "question", "A", "B"], [])
    with pytest.raises(RowError, match="answer"):
        TsvDataset(tmp_path / "nohead.tsv")


# ----------------------------------------------------------------------------- sampler & registry


def test_sampler_epochs_and_resume():
    ds = ShapesVQA(10, seed=0, degrade_prob=0.0)
    s = PromptSampler(ds, batch_size=4, seed=11)
    first_epoch = s.next_indices() + s.next_indices() + s.next_indices()[:2]
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    for _ in range(3):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))
    assert set(state) >= {"seed", "epoch", "position"}
    expected = [[it.prompt_id for it in s.next_batch()] for _ in range(4)]

    resumed = PromptSampler(ShapesVQA(10, seed=0, degrade_prob=0.0), batch_size=4, seed=999)
    resumed.load_state_dict(state)
    got = [[it.prompt_id for it in resumed.next_batch()] for _ in range(4)]
    assert got == expected
    assert all(isinstance(b, list) and len(b) == 4 for b in [next(iter(resumed))])

    other = PromptSampler(ds, batch_size=4, seed=12)
    assert [other.next_indices() for _ in range(3)] != [
        PromptSampler(ds, 4, 11).next_indices() for _ in range(3)
    ]
    with pytest.raises(ValueError):
        PromptSampler(ShapesVQA(7), 4, 0).load_state_dict(state)


def test_build_dataset_registry():
    ds = build_dataset("shapes_vqa", size=8, seed=2, split="eval")
    assert isinstance(ds, ShapesVQA) and len(ds) == 8 and ds.split == "eval"
    with pytest.raises(ValueError, match="shapes_vqa"):
        build_dataset("imagenet")
