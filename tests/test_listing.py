"""widenet.listing.listed: the one way messages list names."""

from pathlib import Path

from widenet.listing import listed


def test_short_lists_are_written_out_in_full():
    assert listed([]) == ""
    assert listed(["a"]) == "a"
    assert listed(["a", "b", "c", "d", "e"]) == "a, b, c, d, e"


def test_long_lists_show_the_first_items_and_count_the_rest():
    assert listed([f"k{i}" for i in range(8)]) == "k0, k1, k2, k3, k4, ... and 3 more"
    assert listed(range(4), shown=2) == "0, 1, ... and 2 more"
    assert listed((Path("x") / name for name in "abc"), shown=1) == f"{Path('x/a')}, ... and 2 more"


def test_counts_are_singular_for_one_only():
    from widenet.listing import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert [counted(n, "class", "classes") for n in (1, 3)] == ["1 class", "3 classes"]
    assert [counted(t, "minute") for t in (1.0, 0.5, 2.0)] == ["1 minute", "0.5 minutes", "2 minutes"]
    assert counted(0.9999999, "minute") == "1 minute"  # (the noun follows the number as written)


def test_messages_say_one_step_file_channel_and_minute(tmp_path):
    """Messages printed "1 steps", "1 file(s)", "1 channel(s)", "1 minutes": each with a count of 1 and 2."""
    import warnings

    import pytest
    import torch

    from widenet.analysis.compare import _budget
    from widenet.data.text.documents import corpus_files
    from widenet.layers.patch_embed import PatchEmbed
    from widenet.train.budget import BudgetPlan
    from widenet.train.config import TrainConfig

    assert [BudgetPlan(60.0, 1.0, 0.01, 0.5, n).describe(4).rsplit(" -> ", 1)[1] for n in (1, 2)] == [
        "1 step (0.25 epochs)", "2 steps (0.50 epochs)"]  # a time budget's plan in the training log
    assert [_budget(TrainConfig(model="vit_tiny", time_budget=t), 100).split(" of ")[0] for t in (1, 2)] == [
        "1 minute", "2 minutes"]  # compare's report
    for channels, images, says in ((1, 3, "model expects 1 channel, got images with 3"),
                                   (3, 1, "model expects 3 channels, got images with 1")):
        with pytest.raises(ValueError, match=f"^{says}$"):
            PatchEmbed(8, 4, channels, 8)(torch.zeros(1, images, 8, 8))
    (tmp_path / "a.txt").write_text("text\n")
    for count, says in ((1, "skipped 1 non-corpus file (corpus files: "), (2, "skipped 2 non-corpus files (")):
        (tmp_path / f"notes{count}.md").write_text("not a corpus file")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            corpus_files([tmp_path])
        assert [f"{tmp_path}: {says}" in str(w.message) for w in caught] == [True], [str(w.message) for w in caught]
