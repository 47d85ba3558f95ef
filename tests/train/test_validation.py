"""The validation set (train/validation.py): which samples each rank holds, the loss accounting per source,
the stand-in forwards that keep ranks in step, and the config that asks for it."""

from glob import glob
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from step3vl_train.data.config import DataConfig
from step3vl_train.data.encoding import SampleEncoder
from step3vl_train.data.sources import read_tar_shard
from step3vl_train.processing.processor import ProcessedSample, collate
from step3vl_train.train import distributed, validation
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.validation import SourceBatch, Validation, ValidationSet, evaluate, figures
from step3vl_train.usage import UsageError, build


def eval_config(root, cap=5, **values) -> DataConfig:
    sources = [{"name": "text", "paths": ["text/*.tar"]}, {"name": "caption", "paths": ["caption/*.tar"]}]
    return build(
        DataConfig,
        {
            "root": str(root),
            "sources": sources,
            "eval": sources,
            "eval_max_samples": cap,
            "packing": {"seq_len": 512, "window": 1},
            "micro_batch_size": 2,
            **values,
        },
    )


def keys_by_source(validation_set) -> list[set[str]]:
    held = [set() for _ in validation_set.sources]
    for batch in validation_set:
        assert 1 <= len(batch.keys) <= 2 and batch.batch.input_ids.shape[0] == len(batch.keys)
        for row in batch.keys:
            assert all(f":{validation_set.sources[batch.source].name}-" in key for key in row)  # one source a batch
            held[batch.source] |= set(row)
    return held


def test_the_set_is_the_first_samples_of_each_source_split_over_ranks_whatever_their_number(
    pretrain_corpus, tiny_processor
):
    whole = keys_by_source(ValidationSet(eval_config(pretrain_corpus), tiny_processor, 0, 1))
    assert [len(keys) for keys in whole] == [5, 5]
    for world in (2, 3):
        shares = [
            keys_by_source(ValidationSet(eval_config(pretrain_corpus), tiny_processor, r, world)) for r in range(world)
        ]
        for source, keys in enumerate(whole):
            held = [share[source] for share in shares]
            assert set().union(*held) == keys and sum(map(len, held)) == len(keys)  # all of it, each sample once
            assert [len(h) for h in held] == [len(range(r, 5, world)) for r in range(world)]
    # Another data.seed reorders training, not this set; without a cap it is every sample (20 a task).
    assert keys_by_source(ValidationSet(eval_config(pretrain_corpus, seed=7), tiny_processor, 0, 1)) == whole
    every = keys_by_source(ValidationSet(eval_config(pretrain_corpus, cap=None), tiny_processor, 0, 1))
    assert [len(keys) for keys in every] == [20, 20]


class Engine:
    """What `evaluate` uses of a DeepSpeed engine, around a plain model."""

    def __init__(self, model):
        self.module, self.device = model, torch.device("cpu")

    def __call__(self, **inputs):
        return self.module(**inputs)

    @property
    def training(self) -> bool:
        return self.module.training

    def eval(self):
        self.module.eval()

    def train(self, mode: bool = True):
        self.module.train(mode)


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    close_distributed()


def test_each_source_s_loss_is_its_samples_token_losses_over_their_targets_however_packed(
    one_rank, pretrain_corpus, tiny_processor, tiny_model
):
    cfg = eval_config(pretrain_corpus, cap=4)
    run = Validation(cfg, tiny_processor, eval_every=3)
    engine = Engine(tiny_model.train())
    rng = torch.get_rng_state()
    row = run.run(engine)
    assert engine.training and torch.equal(torch.get_rng_state(), rng)
    # The reference: each sample on its own, unpacked.
    encoder, expected, tokens = SampleEncoder(tiny_processor, cfg.packing), {}, 0
    tiny_model.eval()
    for source, keys in zip(cfg.eval, keys_by_source(run.set), strict=True):
        samples = {
            s.key: s
            for shard in sorted(glob(f"{pretrain_corpus}/{source.name}/*.tar"))
            for s, *_ in read_tar_shard(shard)
        }
        losses, targets = 0.0, 0
        for key in keys:
            batch = collate([encoder.render(encoder.encode(samples[key], source.name))], 0)
            with torch.no_grad():
                losses += float(tiny_model(**batch.model_inputs(), num_items_in_batch=1).loss)
            targets += int((batch.labels[:, 1:] != -100).sum())
        expected[source.name] = losses / targets
        tokens += targets
    assert row["eval/tokens"] == tokens and row["eval/samples"] == 8 and row["eval/skipped"] == 0
    for name, loss in expected.items():
        assert row[f"eval/loss/{name}"] == pytest.approx(loss, rel=1e-5)
    assert min(expected.values()) < row["eval/loss"] < max(expected.values())
    assert run.run(engine) == row  # the same set, the same figures
    assert [run.due(step, final) for step, final in [(3, False), (4, False), (4, True), (6, False)]] == [1, 0, 1, 1]
    assert not Validation(cfg, tiny_processor, eval_every=0).due(4, final=True)


class Peer:
    """`dist` as seen by a rank whose one peer holds `batches` batches: the peer adds to every sum and
    says whether it has a batch left."""

    ReduceOp = dist.ReduceOp

    def __init__(self, batches: int, peer_sums: torch.Tensor):
        self.left, self.peer_sums = batches, peer_sums

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if op == dist.ReduceOp.MAX:
            tensor.copy_(torch.maximum(tensor, torch.tensor(int(self.left > 0))))
            self.left -= 1
        else:
            tensor += self.peer_sums


class Losses:
    """An engine whose loss is the batch's first token id, recording the batches it is given."""

    device, module = torch.device("cpu"), SimpleNamespace(dtype=torch.float32)

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, num_items_in_batch, **_):
        self.seen.append(int(input_ids[0, 0]))
        return SimpleNamespace(loss=torch.tensor(float(input_ids[0, 0])))


def test_a_rank_with_fewer_batches_runs_uncounted_stand_ins_until_its_peer_is_done(monkeypatch):
    def batch(source: int, first: int, targets: int) -> SourceBatch:
        """A row of `targets` + 1 tokens from `first` on, every one labelled: `targets` targets."""
        tokens = torch.arange(first, first + targets + 1)
        row = ProcessedSample(tokens, tokens, None, [], torch.zeros(0, dtype=torch.bool))
        return SourceBatch(source, collate([row], 0), [])

    held = [batch(1, 7, 3), batch(0, 5, 2)]
    stand_in = batch(0, 99, 0).batch
    peer = Peer(batches=4, peer_sums=torch.tensor([[10.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    monkeypatch.setattr(validation, "dist", peer)
    monkeypatch.setattr(distributed, "dist", peer)  # the agreement on whether any rank has more
    engine = Losses()
    sums = evaluate(engine, held, stand_in, num_sources=2)
    assert engine.seen == [7, 5, 99, 99]  # as many forwards as the peer, the last two stand-ins
    assert sums.tolist() == [[5.0 + 10.0, 2.0 + 4.0], [7.0, 3.0]]  # stand-ins add nothing
    row = figures(["text", "caption"], [[15.0, 6.0, 3, 0], [7.0, 3.0, 1, 1]])
    assert row == {
        "eval/loss": 22.0 / 9.0,
        "eval/loss/text": 2.5,
        "eval/loss/caption": 7.0 / 3.0,
        "eval/tokens": 9,
        "eval/samples": 4,
        "eval/skipped": 1,
    }
    assert figures(["empty"], [[0.0, 0.0, 0, 2]])["eval/loss/empty"] is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eval": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}]}, "data.eval has repeated names"),
        ({"eval": [{"name": "a", "paths": []}]}, "data.eval.a.paths is empty"),
        ({"eval_max_samples": 0}, "data.eval_max_samples must be at least 1"),
    ],
)
def test_config_mistakes_name_the_key(values, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        eval_config(tmp_path, **values)


def test_an_eval_source_matching_no_file_names_its_key(tmp_path, tiny_processor):
    cfg = eval_config(tmp_path, eval=[{"name": "held", "paths": ["heldout/text/*.tar"]}])
    with pytest.raises(UsageError, match=r"data.eval.held: \['heldout/text/\*.tar'\] .* matches no file"):
        ValidationSet(cfg, tiny_processor, 0, 1)
