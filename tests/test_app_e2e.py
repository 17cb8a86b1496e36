"""The launched app, driven through gradio_client by its named endpoints."""

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from tests.conftest import distinct_image
from tests.test_app import CAPTION


@pytest.fixture
def served(demo_library, launch_app, tmp_path):
    client = Client(launch_app(demo_library), verbose=False)
    yield client, demo_library, tmp_path
    client.close()


def test_every_named_endpoint_through_gradio_client(served):
    client, library, tmp_path = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/classify", "/search_text", "/search_image", "/add_images", "/gallery"}

    results = client.predict("a cup of coffee", 3, api_name="/search_text")
    assert len(results) == 3
    scores = [float(r["caption"].split(" · ")[0]) for r in results]
    assert scores == sorted(scores, reverse=True)
    assert {CAPTION.match(r["caption"]).group(1) for r in results} <= set(library.files)

    photo = tmp_path / "images" / "rocket.jpg"
    similar = client.predict(handle_file(str(photo)), 10, api_name="/search_image")
    assert len(similar) == 3  # the four photos minus the query itself
    assert "rocket.jpg" not in [CAPTION.match(r["caption"]).group(1) for r in similar]

    label = client.predict(handle_file(str(photo)), "rocket, cat, flower", True, api_name="/classify")
    assert [c["label"] for c in label["confidences"]][0] == label["label"]
    assert sum(c["confidence"] for c in label["confidences"]) == pytest.approx(1.0, abs=1e-4)
    assert len(library) == 4  # rocket.jpg was already in the library

    new = tmp_path / "new_upload.png"
    distinct_image(5, (60, 40)).save(new)
    junk = tmp_path / "notes.jpg"
    junk.write_text("this is not a picture")
    status, gallery = client.predict([handle_file(str(new)), handle_file(str(junk))],
                                     api_name="/add_images")
    assert status.startswith("1 added, 0 already in the library, 1 refused.")
    assert "notes.jpg: not a recognised image" in status
    added = next(f for f in library.files if f.endswith("-new_upload.png"))
    assert gallery[0]["caption"] == added
    assert added in torch.load(library.features_path, weights_only=True)["files"]

    status, _ = client.predict([handle_file(str(new))], api_name="/add_images")
    assert status.startswith("0 added, 1 already in the library")
    assert len(library) == 5

    page = client.predict(1, api_name="/gallery")
    assert [item["caption"] for item in page][0] == added and len(page) == 5


def test_errors_reach_the_client_as_messages_and_change_nothing(served):
    client, library, tmp_path = served
    before = list(library.files)
    bomb = tmp_path / "bomb.png"
    from tests.test_images import png_declaring
    bomb.write_bytes(png_declaring(30000, 30000))
    with pytest.raises(AppError, match="decompression bomb"):
        client.predict(handle_file(str(bomb)), "cat", True, api_name="/classify")
    with pytest.raises(AppError, match="no labels"):
        client.predict(handle_file(str(tmp_path / "images" / "coffee.png")), ",,", True,
                       api_name="/classify")
    with pytest.raises(AppError, match="Type something"):
        client.predict("  ", 3, api_name="/search_text")
    assert library.files == before
    assert len(client.predict("coffee", 4, api_name="/search_text")) == 4  # still serving


def test_uploads_over_the_size_limit_are_refused(demo_library, launch_app, tmp_path):
    client = Client(launch_app(demo_library, app.Limits(max_upload_mb=1)), verbose=False)
    big = tmp_path / "big.bmp"
    Image.effect_noise((800, 600), 60).convert("RGB").save(big)  # about 1.4 MB
    with pytest.raises(Exception, match="maximum file size"):
        client.predict([handle_file(str(big))], api_name="/add_images")
    client.close()
    assert len(demo_library) == 4
