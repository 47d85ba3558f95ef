import json
import logging

import pytest
import torch
from webdataset import TarWriter

from step3vl_train.data.config import DataConfig
from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.sources import SourceReader
from tests.data.broken_data import EXPECTED_SKIPS, GOOD, TRUNCATED_GOOD, caption, jpeg, png, write_held_out


def pretrain_config(root, **overrides):
    tasks = ["text", "caption", "interleaved", "ocr", "grounding", "counting", "chart", "math"]
    values = {
        "root": str(root),
        "sources": [{"name": task, "paths": [f"{task}/*.tar"]} for task in tasks],
        "num_workers": 0,
        "max_epochs": 1,
    }
    return DataConfig.from_dict({**values, **overrides})


def drain(loader, limit=None):
    batches = []
    for packed in loader:
        batches.append(packed)
        if limit and len(batches) == limit:
            break
    return batches


def test_packing_efficiency_on_the_synthetic_pretraining_corpus(pretrain_corpus, released_processor):
    loader = PackedLoader(pretrain_config(pretrain_corpus), released_processor)
    batches = drain(loader)
    stats = loader.stats()
    assert stats.samples == 160 and stats.skips == {}
    assert stats.packing_efficiency >= 0.95, stats.summary()
    assert stats.packs == len(batches) and all(b.batch.input_ids.shape[1] <= 4096 for b in batches)


def test_every_sample_once_per_epoch_over_ranks_and_workers(pretrain_corpus, tiny_processor):
    keys = []
    for rank in range(2):
        cfg = pretrain_config(pretrain_corpus, num_workers=2, packing={"seq_len": 1024, "window": 4})
        loader = PackedLoader(cfg, tiny_processor, rank=rank, world_size=2)
        keys += [key for packed in drain(loader) for row in packed.keys for key in row]
        assert loader.stats().samples > 0
    assert len(keys) == len(set(keys)) == 160


def test_held_out_shards_skip_counts(tmp_path, tiny_processor):
    paths = write_held_out(str(tmp_path))
    cfg = DataConfig.from_dict({"sources": [{"name": "held_out", "paths": paths}], "num_workers": 2, "max_epochs": 1})
    loader = PackedLoader(cfg, tiny_processor)
    keys = [key for packed in drain(loader) for row in packed.keys for key in row]
    stats = loader.stats()
    assert dict(stats.skips) == dict(stats.skipped_unique) == EXPECTED_SKIPS  # one pass: each key met once
    assert stats.samples == len(keys) == GOOD + TRUNCATED_GOOD
    skipped = sum(EXPECTED_SKIPS.values()) - EXPECTED_SKIPS["unreadable_shard"]
    assert stats.summary()["skipped_samples"] == stats.summary()["skipped_unique_samples"] == skipped


def test_token_shares_follow_the_sft_mix(sft_corpus, tiny_processor):
    multimodal = ["vqa", "ocr", "grounding", "chart", "math"]
    cfg = DataConfig.from_dict(
        {
            "root": str(sft_corpus),
            "sources": [{"name": "text", "paths": ["text/*.tar"], "weight": 0.9}]
            + [{"name": task, "paths": [f"{task}/*.tar"], "weight": 0.02} for task in multimodal],
            "num_workers": 0,
            "packing": {"seq_len": 2048, "window": 4},
        }
    )
    loader = PackedLoader(cfg, tiny_processor)
    drain(loader, limit=60)  # about 15 windows: the one still being emitted barely moves the shares
    summary = loader.stats().summary()
    assert summary["text_share"] == pytest.approx(0.9, abs=0.01)
    assert summary["share/vqa"] == pytest.approx(0.02, abs=0.005)


def test_changed_topology_is_refused(pretrain_corpus, tiny_processor):
    cfg = pretrain_config(pretrain_corpus, num_workers=2)
    loader = PackedLoader(cfg, tiny_processor)
    drain(loader, limit=2)
    state = loader.state_dict()
    fewer = PackedLoader(pretrain_config(pretrain_corpus, num_workers=1), tiny_processor)
    with pytest.raises(ValueError, match="num_workers 2 -> 1"):
        fewer.load_state_dict(state)
    other_world = PackedLoader(cfg, tiny_processor, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size 1 -> 2"):
        other_world.load_state_dict(state)


def test_a_source_with_nothing_usable_is_dropped_not_spun_on(tmp_path, pretrain_corpus, tiny_processor):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n" * 3)
    cfg = pretrain_config(
        pretrain_corpus,
        max_epochs=None,
        sources=[
            {"name": "text", "paths": ["text/*.tar"]},
            {"name": "broken", "kind": "jsonl", "paths": [str(broken)], "weight": 5.0},
        ],
        packing={"window": 1},
    )
    loader = PackedLoader(cfg, tiny_processor)
    drain(loader, limit=3)
    assert loader.stats().skips == {"malformed_json": 4}  # one pass, then the first line of the next


def test_resume_in_process_without_workers(pretrain_corpus, tiny_processor):
    def config():
        return pretrain_config(pretrain_corpus, max_epochs=None, packing={"seq_len": 1024, "window": 3})

    def rows(batches):
        return [(packed.keys, packed.batch.input_ids.tolist()) for packed in batches]

    straight = rows(drain(PackedLoader(config(), tiny_processor), limit=8))
    first = PackedLoader(config(), tiny_processor)
    head = rows(drain(first, limit=3))
    second = PackedLoader(config(), tiny_processor)
    second.load_state_dict(first.state_dict())
    assert head + rows(drain(second, limit=5)) == straight
    assert second.stats().packs == 8


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_phase_switch_changes_the_mix_after_the_window_and_reads_nothing_twice(
    pretrain_corpus, tiny_processor, num_workers
):
    """Phase 2 reads text alone. The switch after 3 batches keeps every reader where it was; a loader
    resumed from the state of batch 3 and put in phase 2 goes on exactly as the switched one did."""
    cfg = pretrain_config(pretrain_corpus, num_workers=num_workers, packing={"seq_len": 512, "window": 2})
    phases = [{source.name: source.weight for source in cfg.sources}, {"text": 1.0}]
    phases[1] |= {name: 0.0 for name in phases[0] if name != "text"}

    def keys(batches):
        return [key for packed in batches for row in packed.keys for key in row]

    def sources(keys):  # a key is <shard path>:<task>-<index>
        return {key.rsplit(":", 1)[-1].split("-")[0] for key in keys}

    switched = PackedLoader(cfg, tiny_processor, phase_weights=phases)
    head = drain(switched, limit=3)
    state = switched.state_dict()
    switched.enter_phase(1)
    tail = drain(switched)
    resumed = PackedLoader(cfg, tiny_processor, phase_weights=phases)
    resumed.load_state_dict(state)
    resumed.enter_phase(1)
    assert keys(drain(resumed)) == keys(tail)
    read = keys(head) + keys(tail)
    assert len(read) == len(set(read))  # one pass (max_epochs=1): nothing twice across the switch
    assert sources(keys(head)) != {"text"}
    assert sources(keys(tail[-5:])) == {"text"}  # the window drained, text alone
    text = [key for key in read if sources([key]) == {"text"}]
    assert len(text) == 20  # the text source read to its end, none of it again


def test_pixels_leave_a_worker_as_one_shared_buffer(pretrain_corpus, tiny_processor):
    def first_batches(num_workers):
        cfg = pretrain_config(pretrain_corpus, num_workers=num_workers, packing={"seq_len": 1024, "window": 4})
        loader = PackedLoader(cfg, tiny_processor)
        assert loader.loader.pin_memory == torch.cuda.is_available()
        return drain(loader, limit=3)

    in_worker, in_process = first_batches(1), first_batches(0)
    assert [p.keys for p in in_worker] == [p.keys for p in in_process]
    images = [p.batch.pixels for p in in_worker if p.batch.pixels is not None]
    assert any(len(pixels.sources) > 1 for pixels in images)
    for pixels, alone in zip(images, [p.batch.pixels for p in in_process if p.batch.pixels is not None], strict=True):
        # All of a batch's views in one shared-memory segment, the size of the buffer.
        assert pixels.data.is_shared() and pixels.data.untyped_storage().nbytes() == pixels.data.nbytes
        assert torch.equal(pixels.data, alone.data) and pixels.sources == alone.sources


PASSES = 6
BAD_KEYS = ("bad.tar:garbage-image", "bad.tar:cut-image")  # found at fill time and when rendered


def small_source_config(folder):
    """Two shards read by two workers, a whole shard each: every pass reshuffles which worker meets the
    shard with the two corrupt images."""
    bad, good = str(folder / "bad.tar"), str(folder / "good.tar")
    with TarWriter(bad) as writer:
        writer.write({"__key__": "good-0", "json": json.dumps(caption("A red square.")).encode(), "0.png": png()})
        writer.write({"__key__": "garbage-image", "json": json.dumps(caption("Noise.")).encode(), "0.jpg": b"junk"})
        writer.write({"__key__": "cut-image", "json": json.dumps(caption("Cut.")).encode(), "0.jpg": jpeg()[:2000]})
    with TarWriter(good) as writer:
        writer.write({"__key__": "good-1", "json": json.dumps({"text": "A document about lakes."}).encode()})
        writer.write({"__key__": "good-2", "json": json.dumps(caption("Blue.")).encode(), "0.png": png()})
    cfg = DataConfig.from_dict(
        {
            "sources": [{"name": "small", "paths": [bad, good]}],
            "num_workers": 2,
            "max_epochs": PASSES,
            "packing": {"seq_len": 128, "window": 1},
        }
    )
    reader = SourceReader(cfg.sources[0], [bad, good], 0, 2, cfg.seed, PASSES)
    assert {reader.shard_order(epoch)[0] == [bad] for epoch in range(PASSES)} == {True, False}, "one worker only"
    return cfg


def skip_lines(caplog, key):
    return [r for r in caplog.records if r.name == "step3vl_train.data" and f"{key} (corrupt_image" in r.getMessage()]


def assert_bad_keys_once(stats, caplog):
    assert stats.skips == {"corrupt_image": 2 * PASSES}
    assert stats.skipped_unique == {"corrupt_image": 2}
    assert (stats.summary()["skipped_samples"], stats.summary()["skipped_unique_samples"]) == (2 * PASSES, 2)
    for key in BAD_KEYS:
        assert len(skip_lines(caplog, key)) == 1, key


def test_a_bad_sample_met_every_pass_is_logged_once_over_workers(tmp_path, tiny_processor, caplog):
    loader = PackedLoader(small_source_config(tmp_path), tiny_processor)
    with caplog.at_level(logging.WARNING):
        drain(loader)
    assert_bad_keys_once(loader.stats(), caplog)
    assert sorted(loader.skipped_keys()) == sorted(f"{tmp_path}/{key}" for key in BAD_KEYS)


def test_skip_log_and_unique_counts_survive_a_resume(tmp_path, tiny_processor, caplog):
    cfg = small_source_config(tmp_path)
    first = PackedLoader(cfg, tiny_processor)
    with caplog.at_level(logging.WARNING):
        drain(first, limit=3)
        state = first.state_dict()
        assert len(state["skipped_keys"]) == 2 and first.stats().skips["corrupt_image"] < 2 * PASSES  # midway
        second = PackedLoader(cfg, tiny_processor)
        second.load_state_dict(state)
        drain(second)
    assert_bad_keys_once(second.stats(), caplog)
