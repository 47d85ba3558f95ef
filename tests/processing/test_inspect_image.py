import json
import subprocess
import sys

from PIL import Image

from tests.conftest import REPO


def test_counts_match_the_spec_table(tmp_path):
    sizes = {(728, 400): (2, 0, 337), (1024, 768): (4, 1, 504), (1280, 720): (6, 1, 670), (640, 480): (0, 0, 171)}
    paths = []
    for w, h in sizes:
        paths.append(tmp_path / f"{w}x{h}.jpg")
        Image.new("RGB", (w, h), "gray").save(paths[-1])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    result = subprocess.run(
        [sys.executable, "launch/inspect_image.py", *map(str, paths), str(tmp_path / "broken.jpg")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "broken.jpg" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(sizes)
    for row, ((w, h), (crops, newlines, tokens)) in zip(rows, sizes.items(), strict=True):
        assert (row["width"], row["height"]) == (w, h)
        assert (row["num_crops"], row["num_newlines"], row["num_image_tokens"]) == (crops, newlines, tokens)


def test_tiny_processor_option(tmp_path):
    Image.new("RGB", (451, 300)).save(tmp_path / "cat.png")
    result = subprocess.run(
        [
            sys.executable,
            "launch/inspect_image.py",
            str(tmp_path / "cat.png"),
            "--processor",
            "configs/processor/tiny.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert json.loads(result.stdout)["num_image_tokens"] == 6 * (9 + 2) + 1 + 16 + 2
