"""The objective seam: new losses train through the unchanged loop.

Two test-only objectives, the shapes the preference and RL issues build:
- a pairwise preference loss (DPO's, written from the paper) that needs a reference model;
- an online "sample, score, update" loss (REINFORCE with a group baseline) that needs
  generation.
Both run through `Trainer(recipe, objective=...)`: the loop's accumulation, logging,
evals, checkpoints and resume are the same code that trains SFT.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from launcher.errors import UserError
from launcher.objectives import Context, Loss, Needs, check_needs
from launcher.objectives.supervised import Supervised
from launcher.recipe import load_recipe
from launcher.train.loop import Trainer
from launcher.train.report import read_metrics
from launcher.train.tasks import TASKS

BETA = 0.5


def target_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (labels != -100)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(1)


def rejected(batch: dict) -> dict:
    """The same prompt with every answer token replaced by the next id: a worse answer."""
    ids = batch["input_ids"].clone()
    answer = batch["labels"] != -100
    ids[answer] = (ids[answer] + 1) % 256 + 4
    return {**batch, "input_ids": ids, "labels": torch.where(answer, ids, batch["labels"])}


class PairwisePreference:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((log pi(y_w) - log ref(y_w))
    - (log pi(y_l) - log ref(y_l)))), the chosen answer the data's, the rejected one made
    by `rejected`."""

    name = "test-pairwise"
    needs = Needs(reference_model=True)

    def bind(self, ctx: Context) -> None:
        self.reference = ctx.reference
        self.supervised = Supervised(ctx.task)  # evals report the chosen answers' loss
        self.supervised.bind(ctx)

    def margins(self, model, batch):
        worse = rejected(batch)
        keys = ("input_ids", "attention_mask", "labels")
        pc, pr = (target_logps(model, *(b[k] for k in keys)) for b in (batch, worse))
        rc, rr = (target_logps(self.reference, *(b[k] for k in keys)) for b in (batch, worse))
        return BETA * ((pc - rc) - (pr - rr))

    def loss(self, model, batch) -> Loss:
        m = self.margins(model, batch)
        return Loss(-F.logsigmoid(m).mean(), {"margin": m.mean().detach()})

    def eval_batch(self, model, batch):
        return self.supervised.eval_batch(model, batch)


PAIRWISE = ["train.max_steps=8", "train.log_every=1", "train.save_every=4", "train.lr=5e-3"]


def test_pairwise_preference_objective_trains_through_the_loop(chat_recipe, tmp_path):
    r = load_recipe(chat_recipe, PAIRWISE)
    objective = PairwisePreference()
    trainer = Trainer(r, objective=objective)
    summary = trainer.fit()
    recs = [
        x for x in read_metrics(tmp_path / "chat-run" / "metrics.jsonl") if x["kind"] == "train"
    ]
    # policy == reference at the first step: the paper's loss is exactly log 2, margin 0
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert recs[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert recs[-1]["margin"] > 0.5 and recs[-1]["loss"] < 0.6 * math.log(2), recs[-1]
    assert summary["status"] == "completed" and summary["objective"] == "test-pairwise"

    # the reference is the starting model: the adapter switched off gives the base's logits
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(r.model.name_or_path)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    got = objective.reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(trainer.model(input_ids=ids).logits, want, atol=1e-3)

    # the loop's exact resume holds for the new objective: steps 5-8 again from step 4
    resumed = tmp_path / "resumed"
    again = load_recipe(chat_recipe, [*PAIRWISE, f"output.dir={resumed}"])
    ckpt = tmp_path / "chat-run" / "checkpoints" / "step-00000004"
    Trainer(again, resume=str(ckpt), objective=PairwisePreference()).fit()
    redo = [x for x in read_metrics(resumed / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["loss"] for x in redo] == [x["loss"] for x in recs[4:]]


class SampleScoreUpdate:
    """Online RL in one micro-batch: sample completions of each prompt from the policy,
    score them (reward: the share of even token ids), and take a REINFORCE step on the
    completions' log-probabilities with the group's mean reward as the baseline."""

    name = "test-online"
    needs = Needs(generation=True)

    def bind(self, ctx: Context) -> None:
        self.acc, self.tokenizer = ctx.accelerator, ctx.tokenizer
        self.supervised = Supervised(ctx.task)
        self.supervised.bind(ctx)

    def loss(self, model, batch) -> Loss:
        prompt = batch["input_ids"][:, :4].repeat_interleave(4, 0)  # 4 samples a prompt
        policy = self.acc.unwrap_model(model)
        with torch.no_grad():
            out = policy.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                max_new_tokens=6,
                min_new_tokens=6,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        completion = out[:, prompt.shape[1] :]
        reward = (completion % 2 == 0).float().mean(1)
        advantage = reward - reward.mean()
        labels = torch.cat([torch.full_like(prompt, -100), completion], 1)
        logp = target_logps(model, out, torch.ones_like(out), labels)
        return Loss(-(advantage * logp).mean(), {"reward": reward.mean()})

    def eval_batch(self, model, batch):
        return self.supervised.eval_batch(model, batch)


def test_sample_score_update_objective_raises_its_reward(chat_recipe, tmp_path):
    torch.manual_seed(0)
    r = load_recipe(
        chat_recipe,
        ["train.max_steps=24", "train.log_every=4", "train.lr=2e-2", "train.eval_every=null"],
    )
    summary = Trainer(r, objective=SampleScoreUpdate()).fit()
    recs = [
        x for x in read_metrics(tmp_path / "chat-run" / "metrics.jsonl") if x["kind"] == "train"
    ]
    assert summary["status"] == "completed" and len(recs) == 6
    assert recs[-1]["reward"] > recs[0]["reward"] + 0.15, [x["reward"] for x in recs]


def test_needs_are_refused_before_anything_is_written(chat_recipe):
    from launcher.dist.strategies import STRATEGIES

    r = load_recipe(chat_recipe, ["adapter.type=full"])

    class Wants:
        name = "wants"
        needs = Needs(reference_model=True, generation=True, formats=("preference_pairs",))

    class NoEos:
        eos_token_id = None

    with pytest.raises(UserError) as e:
        check_needs(Wants(), r, STRATEGIES["zero3"], NoEos())
    keys = [p.key for p in e.value.problems]
    assert keys == ["data.format", "distributed.strategy", "model.name_or_path"]
    check_needs(Supervised(TASKS["causal_lm"]), r, STRATEGIES["zero3"], NoEos())  # needs none
