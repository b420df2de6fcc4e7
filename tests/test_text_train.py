"""Text pretraining and fine-tuning end to end, on small files the tests write.

The corpus is made learnable on purpose: every document repeats fixed
phrases, so a tiny model's masked-LM loss must fall within a few dozen steps.
The classification task's label is spelled by one word of the sentence; the
QA task's answer always follows the same cue word.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string

import pytest
import torch

from widenet.cli import main
from widenet.inference import answer_questions, load_pretrained
from widenet.train.checkpoint import find_latest_checkpoint, load_checkpoint
from widenet.train.finetune import finetune
from widenet.train.metrics import read_metrics, without_timing
from widenet.data.text.squad import SquadExample, encode_squad, postprocess_squad
from widenet.data.text.tokenizer import SpecialIds, TokenizerError, special_ids
from widenet.train.pretrain import pretrain, unigram_log_probs
from widenet.train.text_config import FinetuneConfig, PretrainConfig

TINY_TEXT = dict(embedding_size=16, dim=32, depth=2, num_heads=2, mlp_dim=64, max_positions=64)
PHRASES = ["the red fox jumps over the lazy dog.", "a small bird sings in the old tree.",
           "the river runs down to the sea.", "my brother reads a long book at night.",
           "green apples fall from the tall tree.", "the baker sells warm bread every morning."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = []
    for _ in range(120):
        sentences = [rng.choice(PHRASES).capitalize() for _ in range(rng.randint(3, 6))]
        docs.append(" ".join(sentences))
    path = folder / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _pretrain_cfg(corpus, out, **kw) -> PretrainConfig:
    base = dict(model="widenet_text_tiny", corpus=[str(corpus)], vocab_size=120, seq_len=32, batch_size=16,
                max_steps=200, lr=3e-3, eval_examples=32, log_every=20, model_overrides=dict(TINY_TEXT),
                cache_dir=str(out.parent / "cache"), out=str(out))
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    result = pretrain(_pretrain_cfg(corpus, out), log=lambda _: None)
    return out, result


def test_pretraining_learns_and_records_everything(pretrained):
    out, result = pretrained
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    held = [r for r in records if r["split"] == "validation"]
    assert len(train) == 10 and held and held[-1]["step"] == 200
    for key in ("mlm_loss", "mlm_accuracy", "sop_loss", "sop_accuracy", "aux_loss", "tokens_per_s"):
        assert key in train[0]
    # ln(120) = 4.79 at the start; tiny models first learn word frequencies (~3.8 here),
    # then context, which takes a few hundred steps more than this test spends.
    assert train[-1]["mlm_loss"] < 0.85 * train[0]["mlm_loss"]
    assert train[-1]["sop_accuracy"] > 0.75 and train[0]["sop_accuracy"] < 0.7
    final = result.run.final_eval
    assert final["mlm_accuracy"] > 5 / 120
    assert 0 < final["unigram_accuracy"] < 0.5 and final["unigram_loss"] > 1.0  # the no-context reference
    assert len(final["routing"]) == TINY_TEXT["depth"]  # every WideNet block routes through the shared MoE
    assert abs(sum(final["routing"][0]["expert_fraction"]) - 1) < 1e-5
    assert (out / "tokenizer.json").exists()
    meta = load_checkpoint(out).meta
    assert meta["tokenizer"]["vocab_size"] == result.model.cfg.vocab_size
    assert meta["model_config"]["task"] == "pretrain"


def test_unigram_level_by_hand():
    special = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    ids = torch.tensor([[2, 5, 5, 6, 3, 0], [2, 5, 7, 3, 0, 0]])
    log_probs = unigram_log_probs(ids, special, vocab_size=9)
    # regular pieces 5..8 counted 3, 1, 1, 0, plus one each: 4/9, 2/9, 2/9, 1/9; the specials never
    assert torch.allclose(log_probs[5:].exp(), torch.tensor([4, 2, 2, 1]) / 9.0)
    assert torch.isinf(log_probs[:5]).all() and int(log_probs.argmax()) == 5


def _stop_after(step: int):
    """A log callback that interrupts the run once it logs `step`."""

    def log(line: str) -> None:
        if line.startswith(f"step {step}/"):
            raise KeyboardInterrupt

    return log


def test_pretraining_killed_and_resumed_matches_uninterrupted(corpus, pretrained, tmp_path):
    # HF's WordPiece trainer breaks frequency ties differently from run to run, so both runs
    # use one saved tokenizer (a resumed run reuses OUT/tokenizer.json by itself).
    kw = dict(max_steps=12, log_every=1, save_every=3, dropout=0.1,
              tokenizer=str(pretrained[0] / "tokenizer.json"))
    ref = pretrain(_pretrain_cfg(corpus, tmp_path / "ref", **kw), log=lambda _: None)
    cfg = _pretrain_cfg(corpus, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, log=_stop_after(8))
    assert find_latest_checkpoint(tmp_path / "cut").name == "step_00000006"
    resumed = pretrain(dataclasses.replace(cfg, resume=True), log=lambda _: None)
    for (name, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert without_timing(read_metrics(tmp_path / "ref" / "metrics.jsonl")) == \
        without_timing(read_metrics(tmp_path / "cut" / "metrics.jsonl"))


def test_pretraining_records_a_relative_corpus_and_init_as_the_paths_they_name(corpus, pretrained, tmp_path,
                                                                               monkeypatch):
    """Recorded as typed, 'docs.txt' resumed from another folder was taken for the same corpus."""
    monkeypatch.chdir(corpus.parent)
    (tmp_path / "init").symlink_to(pretrained[0])
    cfg = _pretrain_cfg(corpus.name, tmp_path / "run", max_steps=1, init=os.path.relpath(tmp_path / "init"))
    pretrain(cfg, log=lambda _: None)
    recorded = load_checkpoint(tmp_path / "run").meta["train_config"]
    assert (recorded["corpus"], recorded["init"]) == ([str(corpus)], str(tmp_path / "init"))
    monkeypatch.chdir(tmp_path)  # another docs.txt here
    (tmp_path / corpus.name).write_bytes(corpus.read_bytes())
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(corpus"):
        pretrain(dataclasses.replace(cfg, init=str(tmp_path / "init"), resume=True), log=lambda _: None)


def test_a_tokenizer_of_another_size_than_asked_says_so(corpus, tmp_path):
    """--vocab-size 8 announced 8 pieces and trained a model on the 30-odd the corpus's characters need."""
    for asked, why in ((8, "the corpus's characters alone take more"), (5000, "the corpus holds no more")):
        lines: list[str] = []
        result = pretrain(_pretrain_cfg(corpus, tmp_path / str(asked), max_steps=1, vocab_size=asked), log=lines.append)
        got = result.model.cfg.vocab_size
        assert got != asked and f"the tokenizer has {got} pieces, not {asked}: {why}" in lines, lines


def test_resume_refuses_changed_settings(corpus, tmp_path):
    cfg = _pretrain_cfg(corpus, tmp_path / "run", max_steps=4)
    pretrain(cfg, log=lambda _: None)
    with pytest.raises(ValueError, match="lr"):
        pretrain(dataclasses.replace(cfg, lr=1e-2, resume=True), log=lambda _: None)
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(cfg, log=lambda _: None)
    from widenet.data.text.tokenizer import save_tokenizer, train_tokenizer
    other = train_tokenizer(PHRASES * 3, vocab_size=70, min_frequency=1)  # covers the corpus, other vocabulary
    save_tokenizer(other, tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(vocab_size: 120 -> 70\)"):
        pretrain(dataclasses.replace(cfg, tokenizer=str(tmp_path / "other.json"), resume=True), log=lambda _: None)


def test_training_masks_per_step_and_evaluation_masks_at_the_fixed_rate(corpus, tmp_path, monkeypatch):
    """--mask-prob 0.4: each training step's masks are mask_tokens with the generator of (seed, step),
    so two steps differ; the held-out evaluation masks round(0.15 n) of each sequence's n regular
    pieces whatever --mask-prob trains with (counted by hand from the labels)."""
    from tokenizers import Tokenizer

    from widenet.data.text import pretraining
    from widenet.train import pretrain as pretrain_module
    from widenet.train.trainer import seeded_generator

    calls = []
    real_mask = pretraining.mask_tokens

    def spy(input_ids, special, vocab_size, generator, mask_prob=0.15):
        masked, labels = real_mask(input_ids, special, vocab_size, generator, mask_prob)
        calls.append(dict(ids=input_ids.clone(), special=special, vocab=vocab_size, masked=masked, labels=labels))
        return masked, labels

    monkeypatch.setattr(pretrain_module, "mask_tokens", spy)
    cfg = _pretrain_cfg(corpus, tmp_path / "run", max_steps=2, mask_prob=0.4, seed=3, log_every=1)
    pretrain(cfg, log=lambda _: None)
    train_calls, eval_calls = calls[:2], calls[2:]
    assert eval_calls, "the final evaluation masked nothing"
    for step, call in enumerate(train_calls):
        masked, labels = real_mask(call["ids"], call["special"], call["vocab"], seeded_generator(3, step), 0.4)
        assert torch.equal(call["labels"], labels) and torch.equal(call["masked"], masked), step
    # step 1 did not reuse step 0's generator: that one masks step 1's batch otherwise
    _, reused = real_mask(train_calls[1]["ids"], train_calls[1]["special"], train_calls[1]["vocab"],
                          seeded_generator(3, 0), 0.4)
    assert not torch.equal(reused, train_calls[1]["labels"])

    tokenizer = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    specials = torch.tensor([tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])
    for call in eval_calls + train_calls:
        regular = (~torch.isin(call["ids"], specials)).sum(1)
        rate = 0.15 if any(call is c for c in eval_calls) else 0.4
        wanted = [max(1, round(rate * n)) if n else 0 for n in regular.tolist()]
        assert (call["labels"] != -100).sum(1).tolist() == wanted, rate


def test_a_resumed_run_whose_tokenizer_is_gone_says_so(corpus, tmp_path):
    """With OUT/tokenizer.json deleted, --resume trained a new tokenizer, left it in the run folder and
    blamed "this run's tokenizer differs from the checkpoint's", at this resume and every later one."""
    from widenet.data.text.tokenizer import TokenizerError

    cfg = _pretrain_cfg(corpus, tmp_path / "pre", max_steps=4, save_every=2, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, log=_stop_after(3))
    (tmp_path / "pre" / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"pre/tokenizer.json is missing: the run's checkpoints were trained with "
                                             r"the tokenizer saved there.*put it back"):
        pretrain(dataclasses.replace(cfg, resume=True), log=lambda _: None)
    assert not (tmp_path / "pre" / "tokenizer.json").exists()


def test_a_resumed_run_must_find_the_text_it_started_on(corpus, pretrained, tmp_path):
    """A corpus or task file rewritten under its name was trained on after --resume without a word
    (another plan of steps, other held-out text)."""
    text = tmp_path / "docs.txt"
    text.write_bytes(corpus.read_bytes())
    tok = str(pretrained[0] / "tokenizer.json")
    cfg = _pretrain_cfg(text, tmp_path / "pre", max_steps=4, save_every=2, log_every=1, tokenizer=tok)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, log=_stop_after(3))
    text.write_text(text.read_text(encoding="utf-8").replace("fox", "cat"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"this run's data differs from the checkpoint's \(contents '\d+ training "
                                         r"sequences, token ids \w+' here, '\d+ training sequences, token ids \w+' "
                                         r"in the checkpoint\); a resumed run keeps the data it started with"):
        pretrain(dataclasses.replace(cfg, resume=True), log=lambda _: None)
    _write_classify(tmp_path / "train.tsv", 16, 0)
    _write_classify(tmp_path / "dev.tsv", 8, 1)
    ft = FinetuneConfig(task="classify", init=str(pretrained[0]), train=str(tmp_path / "train.tsv"),
                        validation=str(tmp_path / "dev.tsv"), max_steps=4, save_every=2, log_every=1, batch_size=8,
                        out=str(tmp_path / "ft"))
    with pytest.raises(KeyboardInterrupt):
        finetune(ft, log=_stop_after(3))
    _write_classify(tmp_path / "train.tsv", 16, 5)  # other sentences, the same labels
    with pytest.raises(ValueError, match="this run's data differs from the checkpoint's"):
        finetune(dataclasses.replace(ft, resume=True), log=lambda _: None)


def test_a_tokenizer_is_the_models_own_only_if_it_cuts_text_alike(corpus, pretrained, tmp_path, capsys):
    """Equal vocabularies passed as the same tokenizer, whatever their pipelines: one that keeps
    accents gives [UNK] where the model's strips them. --init with another vocabulary of the same size
    was accepted by pretraining; --set vocab_size was applied against the tokenizer."""
    import json as json_module

    from widenet.data.text.tokenizer import load_tokenizer, pipeline_fingerprint, save_tokenizer

    out = pretrained[0]
    config = json_module.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    config["normalizer"]["strip_accents"] = False
    variant = tmp_path / "variant.json"
    variant.write_text(json_module.dumps(config), encoding="utf-8")
    original = load_tokenizer(out / "tokenizer.json")
    assert pipeline_fingerprint(load_tokenizer(variant)) != pipeline_fingerprint(original)
    assert original.encode("tr\u00e9e").ids != load_tokenizer(variant).encode("tr\u00e9e").ids  # tree vs [UNK]
    _write_classify(tmp_path / "train.tsv", 16, 0)
    args = ["finetune", "--task", "classify", "--init", str(out), "--train", str(tmp_path / "train.tsv"),
            "--validation", str(tmp_path / "train.tsv"), "--max-steps", "1", "--out", str(tmp_path / "ft")]
    assert main(args + ["--tokenizer", str(variant)]) == 2
    assert "normalises or splits text differently" in capsys.readouterr().err
    vocab = config["model"]["vocab"]  # the same pieces, their ids shuffled (the special tokens kept)
    pieces = sorted((i, t) for t, i in vocab.items() if i >= 5)
    shuffled = [t for _, t in pieces][::-1]
    config["model"]["vocab"] = {**{t: i for t, i in vocab.items() if i < 5},
                                **{t: i for (i, _), t in zip(pieces, shuffled)}}
    config["normalizer"]["strip_accents"] = None
    save_tokenizer(load_tokenizer_from(config, tmp_path), tmp_path / "shuffled.json")
    with pytest.raises(ValueError, match=r"\(the vocabularies differ\)"):
        pretrain(_pretrain_cfg(corpus, tmp_path / "again", init=str(out), max_steps=1,
                               tokenizer=str(tmp_path / "shuffled.json")), log=lambda _: None)
    assert main(args + ["--set", "pad_token_id=3"]) == 2
    assert "--set pad_token_id=3: the model gives pad_token_id 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--set vocab_size=10: the tokenizer has \d+ pieces, which all need an "):
        pretrain(_pretrain_cfg(corpus, tmp_path / "sized", max_steps=1, tokenizer=str(out / "tokenizer.json"),
                               model_overrides=dict(TINY_TEXT, vocab_size=10)), log=lambda _: None)
    # a larger vocabulary (rows to spare, as padded embeddings have) trains and fine-tunes
    padded = tmp_path / "padded"
    pretrain(_pretrain_cfg(corpus, padded, max_steps=1, tokenizer=str(out / "tokenizer.json"),
                           model_overrides=dict(TINY_TEXT, vocab_size=128)), log=lambda _: None)
    assert main(args[:4] + [str(padded)] + args[5:-1] + [str(tmp_path / "ft-padded")]) == 0, capsys.readouterr().err
    pretrain(_pretrain_cfg(corpus, tmp_path / "continued", max_steps=1, init=str(padded)), log=lambda _: None)


def load_tokenizer_from(config: dict, folder):
    import json as json_module

    from widenet.data.text.tokenizer import load_tokenizer

    path = folder / "from-config.json"
    path.write_text(json_module.dumps(config), encoding="utf-8")
    return load_tokenizer(path)


def _write_classify(path, n: int, seed: int, labels=("good", "bad")) -> None:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.choice(labels)
        words = rng.sample(["the", "fox", "river", "book", "bread", "tree", "bird", "night"], 4)
        words.insert(rng.randint(0, 4), "lovely" if label == "good" else "awful")
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_finetune_classification_learns_the_label_word(pretrained, tmp_path):
    out, _ = pretrained
    _write_classify(tmp_path / "train.tsv", 256, 0)
    _write_classify(tmp_path / "dev.tsv", 64, 1)
    cfg = FinetuneConfig(task="classify", init=str(out), train="train.tsv", validation="./dev.tsv", epochs=4,
                         batch_size=16, lr=3e-3, log_every=8, out=str(tmp_path / "ft"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = finetune(cfg, log=lambda _: None)
    assert result.run.final_eval["accuracy"] >= 0.9
    meta = load_checkpoint(tmp_path / "ft").meta
    assert (meta["train_config"]["train"], meta["train_config"]["validation"]) == (
        str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv"))  # found from any folder at --resume
    assert meta["data"]["labels"] == ["bad", "good"]
    assert meta["model_config"]["task"] == "classify" and meta["model_config"]["num_labels"] == 2
    # It names the pretrained run it started from (test_finetune_scratch_keeps_architecture_and_tokenizer_but_not_weights
    # checks that the weights are loaded).
    assert meta["init"].startswith(str(out))


def test_finetune_with_a_batch_beyond_its_examples_trains_on_all_of_them(pretrained, tmp_path):
    """--batch-size 10000000 on 32 examples was refused for the memory of ten million sequences."""
    _write_classify(tmp_path / "train.tsv", 32, 0)
    _write_classify(tmp_path / "dev.tsv", 8, 1)
    cfg = FinetuneConfig(task="classify", init=str(pretrained[0]), train=str(tmp_path / "train.tsv"),
                         validation=str(tmp_path / "dev.tsv"), max_steps=1, batch_size=10_000_000, out=str(tmp_path / "ft"))
    assert finetune(cfg, log=lambda _: None).run.steps == 1


def test_finetune_refuses_task_text_the_tokenizer_does_not_cover(pretrained, tmp_path):
    """The pretrained tokenizer cannot change: a task in another script was fine-tuned on [UNK]s."""
    out, _ = pretrained
    rows = ["sentence\tlabel"] + [f"{w} μύλος ποταμός\t{label}" for w, label in
                                  [("καλός", "good"), ("κακός", "bad")] * 8]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    _write_classify(tmp_path / "dev.tsv", 16, 1)
    cfg = FinetuneConfig(task="classify", init=str(out), train=str(tmp_path / "train.tsv"),
                         validation=str(tmp_path / "dev.tsv"), epochs=1, batch_size=8, out=str(tmp_path / "ft"))
    with pytest.raises(TokenizerError, match=r"^100% of .*train.tsv's word pieces are \[UNK\]: the tokenizer does "
                                             r"not cover this text .*; fine-tune a model pretrained on text like it"):
        finetune(cfg, log=lambda _: None)
    assert not (tmp_path / "ft" / "checkpoints").exists()


def _squad(path, n: int, seed: int, impossible_every: int = 0) -> None:
    rng = random.Random(seed)
    names = ["anna", "boris", "carla", "dmitri", "elena", "farid", "greta", "hugo"]
    qas, paragraphs = [], []
    for i in range(n):
        who = rng.choice(names)
        filler = " ".join(rng.choices(["the", "river", "book", "tree", "bird"], k=rng.randint(2, 6)))
        context = f"{filler} . the keeper is {who} . {filler}"
        start = context.index(f"is {who}") + 3
        impossible = bool(impossible_every) and i % impossible_every == 0
        qa = dict(id=f"q{i}", question="who is the keeper ?",
                  answers=[] if impossible else [dict(text=who, answer_start=start)])
        if impossible_every:
            qa["is_impossible"] = impossible
        qas.append(qa)
        paragraphs.append(dict(context=context, qas=[qa]))
    data = dict(version="v2.0" if impossible_every else "1.1", data=[dict(title="t", paragraphs=paragraphs)])
    path.write_text(json.dumps(data), encoding="utf-8")


def _squad_normalized(answer: str) -> str:
    """The official SQuAD evaluation script's normalize_answer: lower case, no punctuation, no articles."""
    answer = "".join(c for c in answer.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", answer).split())


def test_finetune_qa_reports_squad_scores_and_learns(pretrained, tmp_path):
    out, _ = pretrained
    _squad(tmp_path / "train.json", 160, 0)
    _squad(tmp_path / "dev.json", 32, 1)
    cfg = FinetuneConfig(task="qa", init=str(out), train=str(tmp_path / "train.json"),
                         validation=str(tmp_path / "dev.json"), epochs=3, batch_size=16, lr=3e-3, max_len=48,
                         log_every=10, out=str(tmp_path / "qa"))
    result = finetune(cfg, log=lambda _: None)
    e = result.run.final_eval
    assert {"exact", "f1", "total"} <= set(e) and e["total"] == 32
    assert e["f1"] >= e["exact"]
    records = [r for r in read_metrics(tmp_path / "qa" / "metrics.jsonl") if r["split"] == "train"]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    dev = json.loads((tmp_path / "dev.json").read_text(encoding="utf-8"))["data"][0]["paragraphs"]
    pairs = [(p["qas"][0]["question"], p["context"]) for p in dev]
    gold = [p["qas"][0]["answers"][0]["text"] for p in dev]
    # The saved model's own answers (the predict path, every token routed) are mostly the keeper's name.
    pre = load_pretrained(tmp_path / "qa")
    assert (pre.inputs["no_answer"], pre.inputs["trained_no_answer"]) == (False, False)  # SQuAD 1.1: never ""
    answers = answer_questions(pre, pairs, max_len=48, device="cpu")
    exact = 100 * sum(a.answer == g for a, g in zip(answers, gold)) / len(gold)
    assert exact >= 50, [a.answer for a in answers]  # a span picked at random is almost never the name (~60-70%)
    # The reported exact match is the share of questions whose answer is the keeper's name, counted here
    # from the saved model's answers as evaluation makes them: its windows, its batches of eval_batch_size
    # and capacity routing (tokens over an expert's capacity are dropped, so the batch matters). How many
    # answers that changes from the predict path's depends on the tokenizer, whose ties fall differently
    # in each process: the reported number is checked against this count, not against the predict path's.
    examples = [SquadExample(p["qas"][0]["id"], question, context, [], False)
                for p, (question, context) in zip(dev, pairs)]
    features = encode_squad(examples, pre.tokenizer, max_len=48, doc_stride=cfg.doc_stride,
                            max_query_len=cfg.max_query_len)
    pad, rows, starts, ends = special_ids(pre.tokenizer).pad, cfg.eval_batch_size, [], []
    with torch.no_grad():
        for i in range(0, len(features), rows):
            ids = features.input_ids[i:i + rows]
            out = pre.model.eval()(ids, features.token_type_ids[i:i + rows], padding_mask=ids == pad)
            starts.append(out.start_logits.float())
            ends.append(out.end_logits.float())
    evaluated = postprocess_squad(examples, features, torch.cat(starts), torch.cat(ends), version_2=False)
    counted = 100 * sum(_squad_normalized(evaluated[ex.id]) == g for ex, g in zip(examples, gold)) / len(gold)
    assert e["exact"] == pytest.approx(counted), (evaluated, gold)


def test_finetune_qa_squad2_reports_no_answer_breakdown(pretrained, tmp_path):
    out, _ = pretrained
    _squad(tmp_path / "train.json", 48, 0, impossible_every=3)
    _squad(tmp_path / "dev.json", 12, 1, impossible_every=3)
    cfg = FinetuneConfig(task="qa", init=str(out), train=str(tmp_path / "train.json"),
                         validation=str(tmp_path / "dev.json"), max_steps=3, batch_size=16, max_len=48,
                         out=str(tmp_path / "qa2"))
    e = finetune(cfg, log=lambda _: None).run.final_eval
    assert e["HasAns_total"] == 8 and e["NoAns_total"] == 4
    for key in ("exact", "f1"):  # the whole is the two parts weighted by their counts
        assert e[key] == pytest.approx((8 * e[f"HasAns_{key}"] + 4 * e[f"NoAns_{key}"]) / 12)
    # predict answers "" by the rule this evaluation used: recorded in the run and kept by an export
    assert main(["export", str(tmp_path / "qa2"), "--to", str(tmp_path / "shipped")]) == 0
    saved = json.loads((tmp_path / "shipped" / "config.json").read_text())["inputs"]
    assert saved == dict(max_len=48, doc_stride=cfg.doc_stride, max_query_len=cfg.max_query_len, no_answer=True,
                         null_threshold=0.0, trained_no_answer=True)
    assert load_pretrained(tmp_path / "qa2").inputs == saved


def test_finetune_errors_are_clear(pretrained, tmp_path, capsys):
    out, _ = pretrained
    _write_classify(tmp_path / "train.tsv", 16, 0)
    _write_classify(tmp_path / "dev.tsv", 8, 1, labels=("good", "meh"))
    args = ["finetune", "--task", "classify", "--init", str(out), "--train", str(tmp_path / "train.tsv"),
            "--validation", str(tmp_path / "dev.tsv"), "--out", str(tmp_path / "ft")]
    assert main(args) == 2
    assert "'meh' is not one of the training labels" in capsys.readouterr().err
    # A tokenizer that is not the pretraining one.
    other = tmp_path / "other.txt"
    other.write_text("completely different words here\n\nand more unrelated text\n", encoding="utf-8")
    from widenet.data.text.tokenizer import save_tokenizer, train_tokenizer
    save_tokenizer(train_tokenizer(["completely different words here"], vocab_size=60, min_frequency=1),
                   tmp_path / "other.json")
    _write_classify(tmp_path / "dev.tsv", 8, 1)
    assert main(args + ["--tokenizer", str(tmp_path / "other.json")]) == 2
    assert "is not the one the model" in capsys.readouterr().err  # smaller and other pieces
    assert main(args + ["--max-len", "500"]) == 2
    assert "exceeds the model's 64 positions" in capsys.readouterr().err
    # The labels come from the task file (2 here): a --set of another count was silently dropped.
    assert main(args + ["--set", "num_labels=5"]) == 2
    assert "--set num_labels=5: the run's task gives num_labels 2 (it follows the task and its data: leave " \
           "num_labels out)" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()  # nothing written for a run that never started


def test_pretrain_cli_and_its_errors(corpus, tmp_path, capsys):
    common = ["pretrain", "--vocab-size", "120", "--seq-len", "32", "--batch-size", "8", "--eval-examples", "8",
              "--cache-dir", str(tmp_path / "cache")] + [f"--set={k}={v}" for k, v in TINY_TEXT.items()]
    assert main(common + ["--corpus", str(corpus), "--max-steps", "3", "--out", str(tmp_path / "a")]) == 0
    assert "held-out MLM accuracy" in capsys.readouterr().out
    assert main(common + ["--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "b")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert main(common + ["--corpus", str(empty), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("widenet: error:")
    too_long = [a if a != "32" else "128" for a in common]
    assert main(too_long + ["--corpus", str(corpus), "--out", str(tmp_path / "d")]) == 2
    assert "exceeds widenet_text_tiny's 64 positions" in capsys.readouterr().err
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, pretrained, tmp_path, monkeypatch):
    from widenet.train.pretrain import PretrainTask
    from widenet.train.progress import StepResult
    from widenet.train.trainer import TrainingError

    real_loss = PretrainTask.loss

    def loss(self, net, batch, index):
        value, result = real_loss(self, net, batch, index)
        if index != 4:
            return value, result
        return value, lambda: StepResult(float("nan"), *[getattr(result(), k) for k in ("values", "examples",
                                                                                       "tokens")])

    monkeypatch.setattr(PretrainTask, "loss", loss)
    cfg = _pretrain_cfg(corpus, tmp_path / "run", max_steps=10, save_every=2,
                        tokenizer=str(pretrained[0] / "tokenizer.json"))
    with pytest.raises(TrainingError, match=r"loss became nan at step 5; stopped \(the newest checkpoint \S*step_00000004 "
                                            r"holds the weights that gave it; \S*step_00000002 before it is intact "
                                            r"\(remove step_00000004 to --resume from it\)\)"):
        pretrain(cfg, log=lambda _: None)
    assert load_checkpoint(tmp_path / "run").step == 4


# --- features shared with image runs through the one trainer -------------------------------
def test_pretraining_with_a_weight_average_resumes_exactly(corpus, pretrained, tmp_path):
    """--ema-decay on a text run: the average is evaluated beside the trained weights (split
    validation_ema), saved in checkpoints, and a run stopped at step 8 and resumed from step 6
    ends with the uninterrupted run's weights, average and metrics."""
    kw = dict(max_steps=12, log_every=1, save_every=3, ema_decay=0.9, eval_every=6,
              tokenizer=str(pretrained[0] / "tokenizer.json"))
    ref = pretrain(_pretrain_cfg(corpus, tmp_path / "ref", **kw), log=lambda _: None)
    assert ref.run.ema_eval is not None and ref.run.ema_eval["mlm_loss"] != ref.run.final_eval["mlm_loss"]
    records = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "validation_ema"] == [6, 12]
    cfg = _pretrain_cfg(corpus, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, log=_stop_after(8))
    pretrain(dataclasses.replace(cfg, resume=True), log=lambda _: None)
    a, b = (load_checkpoint(tmp_path / run).train_state["ema"] for run in ("ref", "cut"))
    assert a["updates"] == b["updates"] == 12
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    assert without_timing(records) == without_timing(read_metrics(tmp_path / "cut" / "metrics.jsonl"))


def test_pretraining_time_budget_equals_the_run_of_its_planned_length(corpus, pretrained, tmp_path, monkeypatch):
    """--time-budget on a text run: planned from throwaway steps and a timed evaluation (the RNGs are
    restored afterwards), so a budget that buys 10 steps trains exactly the --max-steps 10 run."""
    from widenet.train import trainer
    from widenet.train.budget import Deadline

    kw = dict(log_every=2, tokenizer=str(pretrained[0] / "tokenizer.json"))
    fixed = pretrain(_pretrain_cfg(corpus, tmp_path / "fixed", max_steps=10, **kw), log=lambda _: None)
    plans, real_plan = [], trainer.plan_budget

    def plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return dataclasses.replace(plans[-1], steps=10)

    monkeypatch.setattr(trainer, "plan_budget", plan)
    monkeypatch.setattr(Deadline, "steps", lambda self, done: 10)
    lines: list[str] = []
    budgeted = pretrain(_pretrain_cfg(corpus, tmp_path / "budget", max_steps=None, time_budget=1.0, **kw),
                        log=lines.append)
    assert len(plans) == 1 and plans[0].step_s > 0 and plans[0].eval_s > 0
    assert any(line.startswith("time budget 1 min:") for line in lines)
    assert budgeted.run.steps == 10
    for (name, a), (_, b) in zip(fixed.model.state_dict().items(), budgeted.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert without_timing(read_metrics(tmp_path / "fixed" / "metrics.jsonl")) == \
        without_timing(read_metrics(tmp_path / "budget" / "metrics.jsonl"))


def test_pretraining_killed_with_sigkill_resumes_exactly(corpus, pretrained, tmp_path):
    """`widenet pretrain` killed with SIGKILL mid-run and resumed ends like an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train import _env, _last_logged_step

    sets = [f"--set={k}={v}" for k, v in TINY_TEXT.items()]

    def command(out) -> list[str]:
        return [sys.executable, "-m", "widenet", "pretrain", "--corpus", str(corpus), "--tokenizer",
                str(pretrained[0] / "tokenizer.json"), "--seq-len", "32", "--batch-size", "16", "--max-steps",
                "30", "--save-every", "4", "--log-every", "1", "--eval-examples", "16", "--dropout", "0.1",
                "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out), *sets]

    env = _env(tmp_path)
    whole = subprocess.Popen(command(tmp_path / "B"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cut = subprocess.Popen(command(tmp_path / "A"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and cut.poll() is None:
            if _last_logged_step(tmp_path / "A" / "metrics.jsonl") >= 9:
                os.kill(cut.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        assert cut.wait(timeout=30) == -signal.SIGKILL, "the run was not killed mid-way"
    finally:
        if cut.poll() is None:
            cut.kill()
    saved = load_checkpoint(tmp_path / "A").step
    assert 8 <= saved < 30
    resumed = subprocess.run(command(tmp_path / "A") + ["--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert whole.wait(timeout=300) == 0
    wa, wb = (load_checkpoint(tmp_path / run).model_state for run in ("A", "B"))
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key
    assert without_timing(read_metrics(tmp_path / "A" / "metrics.jsonl")) == \
        without_timing(read_metrics(tmp_path / "B" / "metrics.jsonl"))


@pytest.mark.slow
def test_compiled_pretraining_resumes_exactly(corpus, pretrained, tmp_path, monkeypatch):
    """--compile on a text run: stopped after step 8 and resumed from step 6, it ends with exactly
    the weights and metrics of an uninterrupted compiled run. The trainer's torch.compile call is
    kept (fullgraph=True: one graph, no breaks) but given the aot_eager backend, which captures the
    same forward and backward without generating C++ (inductor is tested in test_compile.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real_compile = torch.compile

    def aot_eager(model, **kwargs):
        kwargs.pop("options", None)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    kw = dict(max_steps=12, log_every=1, save_every=3, dropout=0.1, compile=True,
              tokenizer=str(pretrained[0] / "tokenizer.json"))
    ref = pretrain(_pretrain_cfg(corpus, tmp_path / "ref", **kw), log=lambda _: None)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    cfg = _pretrain_cfg(corpus, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, log=_stop_after(8))
    resumed = pretrain(dataclasses.replace(cfg, resume=True), log=lambda _: None)
    for (name, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert without_timing(read_metrics(tmp_path / "ref" / "metrics.jsonl")) == \
        without_timing(read_metrics(tmp_path / "cut" / "metrics.jsonl"))


def test_finetune_scratch_keeps_architecture_and_tokenizer_but_not_weights(pretrained, tmp_path):
    """--scratch: the baseline for transfer: same model and vocabulary, random weights."""
    from widenet.train.finetune import build_finetune_model, load_init

    out, _ = pretrained
    _write_classify(tmp_path / "train.tsv", 16, 0)
    common = dict(task="classify", init=str(out), train=str(tmp_path / "train.tsv"),
                  validation=str(tmp_path / "train.tsv"))
    source, tokenizer = load_init(FinetuneConfig(**common, scratch=True))
    pretrained_word = source.model_state["backbone.embeddings.word.weight"]
    warm = build_finetune_model(source, FinetuneConfig(**common), 2)
    cold = build_finetune_model(source, FinetuneConfig(**common, scratch=True), 2)
    assert warm.cfg == cold.cfg and tokenizer.get_vocab_size() == cold.cfg.vocab_size
    assert torch.equal(warm.backbone.embeddings.word.weight, pretrained_word)
    assert not torch.allclose(cold.backbone.embeddings.word.weight, pretrained_word)
