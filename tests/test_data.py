"""Training batches: length-grouped or random, deterministic either way."""


from tests.conftest import cli_train


def test_random_batches_pad_more_than_length_grouped_ones_and_both_are_deterministic(tokenizer):
    from peftlab.data import tokenize, training_batches
    from peftlab.tasks import build_task, prepare_splits

    splits = prepare_splits(build_task("samsum", {}), 256, 8, 8, seed=0)
    features = tokenize(tokenizer, splits.train, 512, 128)

    def padding(group: bool, seed: int = 0) -> tuple[float, list]:
        batches = training_batches(features, 8, seed, tokenizer.pad_token_id,
                                   group_by_length=group)
        real = padded = 0
        firsts = []
        for _ in range(32):  # one epoch
            b = next(batches)
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
            firsts.append(b["input_ids"].sum(1).tolist())  # a fingerprint per example
        return 1 - real / padded, firsts

    grouped, order_g = padding(True)
    random, order_r = padding(False)
    assert grouped < 0.5 * random
    assert padding(False)[1] == order_r and padding(True)[1] == order_g
    assert padding(False, seed=1)[1] != order_r


def test_group_by_length_is_a_run_option(tmp_path):
    s, run_dir = cli_train(tmp_path, group_by_length=False)
    assert s["status"] == "completed"
    assert "group_by_length: false" in (run_dir / "config.yaml").read_text()
