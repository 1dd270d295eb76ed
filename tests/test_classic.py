"""The classic tasks on tiny models built here: NER, seq2seq, multi-label, regression,
and the overfitting controls (early stopping that restores the best model, label
smoothing, dropout overrides)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import make_tiny
import pytest
import torch

from launcher.recipe import load_recipe
from launcher.train.loop import Trainer
from launcher.train.metrics import entities, entity_scores
from launcher.train.tasks import TASKS

FILLER = [
    "we",
    "met",
    "in",
    "at",
    "with",
    "and",
    "then",
    "saw",
    "visited",
    "from",
    "the",
    "today",
    "near",
]
PER = [["alexandra"], ["bartholomew"], ["maria", "lopez"], ["jonathan", "smithers"]]
LOC = [["amsterdam"], ["winchester"], ["new", "york"], ["buenos", "aires"]]
ORG = [["globex"], ["initech", "systems"]]


def ner_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with 1-3 entities, tagged BIO."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        tags = ["O"] * len(tokens)
        for _ in range(rng.randint(1, 3)):
            kind, names = rng.choice([("PER", PER), ("LOC", LOC), ("ORG", ORG)])
            name = rng.choice(names)
            at = rng.randrange(len(tokens) + 1)
            tokens[at:at] = name
            tags[at:at] = [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict]) -> Path:
    lines = ["-DOCSTART- -X- O O", ""]
    for r in rows:
        lines += [f"{w} NN O {t}" for w, t in zip(r["tokens"], r["tags"], strict=True)] + [""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def ner_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    words = FILLER + [w for group in (PER, LOC, ORG) for name in group for w in name]
    make_tiny.make_bert_wordpiece(root / "bert", words)
    write_conll(root / "train.conll", ner_rows(600, 0))
    make_tiny.write_jsonl(root / "eval.jsonl", ner_rows(80, 1))
    return root


def ner_recipe(root: Path, tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "ner.yaml"
    path.write_text(
        f"""\
task: token_classification
model: {{name_or_path: {root / "bert"}}}
data:
  format: token_tags
  train: {root / "train.conll"}
  eval: {root / "eval.jsonl"}
  max_length: 48
train: {{max_steps: 120, micro_batch_size: 16, lr: 3.0e-3, eval_every: 60, log_every: 20}}
output: {{dir: {tmp_path / "run"}}}
{extra}"""
    )
    return path


def test_entity_scores_equal_seqeval():
    """Our conlleval chunking against seqeval's, on random (often ill-formed) BIO tags."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    true = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in s] for s in true]
    ours = entity_scores(true, pred)
    assert ours["entity_f1"] == pytest.approx(f1_score(true, pred), abs=1e-12)
    assert ours["entity_precision"] == pytest.approx(precision_score(true, pred), abs=1e-12)
    assert ours["entity_recall"] == pytest.approx(recall_score(true, pred), abs=1e-12)
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {
        ("PER", 0, 1),
        ("LOC", 3, 3),
        ("LOC", 4, 4),
    }


def test_regression_and_multi_label_scores_equal_scipy_and_sklearn():
    scipy_stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    from launcher.train.metrics import multi_label_scores, regression_scores

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (200,), generator=g).double()  # ties, as star ratings have
    p = y + torch.randn(200, generator=g, dtype=torch.float64)
    ours = regression_scores(p, y)
    assert ours["pearson"] == pytest.approx(scipy_stats.pearsonr(p, y)[0], abs=1e-9)
    assert ours["spearman"] == pytest.approx(scipy_stats.spearmanr(p, y)[0], abs=1e-9)
    assert ours["rmse"] == pytest.approx(((p - y) ** 2).mean().sqrt().item(), abs=1e-9)

    yt = (torch.rand(300, 6, generator=g) < 0.3).long()
    yp = torch.where(torch.rand(300, 6, generator=g) < 0.8, yt, 1 - yt)
    yp[:, 5] = 0  # a label never predicted: its F1 is 0
    ours = multi_label_scores(yp, yt)
    for avg in ("micro", "macro"):
        ref = metrics.f1_score(yt.numpy(), yp.numpy(), average=avg, zero_division=0)
        assert ours[f"{avg}_f1"] == pytest.approx(ref, abs=1e-9)
    assert ours["subset_accuracy"] == pytest.approx(
        metrics.accuracy_score(yt.numpy(), yp.numpy()), abs=1e-9
    )


def test_ner_learns_the_tagging_rule(ner_setup, tmp_path):
    trainer = Trainer(load_recipe(ner_recipe(ner_setup, tmp_path)))
    summary = trainer.fit()
    final = summary["final_eval"]
    assert final["entity_f1"] >= 0.9, final
    assert trainer.data.labels == ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]

    # labels sit on the first sub-token of each word only: one per word of the row
    tok = trainer.tokenizer
    first_row = ner_rows(600, 0)[0]
    labelled = [x for x in trainer.data.train[0]["labels"] if x != -100]
    assert [trainer.data.labels[x] for x in labelled] == first_row["tags"]
    words = ["we", "met", "bartholomew", "in", "buenos", "aires"]
    enc = tok(words, is_split_into_words=True)
    assert len(enc["input_ids"]) > len(words) + 2  # some words were split into pieces

    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        pred = model(**tok([words], is_split_into_words=True, return_tensors="pt")).logits[0]
    first = {}
    for i, w in enumerate(enc.word_ids()):
        if w is not None and w not in first:
            first[w] = model.config.id2label[int(pred[i].argmax())]
    assert [first[i] for i in range(len(words))] == ["O", "O", "B-PER", "O", "B-LOC", "I-LOC"]


def test_seq2seq_learns_a_word_mapping_to_bleu_80(tmp_path):
    en = [
        "red",
        "blue",
        "green",
        "cat",
        "dog",
        "bird",
        "sat",
        "ran",
        "flew",
        "on",
        "under",
        "the",
        "big",
        "small",
    ]
    de = [
        "rot",
        "blau",
        "gruen",
        "katze",
        "hund",
        "vogel",
        "sass",
        "lief",
        "flog",
        "auf",
        "unter",
        "der",
        "gross",
        "klein",
    ]
    lex = dict(zip(en, de, strict=True))

    def rows(n, seed):
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            src = [rng.choice(en) for _ in range(rng.randint(2, 8))]
            out.append({"en": " ".join(src), "de": " ".join(lex[w] for w in src)})
        return out

    make_tiny.make_seq2seq(tmp_path / "bart", "bart", en + de, d_model=128)
    make_tiny.write_jsonl(tmp_path / "train.jsonl", rows(800, 0))
    make_tiny.write_jsonl(tmp_path / "eval.jsonl", rows(48, 1))
    recipe = tmp_path / "mt.yaml"
    recipe.write_text(
        f"""\
task: seq2seq
model: {{name_or_path: {tmp_path / "bart"}}}
data:
  format: translation
  train: {tmp_path / "train.jsonl"}
  eval: {tmp_path / "eval.jsonl"}
  source_field: en
  target_field: de
  max_length: 32
  max_target_length: 16
train:
  max_steps: 300
  micro_batch_size: 16
  lr: 1.0e-3
  scheduler: constant
  eval_every: 150
  log_every: 50
  early_stopping: {{metric: bleu, patience: 5}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    summary = Trainer(load_recipe(recipe)).fit()
    assert summary["final_eval"]["bleu"] >= 80, summary["final_eval"]
    assert summary["final_eval"]["chrf"] >= 80
    assert summary["best"]["metric"] == "bleu" and summary["best"]["model_is_best"]

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    out = model.generate(**tok(["the big dog ran under the cat"], return_tensors="pt"))
    assert tok.decode(out[0], skip_special_tokens=True).split() == (
        ["der", "gross", "hund", "lief", "unter", "der", "katze"]
    )


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_seq2seq_families_train_with_lora_and_generate(family, tmp_path):
    """T5 (relative positions, prefix) and Marian (sinusoidal) with LoRA: the eval
    generates, BLEU and chrF are reported, the adapter reloads with PEFT."""
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    rows = [{"source": "a b c", "target": "e f g"}, {"source": "b c d", "target": "f g h"}] * 8
    make_tiny.make_seq2seq(tmp_path / family, family, words)
    make_tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
task: seq2seq
model: {{name_or_path: {tmp_path / family}}}
data: {{format: translation, train: {tmp_path / "d.jsonl"}, eval: {tmp_path / "d.jsonl"},
        source_prefix: "a ", max_length: 16, max_target_length: 8}}
adapter: {{type: lora, r: 4, alpha: 8}}
train: {{max_steps: 4, micro_batch_size: 8, lr: 1.0e-2, eval_every: 4,
         generation: {{max_new_tokens: 5, num_beams: 2}}}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    trainer = Trainer(load_recipe(recipe))
    summary = trainer.fit()
    final = summary["final_eval"]
    assert {"bleu", "chrf", "eval_loss", "perplexity"} <= set(final)
    assert trainer.data.train[0]["input_ids"][:2] == trainer.tokenizer("a a")["input_ids"][:2]
    assert trainer.data.train[0]["labels"][-1] == trainer.tokenizer.eos_token_id
    config = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / family)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "model").eval()
    batch = trainer.tokenizer(["a a b c"], return_tensors="pt")
    trained = trainer.acc.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        labels = torch.tensor([[4, 5, 1]])
        assert torch.allclose(
            model(**batch, labels=labels).logits, trained(**batch, labels=labels).logits, atol=1e-5
        )


def _cls_recipe(tmp_path: Path, tiny_bert: Path, task: str, rows: list[dict], extra: str) -> Path:
    make_tiny.write_jsonl(tmp_path / "train.jsonl", rows[: int(len(rows) * 0.8)])
    make_tiny.write_jsonl(tmp_path / "eval.jsonl", rows[int(len(rows) * 0.8) :])
    path = tmp_path / "r.yaml"
    path.write_text(
        f"""\
task: {task}
model: {{name_or_path: {tiny_bert}}}
data: {{format: text_classification, train: {tmp_path / "train.jsonl"},
        eval: {tmp_path / "eval.jsonl"}, max_length: 32}}
train: {{epochs: 12, micro_batch_size: 16, lr: 3.0e-3, eval_every: 1000, log_every: 10}}
output: {{dir: {tmp_path / "run"}}}
{extra}"""
    )
    return path


def test_multi_label_head_trains_with_bce(tmp_path, tiny_bert):
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        words = [rng.choice(make_tiny.WORDS[18:30]) for _ in range(rng.randint(3, 6))]
        words += rng.sample(["cat", "dog", "red", "blue"], rng.randint(0, 2))
        rng.shuffle(words)
        labels = [k for k, ws in (("animal", ("cat", "dog")), ("color", ("red", "blue")))]
        labels = [
            k
            for k in labels
            if any(w in words for w in dict(animal=("cat", "dog"), color=("red", "blue"))[k])
        ]
        rows.append({"text": " ".join(words), "label": labels})
    trainer = Trainer(
        load_recipe(_cls_recipe(tmp_path, tiny_bert, "multi_label_classification", rows, ""))
    )
    summary = trainer.fit()
    final = summary["final_eval"]
    assert final["micro_f1"] >= 0.9 and final["subset_accuracy"] >= 0.8, final
    model = trainer.acc.unwrap_model(trainer.model)
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.id2label == {0: "animal", 1: "color"}

    # the eval loss is the head's own BCE loss
    batch = next(iter(trainer.evaluate.loader))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch["labels"])
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_regression_head_trains_with_mse(tmp_path, tiny_bert):
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        good = rng.randint(0, 3)
        words = ["good"] * good + [rng.choice(make_tiny.WORDS[18:30]) for _ in range(4 - good)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": good / 3})
    trainer = Trainer(
        load_recipe(_cls_recipe(tmp_path, tiny_bert, "sequence_regression", rows, ""))
    )
    summary = trainer.fit()
    final = summary["final_eval"]
    assert final["pearson"] >= 0.9 and final["rmse"] < 0.15, final
    assert final["eval_loss"] == pytest.approx(final["mse"], rel=1e-6)
    model = trainer.acc.unwrap_model(trainer.model)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_early_stopping_stops_and_restores_the_best_model(cls_recipe, cls_data, tmp_path):
    """Eval labels are the train labels flipped: the eval metric is best after the first
    step and only gets worse, so the run stops after `patience` evals and model/ must be
    the step-1 weights (checked against a run that stops at step 1 by itself)."""
    flipped = tmp_path / "flipped.jsonl"
    rows = [json.loads(line) for line in Path(cls_data["train"]).read_text().splitlines()]
    make_tiny.write_jsonl(
        flipped, [{**r, "label": "neg" if r["label"] == "pos" else "pos"} for r in rows[:32]]
    )
    common = [
        f"data.eval={flipped}",
        "train.scheduler=constant",
        "train.lr=5e-3",
        "train.max_steps=20",
        "train.eval_every=1",
    ]
    summary = Trainer(
        load_recipe(
            cls_recipe,
            [
                *common,
                "train.early_stopping={metric: accuracy, patience: 2}",
                f"output.dir={tmp_path / 'es'}",
            ],
        )
    ).fit()
    assert summary["status"] == "early_stopped" and summary["steps"] < 20
    assert (
        summary["best"]["model_is_best"]
        and summary["best"]["step"] == summary["final_eval"]["step"]
    )
    assert summary["last_eval"]["step"] == summary["steps"] > summary["best"]["step"]
    assert not (tmp_path / "es" / "best").exists()

    best_step = summary["best"]["step"]
    Trainer(
        load_recipe(
            cls_recipe, [*common, f"train.max_steps={best_step}", f"output.dir={tmp_path / 'ref'}"]
        )
    ).fit()
    from safetensors.torch import load_file

    got = load_file(tmp_path / "es" / "model" / "model.safetensors")
    ref = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_label_smoothing_and_dropout_override(cls_recipe, tmp_path):
    from launcher.train.tasks import TASKS

    trainer = Trainer(
        load_recipe(
            cls_recipe,
            ["model.dropout=0.0", "train.label_smoothing=0.2", "train.max_steps=1"],
        )
    )
    model = trainer.acc.unwrap_model(trainer.model)
    assert model.config.hidden_dropout_prob == 0.0
    assert model.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in model.modules() if hasattr(m, "p") and isinstance(m.p, float))
    batch = next(iter(trainer.data.loader(0, 0)))
    out = model(**batch)
    task = TASKS["sequence_classification"]
    plain = task.smoothed_loss(out, batch, 0.0)
    assert plain.item() == pytest.approx(out.loss.item(), abs=1e-6)  # the head's own loss
    smooth = task.smoothed_loss(out, batch, 0.2)
    logp = out.logits.log_softmax(-1)
    n = logp.shape[-1]
    target = torch.full_like(logp, 0.2 / n).scatter(1, batch["labels"][:, None], 0.8 + 0.2 / n)
    assert smooth.item() == pytest.approx(-(target * logp).sum(-1).mean().item(), abs=1e-6)
    summary = trainer.fit()
    assert set(summary["dropout_overrides"]) >= {
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
    }


# -- bad input: one message naming file, line and key; exit 2; nothing written ----------


def _user_error(capsys, recipe: Path, *overrides: str) -> str:
    from launcher.cli.main import main

    args = ["train", str(recipe)]
    for o in overrides:
        args += ["-o", o]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_ner_bad_rows(ner_setup, tmp_path, capsys):
    recipe = ner_recipe(ner_setup, tmp_path)
    bad = tmp_path / "bad.jsonl"
    rows = ner_rows(6, 3)
    rows[3] = {"tokens": ["we", "met", "globex"], "tags": ["O", "B-ORG"]}
    make_tiny.write_jsonl(bad, rows)
    err = _user_error(capsys, recipe, f"data.train={bad}")
    assert f"{bad}:4" in err and "3 tokens but 2 tags" in err and "on_bad_row" in err

    # a tag the model was not built with (only seen in eval)
    rows[3] = {"tokens": ["we", "met", "globex"], "tags": ["O", "O", "B-MISC"]}
    make_tiny.write_jsonl(bad, rows)
    err = _user_error(capsys, recipe, f"data.eval={bad}")
    assert f"{bad}:4" in err and "B-MISC" in err and "data.labels" in err

    conll = tmp_path / "bad.conll"
    conll.write_text("we O\nmet O\nglobex\n\n")
    err = _user_error(capsys, recipe, f"data.train={conll}")
    assert f"{conll}:3" in err and "a word and a tag" in err
    assert not (tmp_path / "run").exists()


def test_too_long_policy_error_drop_truncate(ner_setup, tmp_path, capsys):
    recipe = ner_recipe(ner_setup, tmp_path)
    rows = ner_rows(40, 5)
    rows[7] = {"tokens": ["bartholomew"] * 20, "tags": ["B-PER"] * 20}
    data = make_tiny.write_jsonl(tmp_path / "long.jsonl", rows)
    common = [f"data.train={data}", f"data.eval={data}", "data.max_length=48"]
    err = _user_error(capsys, recipe, *common, "data.too_long=error")
    assert f"{data}:8" in err and "longer than data.max_length=48" in err
    assert not (tmp_path / "run").exists()

    # counted over train and eval (the same file here)
    for policy, kept, truncated, dropped in (("drop", 39, 0, 2), ("truncate", 40, 2, 0)):
        trainer = Trainer(
            load_recipe(
                recipe,
                [
                    *common,
                    f"data.too_long={policy}",
                    "train.max_steps=1",
                    f"output.dir={tmp_path / policy}",
                ],
            )
        )
        stats = trainer.data.stats
        assert (stats["train_examples"], stats["truncated"], stats["dropped_too_long"]) == (
            kept,
            truncated,
            dropped,
        )
        assert max(len(e["input_ids"]) for e in trainer.data.train) <= 48
        trainer.stop.uninstall()


def test_max_length_beyond_the_position_table(ner_setup, tmp_path, capsys):
    err = _user_error(capsys, ner_recipe(ner_setup, tmp_path), "data.max_length=100")
    assert "data.max_length=100" in err and "only 64 positions" in err
    assert not (tmp_path / "run").exists()


def test_seq2seq_empty_target_and_long_target(tmp_path, capsys):
    make_tiny.make_seq2seq(tmp_path / "t5", "t5", ["a", "b", "c"])
    rows = [{"source": "a b", "target": "b c"}] * 4 + [{"source": "a", "target": "  "}]
    data = make_tiny.write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
task: seq2seq
model: {{name_or_path: {tmp_path / "t5"}}}
data: {{format: translation, train: {data}, max_target_length: 4}}
train: {{max_steps: 1}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    err = _user_error(capsys, recipe)
    assert f"{data}:5" in err and "field 'target' must be a non-empty str" in err
    rows[4] = {"source": "a", "target": "a b c a b c"}
    make_tiny.write_jsonl(data, rows)
    err = _user_error(capsys, recipe, "data.too_long=error")
    assert f"{data}:5" in err and "the target is 7 tokens" in err
    assert "data.max_target_length=4" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "task, override, key, needle",
    [
        ("sequence_regression", "train.label_smoothing=0.1", "train.label_smoothing", "smooth"),
        ("sequence_regression", "data.labels=[a, b]", "data.labels", "a number"),
        ("token_classification", "train.generation.num_beams=4", "train.generation", "generate"),
        ("seq2seq", "train.early_stopping={metric: f1}", "train.early_stopping.metric", "bleu"),
        ("seq2seq", "data.format=chat", "data.format", "translation"),
    ],
)
def test_recipe_rules_of_the_tasks(tmp_path, capsys, task, override, key, needle):
    from launcher.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"task: {task}\nmodel: {{name_or_path: x}}\n"
        f"data: {{format: {TASKS[task].formats[0]}, train: x.jsonl, eval: y.jsonl}}\n"
        "train: {eval_every: 5}\noutput: {dir: out}\n"
    )
    rc = main(["validate", str(recipe), "-o", override])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and needle in err, err


def test_dropout_override_on_a_decoder_sets_its_attention_dropout(
    tmp_path, tiny_llama, chat_data, capsys
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
model: {{name_or_path: {tiny_llama}, dropout: 0.1}}
data: {{format: chat, train: {chat_data["train"]}, max_length: 64}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    # Llama's config has attention_dropout: the override applies
    trainer = Trainer(load_recipe(recipe, ["train.max_steps=1"]))
    assert trainer.built.dropout_keys == ["attention_dropout"]
    trainer.stop.uninstall()
