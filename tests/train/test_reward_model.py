"""The scalar reward model: last-token scores that depend on nothing but the sequence, the Bradley-Terry loss
and its global normalisation, the pair reader's skips and exact resume, the configs, and an export's round
trip through load_reward_model."""

import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image
from webdataset import TarWriter

from step3vl_train.data.config import SourceConfig
from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import read_released_tensors
from step3vl_train.model.value import Step3VLForValue, last_token_scores
from step3vl_train.processing.processor import ProcessedSample, collate
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.engine import load_released_into
from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.reward_data import PairDataConfig, PairLoader
from step3vl_train.train.reward_model import (
    Pair,
    RewardStats,
    bradley_terry_loss,
    load_reward_model,
    pair_batch,
    reward_conversation,
    score_samples,
)
from step3vl_train.train.reward_trainer import RewardJobConfig, RMLossConfig, pair_forward
from step3vl_train.train.trainer import backward_step
from step3vl_train.usage import UsageError, build
from tests.conftest import REPO


@pytest.fixture
def value_model(tiny_config):
    """A tiny reward model whose weights are large enough that scores depend on the whole context."""
    torch.manual_seed(0)
    model = Step3VLForValue(tiny_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


def picture(color=(200, 30, 30), size=(150, 120)):
    return Image.new("RGB", size, color)


def scored_rows(processor):
    """(prompt, reply) rows of different lengths, with and without an image, as the scorer renders them."""
    ask = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the shape."}]}
    text = {"role": "user", "content": "What colour is the sky on a clear day, usually?"}
    replies = [
        ([ask], [picture()], "<think>It looks red.</think>It is red."),
        ([text], [], "Blue."),
        ([ask], [picture((20, 20, 200), (300, 200))], "The shape is blue and it sits near the top left corner."),
        ([text], [], "<think>Sky.</think>It is usually blue, sometimes grey."),
    ]
    return [processor(reward_conversation(m, reply), images) for m, images, reply in replies]


def alone(model, rows, pad):
    return torch.tensor([score_samples(model, [row], pad)[0] for row in rows])


def test_last_token_scores_reads_the_last_attended_position_on_either_side():
    values = torch.arange(12.0).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert last_token_scores(values, right).tolist() == [2.0, 11.0]
    assert last_token_scores(values, left).tolist() == [5.0, 11.0]
    with pytest.raises(ValueError, match="no attended position"):
        last_token_scores(values, torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))


def test_a_score_does_not_depend_on_batch_composition(value_model, tiny_processor):
    rows = scored_rows(tiny_processor)
    single = alone(value_model, rows, 0)
    assert len(set(single.tolist())) == len(rows)  # distinct rows, distinct scores: the test can fail
    batched = torch.tensor(score_samples(value_model, rows, 0))  # longer and shorter rows, padded on the right
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    reordered = torch.tensor(score_samples(value_model, rows[::-1] + rows[:1], 0))
    torch.testing.assert_close(reordered, torch.cat([single.flip(0), single[:1]]), rtol=1e-5, atol=1e-5)


def test_a_score_does_not_depend_on_the_padding_side(value_model, tiny_processor):
    rows = scored_rows(tiny_processor)
    batch = collate(rows, 0, padding_side="left")
    inputs = batch.model_inputs(with_labels=False)
    # Left padding moves every row's tokens right: their positions are counted from the first real token.
    positions = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        values = value_model(**inputs, position_ids=positions)
    assert not batch.attention_mask[:, 0].all()  # some rows are padded on the left
    torch.testing.assert_close(
        last_token_scores(values, batch.attention_mask), alone(value_model, rows, 0), rtol=1e-5, atol=1e-5
    )


def test_a_score_does_not_depend_on_the_pad_token_being_eos(value_model, tiny_processor):
    """Rows that end with the end-of-turn token (eos) padded with that token: a scorer searching for the pad
    id would stop at the first end of turn, inside the prompt."""
    eos = tiny_processor.tokenizer.eos_token_id
    rows = []
    for row in scored_rows(tiny_processor):
        end = int((row.input_ids == eos).nonzero()[-1]) + 1  # through the reply's end of turn
        rows.append(ProcessedSample(row.input_ids[:end], row.labels[:end], row.pixels, row.num_patches,
                                    row.patch_newline_mask))  # fmt: skip
        assert int((rows[-1].input_ids == eos).sum()) >= 2 and rows[-1].input_ids[-1] == eos
    single = alone(value_model, rows, 0)
    torch.testing.assert_close(torch.tensor(score_samples(value_model, rows, eos)), single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(score_samples(value_model, rows, 7)), single, rtol=1e-5, atol=1e-5)


def test_only_the_final_answer_is_scored():
    messages = [{"role": "user", "content": "Colour?"}]
    assert reward_conversation(messages, "<think>a</think>b</think>  Red. ")[-1] == {
        "role": "assistant",
        "content": "Red.",
    }
    assert reward_conversation(messages, "Red.")[1:] == [{"role": "assistant", "content": "Red."}]
    assert reward_conversation(messages, "x") is not messages and len(messages) == 1


def test_bradley_terry_loss_margin_and_centring():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    plain = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(plain, torch.tensor([math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))]))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=0.5), -F.logsigmoid(chosen - rejected - 0.5))
    centred = bradley_terry_loss(chosen, rejected, centring_weight=0.1)
    torch.testing.assert_close(centred - plain, 0.1 * torch.tensor([4.0, 0.0]))


class ScoreEngine:
    """A DeepSpeed engine stand-in around a module that scores rows: the losses it is handed are recorded,
    and backward accumulates gradients as DeepSpeed's does over micro-steps, in its one weight's gradient,
    which stands for ZeRO-3's flat buffer of gradient partitions (engine.scale_gradients scales it)."""

    device = torch.device("cpu")

    def __init__(self, module):
        self.module = module
        self.losses = []

    @property
    def optimizer(self):
        return SimpleNamespace(offload_optimizer=False, grad_partitions_flat_buffer=self.module.weight.grad)

    def __call__(self, input_ids, **_):
        return self.module(input_ids)

    def backward(self, loss, scale_wrt_gas=True):
        self.losses.append(float(loss.detach()))
        loss.backward()

    def step(self):
        pass


class TokenScorer(torch.nn.Module):
    """Scores each position by a weight per token id: a stand-in for the reward model."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1, 1, 16))

    def forward(self, input_ids):
        return self.weight[input_ids].cumsum(1)


def toy_pairs(count):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(2 * count):
        ids = torch.randint(1, 16, (3 + index % 4,), generator=generator)
        rows.append(ProcessedSample(ids, ids.clone(), None, [], torch.zeros(0, dtype=torch.bool)))
    return [Pair(f"pair-{i}", rows[2 * i], rows[2 * i + 1]) for i in range(count)]


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    close_distributed()


def backward_pairs(engine, micro, loss, reference=4.0):
    """The reward trainer's step over these micro-batches as they arrive (its pairs' normaliser)."""
    return backward_step(engine, micro, len(micro), reference, pair_forward(engine, loss, stand_in_pair()))


def stand_in_pair():
    row = ProcessedSample(torch.tensor([0]), torch.tensor([-100]), None, [], torch.zeros(0, dtype=torch.bool))
    return pair_batch([Pair("stand-in", row, row)], 0)


def test_the_loss_is_the_mean_over_the_global_batch_however_it_is_split(one_rank):
    """And whatever the fixed count each micro-batch is divided by before the whole batch is known."""
    pairs, loss = toy_pairs(6), RMLossConfig(margin=0.2, centring_weight=0.05)
    gradients, totals = [], []
    for split, reference in (([6], 1.0), ([3, 3], 6.0), ([1, 2, 3], 100.0)):
        scorer = TokenScorer()
        starts = [sum(split[:i]) for i in range(len(split))]
        micro = [pair_batch(pairs[start : start + size], 0) for start, size in zip(starts, split, strict=True)]
        totals.append(backward_pairs(ScoreEngine(scorer), micro, loss, reference))
        gradients.append(scorer.weight.grad)
    scorer = TokenScorer()
    scores = torch.stack([scorer(p.chosen.input_ids[None])[0, -1] for p in pairs])
    rejected = torch.stack([scorer(p.rejected.input_ids[None])[0, -1] for p in pairs])
    bradley_terry_loss(scores, rejected, 0.2, 0.05).mean().backward()
    for gradient, total in zip(gradients, totals, strict=True):
        torch.testing.assert_close(gradient, scorer.weight.grad)
        torch.testing.assert_close(total, totals[0])
    assert totals[0][0] == 6 and totals[0][-2] == sum(
        len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs
    )
    assert totals[0][-1] == 0  # no micro-batch missing


def test_a_rank_whose_pairs_ran_out_joins_with_a_stand_in_that_counts_nothing(one_rank):
    pairs, loss = toy_pairs(3), RMLossConfig(centring_weight=0.0)
    scorer = TokenScorer()
    engine = ScoreEngine(scorer)
    totals = backward_step(engine, [pair_batch(pairs, 0), None], 2, 3.0, pair_forward(engine, loss, stand_in_pair()))
    assert totals[0] == 3 and totals[-1] == 1 and len(engine.losses) == 2 and engine.losses[1] == 0.0


def test_each_rank_divides_by_the_pairs_of_all_ranks(one_rank, monkeypatch):
    """With another rank holding 5 pairs, this rank's 3 pairs are divided by 8, times the 2 ranks
    DeepSpeed averages gradients over."""
    pairs = toy_pairs(3)
    monkeypatch.setattr(dist, "get_world_size", lambda *_: 2)
    original = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        tensor[0] += 5  # the pairs, first of the step's sums
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    trained = TokenScorer()
    backward_pairs(ScoreEngine(trained), [pair_batch(pairs, 0)], RMLossConfig(centring_weight=0.0))
    scorer = TokenScorer()
    chosen = torch.stack([scorer(p.chosen.input_ids[None])[0, -1] for p in pairs])
    rejected = torch.stack([scorer(p.rejected.input_ids[None])[0, -1] for p in pairs])
    (bradley_terry_loss(chosen, rejected).sum() / 8 * 2).backward()
    torch.testing.assert_close(trained.weight.grad, scorer.weight.grad)


# ---- the pair reader -----------------------------------------------------------------------------------


def png(color=(200, 30, 30)):
    buffer = io.BytesIO()
    picture(color).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_record(index, **changes):
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe shape {index}."}]}
    return {"messages": [turn], "chosen": f"It is red ({index}).", "rejected": f"It is at {index}, {index}."} | changes


def write_pair_shards(folder, good=24, shards=3):
    """`good` pairs over `shards` shards, and in the first shard one pair of each kind that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "no-rejected": (pair_record(0, rejected=None), [png()]),
        "ends-with-assistant": (pair_record(0) | {"messages": [{"role": "assistant", "content": "Hi."}]}, []),
        "corrupt-image": (pair_record(0), [b"not an image"]),
        "too-long": (pair_record(0, chosen="word " * 400), [png()]),
    }
    for shard in range(shards):
        with TarWriter(str(folder / f"pairs-{shard:06d}.tar")) as tar:
            if shard == 0:
                for key, (record, images) in bad.items():
                    record = {k: v for k, v in record.items() if v is not None}
                    members = {f"{i}.png": data for i, data in enumerate(images)}
                    tar.write({"__key__": key, "json": json.dumps(record).encode(), **members})
            for index in range(shard, good, shards):
                tar.write(
                    {"__key__": f"good-{index:03d}", "json": json.dumps(pair_record(index)).encode(), "0.png": png()}
                )
    return {"bad_schema": 2, "corrupt_image": 1, "too_long": 1}


def pair_config(root, **changes):
    fields = {
        "sources": [SourceConfig(name="pairs", paths=["train/*.tar"])],
        "eval": [SourceConfig(name="pairs", paths=["held_out/*.tar"])],
        "root": str(root),
        "micro_batch_size": 3,
        "max_tokens": 400,
    }
    return PairDataConfig(**(fields | changes))


def keys(loader, batches):
    reading = iter(loader)
    return [next(reading).keys for _ in range(batches)]


def short(keys_of_batches):
    return [key.rsplit(":", 1)[1] for batch in keys_of_batches for key in batch]


def test_the_reader_resumes_exactly(tmp_path, tiny_processor):
    write_pair_shards(tmp_path / "train")
    cfg = pair_config(tmp_path)
    reader = PairLoader(cfg, tiny_processor)
    first = keys(reader, 3)
    state = json.loads(json.dumps(reader.state_dict()))  # plain data, as a checkpoint holds it
    following = keys(reader, 9)  # past the end of the first pass: the second one goes on
    resumed = PairLoader(cfg, tiny_processor)
    resumed.load_state_dict(state)
    assert keys(resumed, 9) == following
    assert sorted(short(first + following)[:24]) == [f"good-{i:03d}" for i in range(24)]  # each once a pass
    assert resumed.samples.taken == reader.samples.taken == 36 and resumed.skipped_keys() == reader.skipped_keys()
    batch = next(iter(PairLoader(cfg, tiny_processor)))
    assert batch.pairs == 3 and batch.batch.input_ids.shape[0] == 6 and batch.batch.pixels is not None


def test_ranks_read_disjoint_pairs_skip_bad_ones_and_read_the_held_out_set_once(tmp_path, tiny_processor):
    expected_skips = write_pair_shards(tmp_path / "train")
    write_pair_shards(tmp_path / "held_out", good=7, shards=1)
    cfg = pair_config(tmp_path, max_epochs=1)
    readers = [PairLoader(cfg, tiny_processor, rank, 2) for rank in (0, 1)]
    by_rank = [short(batch.keys for batch in reader) for reader in readers]
    assert not set(by_rank[0]) & set(by_rank[1]) and len(by_rank[0]) + len(by_rank[1]) == 24
    skips = readers[0].stats().skips + readers[1].stats().skips
    assert skips == expected_skips and sum(len(reader.skipped_keys()) for reader in readers) == 4
    held_out = PairLoader(cfg, tiny_processor, held_out=True)
    once = short(batch.keys for batch in held_out)
    held_out.rewind()
    assert len(once) == 7 and short(batch.keys for batch in held_out) == once
    assert held_out.stats().skipped_unique == expected_skips


# ---- configs and exports --------------------------------------------------------------------------------


def composed(*overrides):
    register_recipes()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train_rm", ["+recipe=rm", "tokenizer=tiny", *overrides])


def test_the_recipe_and_its_cpu_form_compose():
    job = build(RewardJobConfig, composed())
    data = build(PairDataConfig, job.data, "data.")
    assert job.optim.lr == 2e-6 and job.trainer.requires_init_from and data.max_tokens == 32768
    assert job.rm == RMLossConfig(margin=0.0, centring_weight=0.01) and data.eval[0].paths == ["heldout/pairs/*.tar"]
    cpu = build(RewardJobConfig, composed("+cpu=rm"))
    assert cpu.model["text_config"]["hidden_size"] == 64 and not cpu.trainer.requires_init_from
    with pytest.raises(UsageError, match="unknown config key rm.marginn: did you mean rm.margin"):
        build(RewardJobConfig, composed("+rm.marginn=1"))
    with pytest.raises(UsageError, match="predict_every"):
        build(RewardJobConfig, composed("trainer.predict_every=5"))


def test_an_rm_export_loads_with_its_head_and_stats(tmp_path, value_model, tiny_config, tiny_processor, one_rank):
    value_model.save_pretrained(tmp_path / "rm")
    RewardStats(0.5, 2.0, "eval", 40, 200).save(tmp_path / "rm")
    loaded, stats = load_reward_model(tmp_path / "rm")
    rows = scored_rows(tiny_processor)
    assert stats == RewardStats(0.5, 2.0, "eval", 40, 200) and stats.preference(0.5) == 0.5
    assert json.loads((tmp_path / "rm" / "reward_stats.json").read_text())["from"] == "eval"
    assert not loaded.training and score_samples(loaded, rows, 0) == score_samples(value_model, rows, 0)
    # Training started from it loads its head; from a policy export (no value head) the head keeps its init.
    fresh = Step3VLForValue(tiny_config)
    load_released_into(fresh, str(tmp_path / "rm"))
    torch.testing.assert_close(fresh.value_head.weight, value_model.value_head.weight)
    policy = tmp_path / "policy"
    Step3VLForConditionalGeneration(tiny_config).save_pretrained(policy)
    critic = Step3VLForValue(tiny_config)
    head = critic.value_head.weight.detach().clone()
    load_released_into(critic, str(policy))
    assert torch.equal(critic.value_head.weight, head)
    assert torch.equal(critic.model.embed_tokens.weight, read_released_tensors(policy)["model.embed_tokens.weight"])
    with pytest.raises(FileNotFoundError, match="not a reward model's export"):
        load_reward_model(policy)
