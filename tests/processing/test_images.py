import io

import pytest
from PIL import Image

from step3vl_train.processing.images import ImageError, load_image


def png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_reads_files_and_bytes_as_rgb(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("L", (40, 30)).save(path)
    assert load_image(path).mode == "RGB" and load_image(path).size == (40, 30)
    assert load_image(png_bytes(), name="shard-0/000001.jpg").size == (40, 30)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty image file"), (b"not an image at all", "corrupt"), (png_bytes()[:60], "corrupt")],
)
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"bad.png: {message}"):
        load_image(path)


def test_bad_bytes_name_the_sample():
    with pytest.raises(ImageError, match="shard-2/000042.jpg: corrupt"):
        load_image(b"\xff\xd8\xff garbage", name="shard-2/000042.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png: cannot read image"):
        load_image(tmp_path / "nope.png")
