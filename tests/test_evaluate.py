import json
import math

import pytest
import torch

import library.evaluate as evaluate_module
from library import metrics
from library.cli import main
from library.datasets import read_class_names, read_ground_truth, read_labelled_images
from library.evaluate import evaluate_retrieval, evaluate_zero_shot
from tests.conftest import FakeEncoder, solid

# A labelled colour set for the FakeEncoder (image = mean colour). One image in red/ is really
# yellow-green: zero-shot calls it green, and its nearest images are the greens.
COLOUR_SET = {
    "red": {"r1.png": (250, 0, 30), "r2.png": (250, 30, 0), "odd.png": (150, 255, 0)},
    "green": {"g1.png": (0, 255, 0), "g2.png": (10, 245, 5)},
    "blue": {"b1.png": (0, 0, 255), "b2.png": (20, 10, 240)},
}
# Distractors: a pure red (closer to r1 and r2 than they are to each other) and a grey.
DISTRACTORS = {"d1.png": (255, 0, 0), "d2.png": (200, 200, 200)}


def colour_dataset(root):
    """Write COLOUR_SET as class folders under ``root``; returns ``root``."""
    for label, images in COLOUR_SET.items():
        (root / label).mkdir(parents=True)
        for name, rgb in images.items():
            solid(rgb).save(root / label / name)
    return root


def distractor_folder(root):
    root.mkdir(parents=True)
    for name, rgb in DISTRACTORS.items():
        solid(rgb).save(root / name)
    return root


# ---------------------------------------------------------------------------- metrics by hand
# Five targets t0..t4: t0, t1, t2 are class 0, t3 is class 1 (alone), t4 is a distractor.
# The queries are t0..t3 themselves (the diagonal is excluded).
SIMILARITY = torch.tensor([
    #  t0    t1    t2    t3    t4
    [1.00, 0.90, 0.30, 0.80, 0.50],  # q0 ranks t1 (R), t3, t4 (D), t2 (R)
    [0.40, 1.00, 0.60, 0.10, 0.70],  # q1 ranks t4 (D), t2 (R), t0 (R), t3
    [0.20, 0.50, 1.00, 0.90, 0.80],  # q2 ranks t3, t4 (D), t1 (R), t0 (R)
    [0.70, 0.20, 0.65, 1.00, 0.60],  # q3 ranks t0, t2, t4 (D), t1: nothing relevant
])
QUERY_LABELS = torch.tensor([0, 0, 0, 1])
TARGET_LABELS = torch.tensor([0, 0, 0, 1, metrics.DISTRACTOR])
EXCLUDED = metrics.self_excluded(4, 5)


def test_self_excluded_masks_the_diagonal_from_an_offset():
    assert metrics.self_excluded(2, 4, offset=1).tolist() == [
        [False, True, False, False], [False, False, True, False]]


def test_precision_at_k_by_hand():
    # Top 2 of each query: q0 {t1 R, t3} = 1/2; q1 {t4, t2 R} = 1/2; q2 {t3, t4} = 0; q3 {t0, t2} = 0.
    precision = metrics.precision_at_k(SIMILARITY, QUERY_LABELS, TARGET_LABELS, 2, EXCLUDED)
    assert precision.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    # Top 1 without excluding itself: every query finds itself (1.00), so precision 1.
    assert metrics.precision_at_k(SIMILARITY, QUERY_LABELS, TARGET_LABELS, 1).tolist() == [1, 1, 1, 1]


def test_average_precision_by_hand():
    # q0: relevant at ranks 1 and 4 -> (1/1 + 2/4) / 2 = 0.75
    # q1: relevant at ranks 2 and 3 -> (1/2 + 2/3) / 2 = 7/12
    # q2: relevant at ranks 3 and 4 -> (1/3 + 2/4) / 2 = 5/12
    # q3: its class has no other image -> nan, left out of the mean
    ap = metrics.average_precision(SIMILARITY, QUERY_LABELS, TARGET_LABELS, EXCLUDED)
    assert ap[:3].tolist() == pytest.approx([0.75, 7 / 12, 5 / 12])
    assert math.isnan(ap[3])
    assert float(ap.nanmean()) == pytest.approx((0.75 + 7 / 12 + 5 / 12) / 3)  # mAP = 0.58333


def test_mean_top_k_similarity_and_distractor_counts_by_hand():
    # Top 2 scores: q0 .90 .80 -> .85; q1 .70 .60 -> .65; q2 .90 .80 -> .85; q3 .70 .65 -> .675
    similarity = metrics.mean_top_k_similarity(SIMILARITY, 2, EXCLUDED)
    assert similarity.tolist() == pytest.approx([0.85, 0.65, 0.85, 0.675])
    # The distractor t4 (.50 .70 .80 .60) is in the top 2 of q1 and q2 only, in the top 3 of all.
    assert metrics.distractors_in_top_k(SIMILARITY, TARGET_LABELS, 2, EXCLUDED).tolist() == [0, 1, 1, 0]
    assert metrics.distractors_in_top_k(SIMILARITY, TARGET_LABELS, 3, EXCLUDED).tolist() == [1, 1, 1, 1]


def test_per_class_mean_and_sum_by_hand():
    # P@2 per query (above) 1/2, 1/2, 0 | 0 -> class 0: 1/3, class 1: 0, class 2 (empty): nan
    precision = torch.tensor([0.5, 0.5, 0.0, 0.0])
    per_class = metrics.per_class_mean(precision, QUERY_LABELS, 3)
    assert per_class[:2].tolist() == pytest.approx([1 / 3, 0.0]) and math.isnan(per_class[2])
    # AP 0.75, 7/12, 5/12 | nan -> class 0: 7/12 (0.5833), class 1: nan (no value)
    ap = torch.tensor([0.75, 7 / 12, 5 / 12, float("nan")])
    per_class = metrics.per_class_mean(ap, QUERY_LABELS, 2)
    assert float(per_class[0]) == pytest.approx(7 / 12) and math.isnan(per_class[1])
    # Distractors in the top 2: 0, 1, 1 | 0 -> class 0: 2, class 1: 0
    assert metrics.per_class_sum(torch.tensor([0, 1, 1, 0]), QUERY_LABELS, 2).tolist() == [2, 0]


def test_top_k_accuracy_by_hand():
    scores = torch.tensor([
        [0.10, 0.50, 0.30, 0.10],  # true 1: ranked 1st
        [0.60, 0.10, 0.20, 0.05],  # true 2: ranked 2nd (after class 0)
        [0.20, 0.30, 0.40, 0.10],  # true 3: ranked 4th (last)
    ])
    targets = torch.tensor([1, 2, 3])
    assert metrics.top_k_accuracy(scores, targets, 1).tolist() == [True, False, False]  # 1/3
    assert metrics.top_k_accuracy(scores, targets, 2).tolist() == [True, True, False]  # 2/3
    assert metrics.top_k_accuracy(scores, targets, 5).tolist() == [True, True, True]  # 4 classes < 5


def test_k_larger_than_the_candidates_is_refused():
    with pytest.raises(ValueError, match="k=5"):
        metrics.precision_at_k(SIMILARITY, QUERY_LABELS, TARGET_LABELS, 5, EXCLUDED)


# ---------------------------------------------------------------------------- layouts
def test_class_folders_layout(tmp_path):
    data = colour_dataset(tmp_path / "colours")
    (data / ".hidden").mkdir()
    dataset = read_labelled_images(data)
    assert dataset.layout == "folders" and dataset.classes == ["blue", "green", "red"]
    assert dataset.names[:2] == ["blue/b1.png", "blue/b2.png"] and dataset.labels.count(2) == 3
    (tmp_path / "names.txt").write_text("sea\ngrass\n\nfire\n")
    assert read_labelled_images(data, class_names=tmp_path / "names.txt").classes == ["sea", "grass", "fire"]
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="names 2 classes but .* has 3 class folders"):
        read_labelled_images(data, class_names=tmp_path / "two.txt")


def test_flat_folder_without_ground_truth_is_a_clear_error(tmp_path):
    solid("red").save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders.*--labels FILE and --classes FILE"):
        read_labelled_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_labelled_images(tmp_path / "missing")


def test_class_names_files(tmp_path):
    (tmp_path / "list.json").write_text('["tench", "goldfish"]')
    (tmp_path / "keras.json").write_text('{"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}')
    (tmp_path / "plain.txt").write_text("\ufefftench\ngoldfish\n", encoding="utf-8")
    for name in ("list.json", "keras.json", "plain.txt"):
        assert read_class_names(tmp_path / name) == ["tench", "goldfish"]
    (tmp_path / "bad.json").write_text('{"a": "tench"}')
    with pytest.raises(ValueError, match="class indices"):
        read_class_names(tmp_path / "bad.json")


def test_imagenet_validation_layout(tmp_path):
    for i, colour in enumerate(["red", "blue", "green", "red"]):
        solid(colour).save(tmp_path / f"ILSVRC2012_val_{i + 1:08d}.png")
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "truth.txt").write_text("0\n2\n1\n0\n")
    dataset = read_labelled_images(tmp_path, tmp_path / "truth.txt", tmp_path / "classes.txt")
    assert dataset.layout == "imagenet" and dataset.labels == [0, 2, 1, 0]
    assert dataset.names[0] == "ILSVRC2012_val_00000001.png"
    # The "FILE INDEX" form names its files.
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000002.png 2\nILSVRC2012_val_00000001.png 0\n")
    named = read_labelled_images(tmp_path, tmp_path / "val.txt", tmp_path / "classes.txt")
    assert named.names == ["ILSVRC2012_val_00000001.png", "ILSVRC2012_val_00000002.png"]
    assert named.labels == [0, 2]
    (tmp_path / "short.txt").write_text("0\n1\n")
    with pytest.raises(ValueError, match="2 class indices but .* has 4 images"):
        read_labelled_images(tmp_path, tmp_path / "short.txt", tmp_path / "classes.txt")
    with pytest.raises(ValueError, match="line 2: class index 3 is outside 0..2"):
        (tmp_path / "range.txt").write_text("0\n3\n")
        read_ground_truth(tmp_path / "range.txt", 3)
    with pytest.raises(ValueError, match="class-names file"):
        read_labelled_images(tmp_path, tmp_path / "truth.txt")


# ---------------------------------------------------------------------------- runs
def test_zero_shot_accuracy_on_the_colour_set(tmp_path):
    data = colour_dataset(tmp_path / "colours")
    (data / "blue" / "broken.jpg").write_bytes(b"not an image")
    result = evaluate_zero_shot(FakeEncoder(), read_labelled_images(data), progress=False)
    # 7 readable images; odd.png (yellow-green, in red/) is called green: 6/7 right.
    assert result.summary["images"] == 7
    assert result.summary["top1"] == pytest.approx(6 / 7)
    assert result.summary["top5"] == 1.0  # only 3 classes
    per_class = {row.name: (row.images, row.values["top1"]) for row in result.per_class}
    assert per_class == {"blue": (2, 1.0), "green": (2, 1.0), "red": (3, pytest.approx(2 / 3))}
    assert [name for name, _ in result.skipped] == ["blue/broken.jpg"]
    assert result.summary["ms_per_image"] > 0 and result.summary["images_per_second"] > 0


def test_retrieval_on_the_colour_set(tmp_path):
    data = read_labelled_images(colour_dataset(tmp_path / "colours"))
    # k=1: r1<->r2, g1<->g2, b1<->b2 find their pair; odd.png finds g2 (wrong class): 6/7.
    result = evaluate_retrieval(FakeEncoder(), data, 1, progress=False)
    assert result.summary["precision_at_k"] == pytest.approx(6 / 7)
    # AP: every query ranks its relevant images first, except odd.png, whose classmates r2 and
    # r1 come 3rd and 4th after g2 and g1: (1/3 + 2/4) / 2 = 5/12. mAP = (6 + 5/12) / 7.
    assert result.summary["map"] == pytest.approx((6 + 5 / 12) / 7)
    red = next(row for row in result.per_class if row.name == "red")
    assert red.values["precision_at_k"] == pytest.approx(2 / 3)
    assert red.values["average_precision"] == pytest.approx((2 + 5 / 12) / 3)
    assert "distractors_in_top_k" not in red.values


def test_retrieval_counts_distractors_in_each_class_top_k(tmp_path):
    data = read_labelled_images(colour_dataset(tmp_path / "colours"))
    distractors = [(p.name, p) for p in sorted(distractor_folder(tmp_path / "d").iterdir())]
    result = evaluate_retrieval(FakeEncoder(), data, 2, distractors=distractors, progress=False)
    # Top 2: r1 {d1, r2}, r2 {d1, r1}: the pure red d1 enters both; odd {g2, g1}.
    # g1 {g2, odd}, g2 {g1, odd}: none. b1 {b2, d2}, b2 {b1, d2}: the grey d2 enters both.
    counts = {row.name: row.values["distractors_in_top_k"] for row in result.per_class}
    assert counts == {"blue": 2, "green": 0, "red": 2}
    assert result.summary["distractors"] == 2 and result.summary["distractors_in_top_k"] == 4
    # P@2: r1, r2 1/2; odd 0 | g1, g2 1/2 (odd is red) | b1, b2 1/2 -> 6 x 1/2 / 7 = 3/7
    assert result.summary["precision_at_k"] == pytest.approx(3 / 7)


def test_zeroshot_command_writes_json_log_and_plot(tmp_path, tiny_checkpoint, capsys):
    data = colour_dataset(tmp_path / "colours")
    out = tmp_path / "results" / "zeroshot.json"
    code = main(["zeroshot", "--data", str(data), "--model", tiny_checkpoint, "--no-ensemble",
                 "--preprocess", "pad", "--out", str(out), "--plot", str(tmp_path / "acc.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1 accuracy:" in printed and "ms per image" in printed and "images/s" in printed
    report = json.loads(out.read_text())
    assert report["command"] == "zeroshot" and report["images"] == 7 and report["classes"] == 3
    assert report["model"].endswith("+pad") and report["ensemble"] is False
    assert 0 <= report["top1"] <= report["top5"] == 1.0
    assert [row["class"] for row in report["per_class"]] == ["blue", "green", "red"]
    assert "top-5 accuracy" in out.with_suffix(".log").read_text()
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_zeroshot_command_with_the_fake_encoder_flat_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "model_from_args", lambda args: FakeEncoder())
    for i, colour in enumerate(["red", "blue", "green", (0, 200, 60)]):
        solid(colour).save(tmp_path / f"val_{i}.png")
    (tmp_path / "classes.json").write_text('["red", "green", "blue"]')
    (tmp_path / "truth.txt").write_text("0\n2\n1\n2\n")  # the last, green, is labelled blue
    code = main(["zeroshot", "--data", str(tmp_path), "--labels", str(tmp_path / "truth.txt"),
                 "--classes", str(tmp_path / "classes.json"), "--log", str(tmp_path / "run.log")])
    assert code == 0
    assert "top-1 accuracy: 75.00%" in capsys.readouterr().out
    assert "imagenet layout" in (tmp_path / "run.log").read_text()


def test_retrieval_command_with_distractors_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "model_from_args", lambda args: FakeEncoder())
    data = colour_dataset(tmp_path / "colours")
    distractors = distractor_folder(tmp_path / "coasters")
    out = tmp_path / "retrieval.json"
    code = main(["retrieval", "--data", str(data), "--k", "2", "--distractors", str(distractors),
                 "--out", str(out), "--plot", str(tmp_path / "precision.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "precision@2: 0.4286" in printed and "distractors in a top 2: 4 of 14 places" in printed
    report = json.loads(out.read_text())
    assert report["k"] == 2 and report["distractors"] == 2
    assert {row["class"]: row["distractors_in_top_k"] for row in report["per_class"]} == {
        "blue": 2, "green": 0, "red": 2}
    assert (tmp_path / "precision.png").stat().st_size > 0
    assert out.with_suffix(".log").exists()


def test_evaluation_commands_report_bad_input_without_a_traceback(tmp_path, tiny_checkpoint, capsys):
    assert main(["zeroshot", "--data", str(tmp_path / "missing"), "--model", tiny_checkpoint]) == 1
    assert "error: dataset folder" in capsys.readouterr().err
    data = colour_dataset(tmp_path / "colours")
    assert main(["retrieval", "--data", str(data), "--k", "7", "--model", tiny_checkpoint]) == 1
    assert "error: k=7 needs at least 8 readable images" in capsys.readouterr().err
    broken = tmp_path / "broken" / "cats"
    broken.mkdir(parents=True)
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    assert main(["retrieval", "--data", str(broken.parent), "--model", tiny_checkpoint]) == 1
    err = capsys.readouterr().err
    assert "error: none of the 1 images" in err and "cats/a.jpg: not a recognised image" in err
