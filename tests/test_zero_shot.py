import pytest
import torch

from library import ZeroShotClassifier, parse_labels
from library.zero_shot import IMAGENET_TEMPLATES, LOGIT_SCALE, label_prompts
from tests.conftest import FakeEncoder, solid


def test_labels_are_split_stripped_deduplicated():
    assert parse_labels(" cat, dog\nbird ,, cat\n\n  red   car ") == ["cat", "dog", "bird", "red car"]
    assert parse_labels("猫，狗、鸟") == ["猫", "狗", "鸟"]
    assert parse_labels("x" * 5000 + ", y") == ["x" * 300, "y"]


@pytest.mark.parametrize("text", ["", " , \n ,", None])
def test_no_labels_left_is_a_clear_error(text):
    with pytest.raises(ValueError, match="no labels"):
        parse_labels(text)


def test_too_many_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 10"):
        parse_labels(",".join(f"label{i}" for i in range(11)), max_labels=10)


def test_openai_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert "itap of a {}." in IMAGENET_TEMPLATES and "a photo of a {}." in IMAGENET_TEMPLATES
    assert label_prompts("cat", ensemble=False) == ["a photo of a cat."]
    assert len(label_prompts("cat")) == 80


def test_ensemble_is_the_renormalised_mean_of_template_embeddings(tiny_model):
    classifier = ZeroShotClassifier(tiny_model)
    embedding = classifier.label_embeddings(["cat", "dog"])
    cat = tiny_model.encode_texts([t.format("cat") for t in IMAGENET_TEMPLATES]).mean(dim=0)
    assert torch.allclose(embedding[0], cat / cat.norm(), atol=1e-5)
    single = classifier.label_embeddings(["cat", "dog"], ensemble=False)
    assert torch.allclose(single[0], tiny_model.encode_texts(["a photo of a cat."])[0], atol=1e-6)


def test_classify_is_a_sorted_softmax_over_100x_cosine(tiny_model):
    classifier = ZeroShotClassifier(tiny_model)
    image = solid("red", (64, 64))
    result = classifier.classify(image, "cat, dog, rocket", ensemble=False)
    assert sorted(label for label, _ in result) == ["cat", "dog", "rocket"]
    probabilities = [p for _, p in result]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    image_feature = tiny_model.encode_images([image])[0]
    text = tiny_model.encode_texts([f"a photo of a {x}." for x in ("cat", "dog", "rocket")])
    expected = (LOGIT_SCALE * text @ image_feature).softmax(dim=0)
    assert dict(result)["dog"] == pytest.approx(float(expected[1]), abs=1e-5)


def test_classify_finds_the_matching_colour_and_caches_label_sets():
    encoder = FakeEncoder()
    classifier = ZeroShotClassifier(encoder)
    result = classifier.classify(solid("blue"), "red, green, blue")
    assert result[0][0] == "blue" and result[0][1] > 0.5
    calls = encoder.text_calls
    classifier.classify(solid("red"), "red, green, blue")
    assert encoder.text_calls == calls  # cached per (model, labels, ensemble)
    classifier.classify(solid("red"), "red, green, blue", ensemble=False)
    assert encoder.text_calls == calls + 1


def test_text_embeddings_are_cached_per_text(tiny_model, monkeypatch):
    tiny_model.encode_texts(["a cached query"])
    monkeypatch.setattr(tiny_model, "_encode_text_batch",
                        lambda texts: pytest.fail(f"re-encoded {texts}"))
    assert tiny_model.encode_texts(["a cached query"]).shape == (1, tiny_model.dim)


def test_more_texts_than_the_cache_holds_in_one_call(tiny_model, monkeypatch):
    import library.model
    monkeypatch.setattr(library.model, "TEXT_CACHE_SIZE", 10)
    texts = [f"label number {i}" for i in range(25)]
    features = tiny_model.encode_texts(texts, batch_size=7)
    assert features.shape == (25, tiny_model.dim)
    assert torch.allclose(features[20], tiny_model.encode_texts(["label number 20"])[0], atol=1e-6)
    assert len(tiny_model._text_cache) <= 10
