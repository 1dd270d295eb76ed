"""The training loop: one explicit Accelerate loop, readable top to bottom.

recipe -> run-folder decision -> data -> model (+fast dropout, +adapter) -> optimizer ->
[resume, checked against this run] -> run folder written -> for each optimizer step:
accumulate micro-batches, clip, step, log, eval, save; stop on a signal, early stopping
or a non-finite loss -> final model, summary, plot.

The run's objective (`launcher/objectives/`) turns each micro-batch into a loss and
statistics. A step is one optimizer step. Data order depends only on (seed, epoch) and a
checkpoint stores model, optimizer, scheduler, RNG and step, so a resumed run logs the
same losses as one that never stopped. Nothing is written to the run folder until every
check (recipe, data rows, model, adapter, resume) has passed."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from launcher.data.batches import counts, load_train_data, train_examples
from launcher.dist.strategies import STRATEGIES
from launcher.objectives import OBJECTIVES, Context, Objective, Reference, check_needs
from launcher.recipe.resolve import schedule
from launcher.recipe.schema import Recipe, fingerprint
from launcher.train import checkpoint, distributed, report, rundir, setup
from launcher.train.best import BestModel, EarlyStopping
from launcher.train.evaluate import Evaluator, shown
from launcher.train.signals import STOP
from launcher.train.state import TrainState
from launcher.train.tasks import TASKS


class Trainer:
    """One run: `Trainer(recipe).fit()`. `objective` replaces the task's own loss."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        resume: str | None = None,
        overwrite: bool = False,
        objective: Objective | None = None,
    ):
        self.recipe, self.task = recipe, TASKS[recipe.task]
        self.objective = objective or OBJECTIVES["supervised"](recipe, self.task)
        self.run_dir = Path(recipe.output.dir)
        self.wall_start = time.time()
        # from the start: a stop signal that lands while the model loads is not lost
        # (the run then stops, with a checkpoint, after its first step)
        self.stop = STOP.install()
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.stop.uninstall()
            raise

    # -- setup: every check first; the run folder is written only once they all pass --------
    def _setup(self, resume: str | None, overwrite: bool) -> None:
        r, t, needs = self.recipe, self.recipe.train, self.objective.needs
        self.strategy = STRATEGIES[r.distributed.strategy]
        self.acc = acc = setup.make_accelerator(r, self.strategy, self.run_dir)
        self.preflight = distributed.preflight(acc, fingerprint(r), self.run_dir)
        self.main = acc.is_main_process
        self.resume_from = rundir.on_main(
            acc, lambda: rundir.find_start(self.run_dir, resume, overwrite)
        )
        self.tokenizer = setup.load_processor(r, self.task)
        check_needs(self.objective, r, self.strategy, self.tokenizer)
        self.data = load_train_data(r, self.task, self.tokenizer, acc)
        self.sched = schedule(t, self.data.n_train, acc.num_processes)
        acc.gradient_accumulation_steps = self.sched.grad_accum
        acc.print(f"{self.strategy.name}: {self.sched.accounting()}")
        identity = rundir.run_identity(r, self.sched, train_examples(self.data))

        self.built = built = setup.build(
            r, self.task, self.data.labels, self.tokenizer, self.strategy, acc.device.type,
            needs_reference=needs.reference_model, log=acc.print,
        )  # fmt: skip
        model = built.model
        self.n_params, self.n_trainable = setup.count_parameters(model)
        distributed.size_zero3_windows(acc, self.n_params)
        distributed.fill_hidden_size_autos(acc, model)
        optimizer = setup.make_optimizer(r, acc, model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        built.rss_mb["after_prepare"] = report.rss_now_mb()
        built.rss_mb["peak_until_prepare"] = report.peak_memory_mb()["peak_rss_mb"]
        self.lr_schedule = setup.make_lr_schedule(r, acc, self.optimizer, self.sched)
        reference = None
        if needs.reference_model:
            copy = built.reference.to(acc.device) if built.reference is not None else None
            reference = Reference(acc, self.model, copy)
        self.objective.bind(Context(r, self.task, self.tokenizer, acc, self.model, reference))

        es = t.early_stopping
        self.early = EarlyStopping(es, self.task.lower_is_better) if es is not None else None
        keeps_best = es is not None and es.restore_best and r.output.save_model
        self.best_model = BestModel(self.run_dir, acc, self._save_model) if keeps_best else None
        self.state = TrainState(run=identity)
        if self.resume_from is not None:
            saved = checkpoint.saved_state(self.resume_from).get("run", {})
            rundir.check_resume(saved, identity, self.resume_from)
            self.state = TrainState.from_json(checkpoint.load(acc, self.resume_from))
            acc.print(f"resumed from {self.resume_from} at step {self.state.step}")
            if self.best_model is not None:
                self.best_model.check_on_resume(self.state.best)
        self._open_run_folder()

    def _open_run_folder(self) -> None:
        """Every check passed: now the run folder may change."""
        r, acc, resumed = self.recipe, self.acc, self.resume_from
        here = resumed is not None and resumed.parent.parent.resolve() == self.run_dir.resolve()
        if self.main:
            rundir.prepare(
                self.run_dir,
                r,
                clear=resumed is None and rundir.holds_run(self.run_dir),
                resumed_at=self.state.step if here else None,
            )
            distributed.write_record(
                self.run_dir, acc, self.strategy, self.sched, self.model, self.preflight
            )
        acc.wait_for_everyone()
        self.metrics = report.MetricsLog(
            self.run_dir, self.main, self.state.step if resumed else None
        )
        start = report.start_record(
            self.state.step, self.sched.total_steps, acc.num_processes, resumed
        )
        self.metrics.write(start)
        loader, t = self.data.eval_loader(), r.train
        self.evaluate = None if loader is None else Evaluator(
            acc, self.objective, self.task, self.tokenizer, self.data.labels, loader,
            t.generation, r.data.max_target_length, deepspeed=self.strategy.kind == "deepspeed",
            sharded=self.strategy.shards_params,
        )  # fmt: skip
        setup.start_trackers(acc, r, self.run_dir)

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the schedule ends, a stop signal, early stopping or a non-finite loss."""
        st, s, t = self.state, self.sched, self.recipe.train
        self.bar = report.progress(s.total_steps, st.step, self.main)
        self.grad_norm, self.window_start, self.evaluated_at = None, time.time(), -1
        started, tokens0, samples0 = time.time(), st.tokens, st.samples
        status = "completed"
        if t.eval_at_start and self.evaluate is not None and st.step == 0:
            self._eval(0)
        self.model.train()
        try:
            while st.step < s.total_steps and status == "completed":
                epoch = st.step // s.steps_per_epoch
                skip = (st.step - epoch * s.steps_per_epoch) * s.grad_accum
                self._group: list[Any] = []
                for batch in self.data.loader(epoch, skip):
                    step_loss = self._micro_batch(batch)
                    if step_loss is None:  # the step's gradients are still accumulating
                        continue
                    status = self._after_step(step_loss) if math.isfinite(step_loss) else "diverged"
                    if status != "completed" or st.step >= s.total_steps:
                        break
        finally:
            self.stop.uninstall()
            self.bar.close()
        train_time = time.time() - started
        # count what ran since the last log line (a stop or divergence mid-window)
        st.tokens += self._sum(st.window.tokens)
        st.samples += self._sum(st.window.samples)
        st.window.tokens = st.window.samples = 0
        throughput = {
            "tokens_per_s": round((st.tokens - tokens0) / train_time, 1),
            "samples_per_s": round((st.samples - samples0) / train_time, 2),
        }
        finished = status in ("completed", "early_stopped")
        if self.evaluate is not None and finished and self.evaluated_at != st.step:
            self._eval_and_watch(st.step, final=True)
        restored = self._save_final() if finished and self.recipe.output.save_model else None
        return self._finish(status, train_time, throughput, restored)

    def _micro_batch(self, batch: dict[str, Any]) -> float | None:
        """Forward and backward of one micro-batch; at the last one of a step, also clip and
        step the optimizer. Returns the step's loss (mean over its micro-batches and
        processes) once the step is taken, or refused when it is not finite; else None."""
        t, acc, st = self.recipe.train, self.acc, self.state
        tokens, samples = counts(batch)
        st.window.tokens += tokens
        st.window.samples += samples
        with acc.accumulate(self.model):
            out = self.objective.loss(self.model, batch)
            loss = out.value if self.built.l2sp is None else out.value + self.built.l2sp.penalty()
            self._group.append(out)
            if not acc.sync_gradients:
                acc.backward(loss)
                return None
            # checked before the last backward: DeepSpeed applies the update inside it, and
            # a non-finite step must never reach the weights
            step_loss, self.step_stats = self._step_means()
            if not math.isfinite(step_loss):
                acc.print(
                    f"\nstep {st.step + 1}: loss is {step_loss}; stopping without applying "
                    "this update (the last checkpoint is intact)"
                )
                return step_loss
            acc.backward(loss)
            if t.max_grad_norm is not None:
                norm = acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                self.grad_norm = float(norm) if norm is not None else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _step_means(self) -> tuple[float, dict[str, float]]:
        """The step's loss and objective statistics: means over its micro-batches, then over
        the processes (one all-reduce)."""
        import torch

        group, self._group = self._group, []
        keys = sorted(group[0].stats)
        rows = [
            torch.stack([g.value.detach().float(), *(g.stats[k].float() for k in keys)])
            for g in group
        ]
        means = self.acc.reduce(torch.stack(rows).mean(0), reduction="mean").tolist()
        return means[0], dict(zip(keys, means[1:], strict=True))

    def _after_step(self, step_loss: float) -> str:
        """Schedule, log, eval, checkpoint and stop after optimizer step; the run's status."""
        st, s, t = self.state, self.sched, self.recipe.train
        self.lr_schedule.step()
        st.step += 1
        st.window.add_step(step_loss, self.step_stats)
        self.bar.update(1)
        step, status = st.step, "completed"
        if step % t.log_every == 0 or step == s.total_steps:
            self._log_train(step)
        if self.evaluate is not None and t.eval_every and step % t.eval_every == 0:
            self.evaluated_at = step
            if self._eval_and_watch(step):
                status = "early_stopped"
        stopping = self.stop.should_stop(self.acc)
        if stopping or (t.save_every and (step % t.save_every == 0 or step == s.total_steps)):
            path = checkpoint.save(self.acc, self.run_dir, step, st.to_json(), t.keep_last)
            self.acc.print(f"\ncheckpoint: {path}")
        if stopping:
            self.metrics.write({"kind": "stop", "step": step, "time": round(time.time(), 3)})
            return "stopped"
        return status

    def _sum(self, value: int) -> int:
        if self.acc.num_processes == 1:
            return value
        import torch

        total = self.acc.reduce(torch.tensor(value, device=self.acc.device), reduction="sum")
        return int(total.item())

    def _log_train(self, step: int) -> None:
        w, st = self.state.window, self.state
        tokens, samples = self._sum(w.tokens), self._sum(w.samples)
        st.tokens += tokens
        st.samples += samples
        epoch, lr = step / self.sched.steps_per_epoch, self.lr_schedule.get_last_lr()[0]
        seconds = time.time() - self.window_start
        rec = report.train_record(step, epoch, w, lr, self.grad_norm, tokens, samples, seconds)
        self._log(rec)
        rate = (
            {"tok_s": f"{rec['tokens_per_s']:.0f}"}
            if tokens
            else {
                "samples_s": f"{rec['samples_per_s']:.1f}"  # images: no tokens
            }
        )
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", **rate)
        w.clear()
        self.window_start = time.time()

    def _log(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)
        if self.recipe.output.report_to:
            values = {
                f"{rec['kind']}/{k}": v
                for k, v in rec.items()
                if isinstance(v, (int, float)) and k not in ("step", "kind")
            }
            self.acc.log(values, step=rec["step"])

    # -- evals, the best model, saving ---------------------------------------------------
    def _eval(self, step: int) -> dict[str, Any]:
        rec = self.evaluate(self.model, step)
        self._log(rec)
        self.acc.print(f"\n[eval] step {step}: {shown(rec)}")
        return rec

    def _eval_and_watch(self, step: int, *, final: bool = False) -> bool:
        """Evaluate; track the best value (and model); True when early stopping says stop."""
        rec = self._eval(step)
        if self.early is None:
            return False
        best, metric = self.state.best, self.early.cfg.metric
        improved, stop = self.early.watch(rec, best, final=final)
        if improved and self.best_model is not None:
            self.best_model.save(step, metric, rec[metric])
        if stop:
            self.acc.print(
                f"early stopping: {metric} has not improved for {self.early.cfg.patience} evals "
                f"(best {best.value:.6g} at step {best.step})"
            )
        return stop

    def _save_model(self, out: Path, extra: dict[str, Any] | None = None) -> None:
        checkpoint.save_model(self.acc, self.model, self.tokenizer, out, extra)

    def _save_final(self) -> dict[str, Any] | None:
        """RUN/model: the best evaluated model when early stopping restores it, else the
        last one. Returns what was restored ({step, metric, value}) or None."""
        out = self.run_dir / "model"
        restored = self.best_model.make_final(out) if self.best_model is not None else None
        if restored is None:
            self._save_model(out)
        return restored

    def _finish(
        self, status: str, train_time: float, throughput: dict[str, float], restored: Any
    ) -> dict[str, Any]:
        b, records = self.built, self.metrics.records
        summary = report.summary(
            records, status=status, recipe=self.recipe, state=self.state, sched=self.sched,
            restored=restored, run_dir=self.run_dir, objective=self.objective.name,
            dropout_overrides=b.dropout_keys, frozen_params=b.frozen,
            wall_time_s=round(time.time() - self.wall_start, 2),
            train_time_s=round(train_time, 2),
            **throughput,  # of this invocation (a resumed run counts what it ran itself)
            parameters=self.n_params, quantization=b.quant, trainable_parameters=self.n_trainable,
            data=self.data.stats, resumed_from=str(self.resume_from) if self.resume_from else None,
            memory_per_rank=distributed.memory_per_rank(self.acc, b.rss_mb),
        )  # fmt: skip
        if self.main:
            report.write_summary(self.run_dir, summary)
            report.plot(self.run_dir, records)
        # every rank leaves together and takes the process group down cleanly (a rank that
        # exits while gloo threads still serve another one aborts in C++)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return summary


def train(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run one training job to the end (or to a stop); return its summary."""
    return Trainer(recipe, resume=resume, overwrite=overwrite).fit()
