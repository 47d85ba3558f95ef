import pytest

from step3vl_train.data.mixture import TokenMixture


def test_shares_follow_token_weights_not_sample_counts():
    mixture = TokenMixture(["text", "image"], [9, 1])
    lengths = {"text": 100, "image": 700}  # multimodal samples are 7x longer
    picks = []
    for _ in range(2000):
        name = mixture.pick(["text", "image"])
        picks.append(name)
        mixture.add(name, lengths[name])
    total = sum(mixture.tokens.values())
    assert mixture.tokens["text"] / total == pytest.approx(0.9, abs=0.005)
    assert picks.count("image") / len(picks) < 0.02  # about 1 sample in 64


def test_deterministic_and_restorable():
    def run(mixture, steps):
        out = []
        for i in range(steps):
            name = mixture.pick(["a", "b", "c"])
            mixture.add(name, 10 + (i * 7) % 13)
            out.append(name)
        return out

    straight = run(TokenMixture(["a", "b", "c"], [1, 2, 3]), 60)
    first = TokenMixture(["a", "b", "c"], [1, 2, 3])
    head = run(first, 25)
    second = TokenMixture(["a", "b", "c"], [1, 2, 3])
    second.load_state_dict(first.state_dict())
    tail = []
    for i in range(25, 60):
        name = second.pick(["a", "b", "c"])
        second.add(name, 10 + (i * 7) % 13)
        tail.append(name)
    assert head + tail == straight


def test_exhausted_sources_are_left_out():
    mixture = TokenMixture(["a", "b"], [1, 1])
    mixture.add("b", 100)
    assert mixture.pick(["a", "b"]) == "a"
    assert mixture.pick(["b"]) == "b"
    with pytest.raises(ValueError, match="no active source"):
        mixture.pick([])
    with pytest.raises(ValueError, match="sources"):
        mixture.load_state_dict({"a": 1})
