import csv
import shutil
from pathlib import Path

import pytest
import torch

import library.batch as batch_module
from library.batch import (
    IMAGE2TEXT_COLUMNS,
    TEXT2IMAGE_COLUMNS,
    ranking_rows,
    read_image_list,
    read_texts,
    top_matches,
)
from library.cli import main
from tests.conftest import FakeEncoder, solid

ROOT = Path(__file__).resolve().parents[1]


def write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def colour_folder(root, names=("red", "green", "blue")):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        solid(name).save(root / f"{name}.png")
    return root


@pytest.fixture
def fake_model(monkeypatch):
    """Every command run in the test gets a fresh FakeEncoder; the list keeps them all."""
    made = []

    def model_from_args(args):
        made.append(FakeEncoder())
        return made[-1]

    monkeypatch.setattr(batch_module, "model_from_args", model_from_args)
    return made


# ---------------------------------------------------------------------------- CSV reading
def test_read_texts_columns_ids_bom_and_empty_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text_id", "text", "note"],
                     [["a", "red apple", "x"], ["b", "  ", "y"], ["c", "蓝色的天空", "z"]],
                     encoding="utf-8-sig")  # as Excel saves "CSV UTF-8"
    texts = read_texts(path)
    assert texts.texts == ["red apple", "蓝色的天空"] and texts.ids == texts.texts
    assert texts.skipped == 1
    assert read_texts(path, id_column="text_id").ids == ["a", "c"]
    assert read_texts(path, text_column="note").texts == ["x", "y", "z"]
    single = write_csv(tmp_path / "single.csv", ["caption"], [["a dog"]])
    assert read_texts(single).texts == ["a dog"]  # the only column


def test_missing_column_names_it_and_lists_the_others(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["id", "caption"], [["1", "a dog"]])
    expected = r"has no column 'text' \(columns: id, caption\); choose one with --text-column"
    with pytest.raises(ValueError, match=expected):
        read_texts(path)
    with pytest.raises(ValueError, match=r"has no column 'key' \(columns: id, caption\)"):
        read_texts(path, text_column="caption", id_column="key")


def test_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes("text\n蓝色的天空\n".encode("gbk"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_texts(path)


def test_image_list_paths_are_relative_to_the_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_csv(tmp_path / "sub" / "images.csv", ["image_id", "path"],
                     [["one", "a.png"], ["two", str(tmp_path / "b.png")], ["three", ""]])
    assert read_image_list(path) == [("a.png", tmp_path / "sub" / "a.png"),
                                     (str(tmp_path / "b.png"), tmp_path / "b.png")]
    assert [i for i, _ in read_image_list(path, id_column="image_id")] == ["one", "two"]


# ---------------------------------------------------------------------------- ranking
def test_top_matches_and_rows_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]])
    # query 0 scores (.6, 1, .8) -> t1, t2; query 1 scores (.8, 0, .6) -> t0, t2
    scores, indices = top_matches(queries, targets, 2)
    assert indices.tolist() == [[1, 2], [0, 2]]
    assert ranking_rows(["q0", "q1"], ["t0", "t1", "t2"], scores, indices) == [
        ("q0", 1, "t1", "1.0000"), ("q0", 2, "t2", "0.8000"),
        ("q1", 1, "t0", "0.8000"), ("q1", 2, "t2", "0.6000")]
    assert top_matches(queries, targets, 10)[1].shape == (2, 3)  # k capped at the targets


# ---------------------------------------------------------------------------- commands
def test_text2image_ranks_colours_and_reuses_the_feature_cache(tmp_path, fake_model, capsys):
    images = colour_folder(tmp_path / "images", ("red", "green", "blue", "yellow"))
    texts = write_csv(tmp_path / "word_test.csv", ["text_id", "text"],
                      [["t1", "a red car"], ["t2", "the blue sea"]])
    out = tmp_path / "result.csv"
    args = ["text2image", "--texts", str(texts), "--id-column", "text_id", "--images", str(images),
            "--top", "3", "--out", str(out)]
    assert main(args) == 0
    rows = read_rows(out)
    assert tuple(rows[0]) == TEXT2IMAGE_COLUMNS and len(rows) == 1 + 2 * 3
    assert [r[:3] for r in rows[1:]][:2] == [["t1", "1", "red.png"], ["t1", "2", "yellow.png"]]
    assert rows[4][:3] == ["t2", "1", "blue.png"]
    scores = [float(r[3]) for r in rows[1:4]]
    assert scores == sorted(scores, reverse=True)
    assert fake_model[0].image_calls > 0
    assert (images / "features_library.pth").exists()

    assert main(args) == 0  # second run: the features come from the library file
    assert fake_model[1].image_calls == 0
    assert read_rows(out) == rows
    assert "4 images (0 embedded now)" in capsys.readouterr().out


def test_image2text_with_a_features_option(tmp_path, fake_model):
    images = colour_folder(tmp_path / "images")
    texts = write_csv(tmp_path / "word_data.csv", ["text"],
                      [["green grass"], ["red"], ["blue"], ["something"]])
    out = tmp_path / "out" / "result.csv"
    features = tmp_path / "cache" / "colours.pth"
    assert main(["image2text", "--texts", str(texts), "--images", str(images), "--features",
                 str(features), "--top", "2", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert tuple(rows[0]) == IMAGE2TEXT_COLUMNS and len(rows) == 1 + 3 * 2
    best = {r[0]: r[2] for r in rows[1:] if r[1] == "1"}
    assert best == {"blue.png": "blue", "green.png": "green grass", "red.png": "red"}
    assert features.exists() and not (images / "features_library.pth").exists()


def test_chinese_text_and_file_names_survive_the_round_trip(tmp_path, fake_model):
    images = tmp_path / "图片"
    images.mkdir()
    solid("red").save(images / "红色.png")
    solid("blue").save(images / "蓝色.png")
    texts = write_csv(tmp_path / "词.csv", ["编号", "文本"],
                      [["一", "红色 red"], ["二", "蓝色的天空 blue"]], encoding="utf-8-sig")
    out = tmp_path / "结果.csv"
    assert main(["text2image", "--texts", str(texts), "--text-column", "文本", "--images",
                 str(images), "--top", "1", "--out", str(out)]) == 0
    assert read_rows(out)[1:] == [["红色 red", "1", "红色.png", read_rows(out)[1][3]],
                                  ["蓝色的天空 blue", "1", "蓝色.png", read_rows(out)[2][3]]]
    assert main(["image2text", "--texts", str(texts), "--text-column", "文本", "--id-column", "编号",
                 "--images", str(images), "--top", "1", "--out", str(out)]) == 0
    assert [r[:3] for r in read_rows(out)[1:]] == [["红色.png", "1", "一"], ["蓝色.png", "1", "二"]]
    assert out.read_bytes()[:3] != b"\xef\xbb\xbf"  # written as plain UTF-8


def test_image_csv_input_skips_unreadable_images(tmp_path, fake_model, capsys):
    folder = colour_folder(tmp_path / "pictures")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    images = write_csv(tmp_path / "images.csv", ["id", "path"],
                       [["r", "pictures/red.png"], ["x", "pictures/broken.jpg"],
                        ["m", "pictures/missing.png"], ["b", "pictures/blue.png"]])
    texts = write_csv(tmp_path / "texts.csv", ["text"], [["red"], ["blue"]])
    out = tmp_path / "result.csv"
    assert main(["image2text", "--texts", str(texts), "--images", str(images), "--image-id-column",
                 "id", "--top", "1", "--out", str(out)]) == 0
    assert [r[:3] for r in read_rows(out)[1:]] == [["r", "1", "red"], ["b", "1", "blue"]]
    err = capsys.readouterr().err
    assert "skipped unreadable image x" in err and "skipped unreadable image m: file not found" in err
    assert not (folder / "features_library.pth").exists()  # a CSV of images is not a library


def test_real_tiny_model_on_demo_photos(tmp_path, tiny_checkpoint):
    images = tmp_path / "demo"
    images.mkdir()
    for name in ("coffee.png", "rocket.jpg", "chelsea_cat.png", "astronaut.png"):
        shutil.copy(ROOT / "demo" / name, images / name)
    texts = write_csv(tmp_path / "texts.csv", ["text"], [["a cup of coffee"], ["a rocket"], ["a cat"]])
    out = tmp_path / "t2i.csv"
    assert main(["text2image", "--texts", str(texts), "--images", str(images), "--top", "5",
                 "--out", str(out), "--model", tiny_checkpoint, "--batch-size", "2"]) == 0
    rows = read_rows(out)[1:]
    assert len(rows) == 3 * 4  # top 5 capped at the 4 images
    for text in ("a cup of coffee", "a rocket", "a cat"):
        mine = [r for r in rows if r[0] == text]
        assert [r[1] for r in mine] == ["1", "2", "3", "4"]
        assert sorted(r[2] for r in mine) == sorted(p.name for p in images.glob("*.*g"))
        assert [float(r[3]) for r in mine] == sorted((float(r[3]) for r in mine), reverse=True)
    assert main(["image2text", "--texts", str(texts), "--images", str(images), "--top", "2",
                 "--out", str(tmp_path / "i2t.csv"), "--model", tiny_checkpoint]) == 0
    assert len(read_rows(tmp_path / "i2t.csv")) == 1 + 4 * 2


def test_bad_input_is_an_error_without_a_traceback(tmp_path, fake_model, capsys):
    images = colour_folder(tmp_path / "images")
    texts = write_csv(tmp_path / "texts.csv", ["caption"], [["red"]])
    base = ["--texts", str(texts), "--images", str(images), "--out", str(tmp_path / "o.csv")]
    assert main(["text2image", *base, "--text-column", "words"]) == 1
    assert "error: " in (err := capsys.readouterr().err) and "no column 'words' (columns: caption)" in err
    assert main(["text2image", "--texts", str(tmp_path / "nope.csv"), *base[2:]]) == 1
    assert "nope.csv" in capsys.readouterr().err
    assert main(["image2text", "--texts", str(texts), "--images", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o.csv")]) == 1
    assert "no such folder or CSV file" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # never created by the library
    with pytest.raises(SystemExit):
        main(["text2image", *base, "--top", "0"])
