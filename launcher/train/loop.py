"""The training loop: one explicit Accelerate loop, readable top to bottom.

recipe -> run-folder decision -> data -> model (+fast dropout, +adapter) -> optimizer ->
[resume, checked against this run] -> run folder written -> for each optimizer step:
accumulate micro-batches, clip, step, log, eval, save; stop on a signal, early stopping
or a non-finite loss -> final model, summary, plot.

A step is one optimizer step. Data order depends only on (seed, epoch), and every
checkpoint stores model, optimizer, scheduler, RNG and the position in the data, so a run
resumed at step k logs the same losses as one that never stopped. Nothing is written to
the run folder until every check (recipe, data rows, model, adapter, resume) has passed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from launcher import compat
from launcher.data.build import Datasets, collate, load_datasets
from launcher.data.cache import load_or_build
from launcher.dist.strategies import STRATEGIES
from launcher.errors import Problem, UserError
from launcher.models.adapters import apply_adapter
from launcher.models.build import (
    build_model,
    check_max_length,
    dropout_settings,
    fit_embeddings,
    load_image_processor,
    load_tokenizer,
    save_model,
)
from launcher.models.quant import describe_quantization
from launcher.recipe.resolve import Schedule, schedule
from launcher.recipe.schema import Recipe, dump, fingerprint
from launcher.train import checkpoint, distributed, report, rundir
from launcher.train.optim import build_optimizer, build_scheduler
from launcher.train.regularize import L2SP, pretrained_parameters
from launcher.train.signals import STOP
from launcher.train.tasks import TASKS, Task, next_token_mask, supports_kept_logits

BEST = "best"  # the best evaluated model so far (early_stopping.restore_best)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXIT_STOPPED = 3  # stopped by a signal after saving a checkpoint: resume with --resume auto


def _check_trackers(names: list[str]) -> None:
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n]) is None]
    if missing:
        raise UserError(
            Problem(
                f"report_to names {', '.join(missing)} but it is not installed",
                key="output.report_to",
                hint=" ".join(f"pip install 'ftl[{n}]'" for n in missing),
            )
        )
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # no key: log locally, `wandb sync` later


def _fresh_accelerator_state() -> None:
    """Forget a previous run's settings when training twice in one process (tests,
    notebooks); the process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset()


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norms are left alone (standard practice)."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def epoch_batches(n: int, micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation that depends only on (seed, epoch)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + micro_batch] for i in range(0, n, micro_batch)]


class Trainer:
    """Holds what one run needs; `fit()` is the loop."""

    def __init__(self, recipe: Recipe, *, resume: str | None = None, overwrite: bool = False):
        self.recipe = recipe
        self.task: Task = TASKS[recipe.task]
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
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        r, t = self.recipe, self.recipe.train
        if not torch.cuda.is_available():
            from launcher.train.host import keep_freed_memory

            keep_freed_memory()
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        _check_trackers(r.output.report_to)
        _fresh_accelerator_state()
        self.strategy = STRATEGIES[r.distributed.strategy]
        self.acc = Accelerator(
            mixed_precision="bf16" if t.precision == "bf16" else "no",
            log_with=r.output.report_to or None,
            project_dir=str(self.run_dir / "trackers"),
            kwargs_handlers=distributed.process_group_kwargs(
                self.strategy, r.distributed.timeout_minutes
            ),
        )
        distributed.check_world(self.acc, self.strategy)
        self.preflight = distributed.preflight(self.acc, fingerprint(r), self.run_dir)
        self.main = self.acc.is_main_process
        self.resume_from = rundir.on_main(
            self.acc, lambda: rundir.find_start(self.run_dir, resume, overwrite)
        )

        images = self.task.modality == "image"
        vlm = self.task.modality == "vision_language"
        # the tokenizer, or for an image model its image processor, or for a vision-language
        # model its processor (each saved with the model)
        if vlm:
            from launcher.models.vlm import check_vision_language, load_processor

            check_vision_language(r.model)
            self.tokenizer = load_processor(r.model)
        elif images:
            self.tokenizer = load_image_processor(r.model)
        else:
            self.tokenizer = load_tokenizer(r.model, needs_eos=self.task.needs_eos)
        self.part = None if r.data.streaming else self._own_shards()
        # from the content-hashed cache when its key matches (text tasks); on a miss the
        # local main process tokenizes and the others wait on the manifest, outside any
        # collective, so a long tokenization never trips the process group's timeout (a
        # rank that reads its own shards builds its own entry)
        if r.data.streaming:  # train streams in _train_loader; evals come from data.eval
            self.data = self._eval_only()
        else:
            self.data = self._load_data(images or vlm)
        # rows per micro-batch: padding-free packing makes each micro-batch one long row
        self.rows_per_batch = t.micro_batch_size
        if r.data.packing and not r.data.streaming:
            from launcher.data.pack import pack

            flat = padding_free(r, self.acc.device.type)
            if flat:
                self.rows_per_batch = 1
            self.data.train, packing = pack(
                self.data.train, r.data.max_length, t.micro_batch_size if flat else 1
            )
            self.data.stats.update(packing, padding_free=flat)
            self.acc.print(
                f"packing: {packing['packed_examples']} examples in {packing['packed_rows']} "
                f"rows of {packing['packed_row_tokens']} tokens "
                f"({packing['packing_efficiency']:.1%} full"
                + (", padding-free: one row per micro-batch)" if flat else ")")
            )
        # as many micro-batches as examples would give (a padding-free row is a whole one)
        n_train = len(self.data.train) * t.micro_batch_size // self.rows_per_batch
        if r.data.streaming:  # one endless pass: max_steps optimizer steps of micro-batches
            from launcher.recipe.resolve import accumulation

            world = self.acc.num_processes
            n_train = t.max_steps * accumulation(t, world) * t.micro_batch_size * world
        elif self.part is not None:  # every rank runs as many micro-batches as the fullest
            from accelerate.utils import gather_object

            self.rank_examples = gather_object([len(self.data.train)])
            self.rank_batches = max(-(-n // self.rows_per_batch) for n in self.rank_examples)
            self.data.stats["examples_by_rank"] = self.rank_examples
            self.data.stats["shards_by_rank"] = gather_object([self._shard_files()])
            n_train = self.rank_batches * t.micro_batch_size * self.acc.num_processes
            self.acc.print(
                f"shards per rank: examples {self.rank_examples}, {self.rank_batches} "
                "micro-batches per process per epoch (the others wrap around)"
            )
        self.sched: Schedule = schedule(t, n_train, self.acc.num_processes)
        self.acc.gradient_accumulation_steps = self.sched.grad_accum
        self.acc.print(f"{self.strategy.name}: {self.sched.accounting()}")
        identity = rundir.run_identity(
            r,
            self.sched,
            sum(self.rank_examples) if self.part is not None else len(self.data.train),
        )

        self.rss_mb = {"before_model": report.rss_now_mb()}  # per phase, in the summary
        self.dropout_keys = dropout_settings(r.model) if r.model.dropout is not None else []
        set_seed(t.seed)  # before the new head is initialised: runs are reproducible
        model, new_params = build_model(
            r.model,
            r.quant,
            self.task,
            self.data.labels,
            getattr(self.tokenizer, "pad_token_id", None),
            strategy=self.strategy,
            precision=t.precision,
        )
        self.rss_mb["after_model"] = report.rss_now_mb()
        if self.task.name != "causal_lm":  # encoders have a fixed position table
            check_max_length(model, r.data.max_length)
        if self.task.label_kind == "target":  # so may the decoder
            check_max_length(model, r.data.max_target_length, "data.max_target_length")
        # causal LMs compute the vocabulary logits only where the next token is a target
        self.kept_logits = self.task.next_token and supports_kept_logits(model)
        self.quant = describe_quantization(model)
        if self.quant:
            self.acc.print(
                "quantized base: " + ", ".join(f"{k} {v}" for k, v in self.quant.items())
            )
        fast_dropout = t.fast_dropout and self.acc.device.type == "cpu"
        if fast_dropout:
            from launcher.models.fast_dropout import enable, fuse_lora_dropout, swap_dropout

            enable(model)
        text_tok = self.tokenizer.tokenizer if vlm else self.tokenizer
        resized = not images and fit_embeddings(model, len(text_tok))  # added tokens
        pretrained = pretrained_parameters(model, new_params) if t.l2sp > 0 else []
        targets, also_save = None, []
        if vlm:
            from launcher.models import vlm as vlm_parts

            self.frozen = vlm_parts.freeze(
                model, vision=r.model.freeze_vision_tower, projector=r.model.freeze_projector
            )
            if r.adapter.enabled and r.adapter.target_modules == "all-linear":
                targets = vlm_parts.lora_targets(model)  # the language model's layers
            if r.adapter.enabled and not r.model.freeze_projector:
                also_save = vlm_parts.projector_modules(model)
        model = apply_adapter(
            model,
            r.adapter,
            self.task,
            quantized=r.quant.bits is not None,
            resized_embeddings=resized,
            target_modules=targets,
            also_save=also_save,
        )
        if fast_dropout:
            swap_dropout(model)  # the adapter's own dropouts (lora_dropout), new since enable()
            # ZeRO-3 / FSDP gather weights themselves; no adapter, no PEFT import
            if not self.strategy.shards_params and r.adapter.enabled:
                from launcher.models.fused_lora import fuse_lora

                fuse_lora(model)  # one pass less per LoRA linear each way, dropout inside
                fuse_lora_dropout(model)  # the rest (QLoRA): no float copies for backward
        self.l2sp = L2SP(pretrained, t.l2sp) if t.l2sp > 0 else None
        self.n_params = sum(distributed.numel(p) for p in model.parameters())
        self.n_trainable = sum(distributed.numel(p) for p in model.parameters() if p.requires_grad)
        distributed.size_zero3_windows(self.acc, self.n_params)
        distributed.fill_hidden_size_autos(self.acc, model)
        groups = _param_groups(model, t.weight_decay)
        if distributed.deepspeed_builds_optimizer(self.acc):
            # the DeepSpeed config names the optimizer (ZeRO-Offload: DeepSpeedCPUAdam);
            # its hyper-parameters were filled from this recipe by the launch plan
            from accelerate.utils import DummyOptim

            optimizer = DummyOptim(groups, lr=t.lr, weight_decay=t.weight_decay)
        else:
            optimizer = build_optimizer(
                t.optimizer, groups, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, eps=t.eps
            )
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.rss_mb["after_prepare"] = report.rss_now_mb()
        self.rss_mb["peak_until_prepare"] = report.peak_memory_mb()["peak_rss_mb"]
        # stepped once per optimizer step by the loop (accelerate's wrapper would step it
        # once per process) and checkpointed alongside the model; built on the optimizer
        # that really updates the weights (DeepSpeed's, when it built its own)
        self.lr_schedule = build_scheduler(
            t.scheduler,
            distributed.torch_optimizer(self.optimizer),
            self.sched.warmup_steps,
            self.sched.total_steps,
        )
        self.acc.register_for_checkpointing(self.lr_schedule)
        self.state: dict[str, Any] = {
            "step": 0,
            "tokens": 0,
            "samples": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "window_loss": 0.0,
            "window_steps": 0,
            "window_tokens": 0,
            "window_samples": 0,
            "run": identity,
        }
        if self.resume_from is not None:
            saved = json.loads((self.resume_from / checkpoint.STATE).read_text())
            rundir.check_resume(saved.get("run", {}), identity, self.resume_from)
            self.state = checkpoint.load(self.acc, self.resume_from)
            self.acc.print(f"resumed from {self.resume_from} at step {self.state['step']}")
            self._check_best_on_resume()

        # -- every check passed: now the run folder may change -------------------------------
        resumed_here = (
            self.resume_from is not None
            and self.resume_from.parent.parent.resolve() == (self.run_dir.resolve())
        )
        if self.main:
            rundir.prepare(
                self.run_dir,
                r,
                clear=self.resume_from is None and rundir.holds_run(self.run_dir),
                resumed_at=self.state["step"] if resumed_here else None,
            )
            distributed.write_record(
                self.run_dir, self.acc, self.strategy, self.sched, self.model, self.preflight
            )
        self.acc.wait_for_everyone()
        self.metrics = report.MetricsLog(
            self.run_dir, self.main, self.state["step"] if self.resume_from else None
        )
        self.metrics.write(self._start_record())
        self.eval_loader = self._eval_loader() if self.data.eval else None
        if r.output.report_to:
            trackers = self.run_dir / "trackers"
            if self.main:
                trackers.mkdir(exist_ok=True)
            self.acc.init_trackers(
                r.output.run_name or self.run_dir.name,
                config=_flat(dump(r)),
                init_kwargs={"wandb": {"dir": str(trackers)}},  # offline files stay in the run
            )

    def _start_record(self) -> dict[str, Any]:
        """One line per start of the run (first start, resume, SLURM requeue) in metrics."""
        env = os.environ
        return {
            "kind": "start",
            "step": self.state["step"],
            "total_steps": self.sched.total_steps,
            "time": round(time.time(), 3),
            "world_size": self.acc.num_processes,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "slurm_job_id": env.get("SLURM_JOB_ID"),
            "restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        }

    # -- data ----------------------------------------------------------------------------
    def _collate(
        self, batch: list[dict[str, Any]], *, train: bool = False, epoch: int = 0
    ) -> dict[str, Any]:
        if "images" in batch[0]:
            from launcher.data.vlm import collate_vision_chat

            return collate_vision_chat(batch, self.tokenizer)
        if "image" in batch[0]:
            from launcher.data.images import collate_images

            aug = self.recipe.data.augment
            return collate_images(
                batch,
                self.tokenizer,
                train=train,
                seed=self.recipe.train.seed,
                epoch=epoch,
                crop_scale=aug.crop_scale,
                hflip=aug.hflip,
            )
        if "position_ids" in batch[0]:
            from launcher.data.pack import collate_packed

            return collate_packed(batch, self.tokenizer.pad_token_id)
        return collate(batch, self.tokenizer.pad_token_id, label_kind=self.task.label_kind)

    def _load_data(self, images: bool) -> Datasets:
        r = self.recipe
        return load_or_build(
            r.data,
            self.tokenizer,
            label_kind=self.task.label_kind,
            images=images,
            is_main=self.acc.is_local_main_process or self.part is not None,
            timeout_s=r.distributed.timeout_minutes * 60,
            log=self.acc.print,
            part=self.part,
        )

    def _eval_only(self) -> Datasets:
        """Streaming: the eval file tokenized up front (the training data streams)."""
        d = self.recipe.data
        stats = {"streaming": True, "train_examples": None}
        if d.eval is None:
            return Datasets(train=[], eval=[], labels=None, stats=stats)
        cfg = d.model_copy(update={"train": d.eval, "eval": None, "streaming": False})
        held = load_datasets(cfg, self.tokenizer, label_kind=self.task.label_kind)
        stats["eval_examples"] = len(held.train)
        return Datasets(train=[], eval=held.train, labels=None, stats=stats)

    def _stream_loader(self, skip_per_process: int) -> Any:
        """This rank's packed stream, collated, on the device; not an accelerate loader
        (each rank streams its own share; accumulation counts micro-batches)."""
        from launcher.data.build import format_context
        from launcher.data.stream import PackedStream

        t = self.recipe.train
        self.stream = PackedStream(
            self.recipe.data,
            format_context(self.recipe.data, self.tokenizer),
            rank=self.acc.process_index,
            world=self.acc.num_processes,
            seed=t.seed,
            micro_batch=t.micro_batch_size,
            pad_id=self.tokenizer.pad_token_id,
            skip=skip_per_process,
            padding_free=padding_free(self.recipe, self.acc.device.type),
        )
        device = self.acc.device
        return (
            {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in self.stream
        )

    def _stream_stats(self) -> dict[str, Any]:
        stream = getattr(self, "stream", None)
        if stream is None:
            return {}
        return {
            **stream.stats,
            "truncated": stream.ctx.stats["truncated"],
            "packed_row_tokens": stream.capacity,
        }

    def _own_shards(self) -> tuple[int, int] | None:
        """(rank, world) when each rank reads only its own shards of data.train."""
        from launcher.data.read import reads_own_shards

        world = self.acc.num_processes
        if reads_own_shards(self.recipe.data, world, self.task.uses_labels):
            return (self.acc.process_index, world)
        return None

    def _shard_files(self) -> list[str]:
        from launcher.assets import resolve_path
        from launcher.data.read import own_shards

        folder = resolve_path(self.recipe.data.train, base=Path.cwd())
        shards = json.loads((folder / "manifest.json").read_text())["shards"]
        return [s["file"] for s in own_shards(shards, self.part, "data.train")]

    def _train_loader(self, epoch: int, skip_per_process: int) -> Any:
        import torch
        from torch.utils.data import DataLoader

        t = self.recipe.train
        if self.recipe.data.streaming:
            return self._stream_loader(skip_per_process)
        if self.part is None:
            batches = epoch_batches(len(self.data.train), self.rows_per_batch, t.seed, epoch)
        else:
            # this rank's own examples, in an order of its own, wrapped around to the common
            # number of micro-batches; each is listed once per process because accelerate
            # hands process r every world-th batch of the sampler
            rank, world = self.part
            own = epoch_batches(
                len(self.data.train), self.rows_per_batch, t.seed + 7919 * rank, epoch
            )
            own = [own[i % len(own)] for i in range(self.rank_batches)]
            batches = [b for b in own for _ in range(world)]
        # A generator of its own: a DataLoader draws its base seed from the global RNG
        # otherwise, which would shift dropout masks after a resume.
        dl = DataLoader(
            self.data.train,
            batch_sampler=batches[skip_per_process * self.acc.num_processes :],
            collate_fn=functools.partial(self._collate, train=True, epoch=epoch),
            generator=torch.Generator(),
        )
        return self.acc.prepare_data_loader(dl)

    def _eval_loader(self) -> Any:
        import torch
        from torch.utils.data import DataLoader

        ev = self.data.eval
        longest_first = sorted(ev, key=lambda e: -len(e.get("input_ids", ())))  # less padding
        dl = DataLoader(
            longest_first,
            batch_size=self.recipe.train.eval_batch_size or self.recipe.train.micro_batch_size,
            shuffle=False,
            collate_fn=self._collate,
            generator=torch.Generator(),
        )
        return self.acc.prepare_data_loader(dl)

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        import torch

        t, s, st = self.recipe.train, self.sched, self.state
        stop = self.stop
        bar = report.progress(s.total_steps, st["step"], self.main)
        status, grad_norm = "completed", None
        window_start = time.time()
        train_start, tokens0, samples0 = time.time(), st["tokens"], st["samples"]
        evaluated_at = -1
        if t.eval_at_start and self.eval_loader is not None and st["step"] == 0:
            self._evaluate(0)
        self.model.train()
        try:
            while st["step"] < s.total_steps and status == "completed":
                epoch = st["step"] // s.steps_per_epoch
                skip = (st["step"] - epoch * s.steps_per_epoch) * s.grad_accum
                group_loss, group_n = torch.zeros((), device=self.acc.device), 0
                for batch in self._train_loader(epoch, skip):
                    tokens, samples = _counts(batch)
                    with self.acc.accumulate(self.model):
                        task_loss = self._forward_loss(batch)
                        loss = task_loss if self.l2sp is None else task_loss + self.l2sp.penalty()
                        group_loss += task_loss.detach()
                        group_n += 1
                        st["window_tokens"] += tokens
                        st["window_samples"] += samples
                        if self.acc.sync_gradients:
                            # checked before the last backward: DeepSpeed applies the update
                            # inside it, and a non-finite step must never reach the weights
                            step_loss = self.acc.reduce(
                                group_loss / group_n, reduction="mean"
                            ).item()
                            if not math.isfinite(step_loss):
                                status = "diverged"
                                self.acc.print(
                                    f"\nstep {st['step'] + 1}: loss is {step_loss}; stopping "
                                    "without applying this update (the last checkpoint is intact)"
                                )
                                break
                        self.acc.backward(loss)
                        if not self.acc.sync_gradients:
                            continue
                        if t.max_grad_norm is not None:
                            norm = self.acc.clip_grad_norm_(
                                self.model.parameters(), t.max_grad_norm
                            )
                            grad_norm = float(norm) if norm is not None else None
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.lr_schedule.step()
                    st["step"] += 1
                    group_loss, group_n = torch.zeros((), device=self.acc.device), 0
                    st["window_loss"] += step_loss
                    st["window_steps"] += 1
                    bar.update(1)
                    step = st["step"]

                    if step % t.log_every == 0 or step == s.total_steps:
                        self._log_train(step, grad_norm, time.time() - window_start, bar)
                        window_start = time.time()
                    if self.eval_loader is not None and t.eval_every and step % t.eval_every == 0:
                        evaluated_at = step
                        if self._evaluate_and_watch(step):
                            status = "early_stopped"
                    stopping = stop.should_stop(self.acc)
                    if stopping or (
                        t.save_every and (step % t.save_every == 0 or step == s.total_steps)
                    ):
                        self._save_checkpoint()
                    if stopping:
                        status = "stopped"
                        self.metrics.write(
                            {"kind": "stop", "step": step, "time": round(time.time(), 3)}
                        )
                    if status != "completed" or step >= s.total_steps:
                        break
        finally:
            stop.uninstall()
            bar.close()
        train_time = time.time() - train_start
        # count what ran since the last log line (a stop or divergence mid-window)
        st["tokens"] += self._sum(st["window_tokens"])
        st["samples"] += self._sum(st["window_samples"])
        st["window_tokens"] = st["window_samples"] = 0
        throughput = {
            "tokens_per_s": round((st["tokens"] - tokens0) / train_time, 1),
            "samples_per_s": round((st["samples"] - samples0) / train_time, 2),
        }
        finished = status in ("completed", "early_stopped")
        if self.eval_loader is not None and finished and evaluated_at != st["step"]:
            self._evaluate_and_watch(st["step"], final=True)
        restored = None
        if finished and self.recipe.output.save_model:
            restored = self._save_final()
        return self._finish(status, train_time, throughput, restored)

    def _forward_loss(self, batch: dict[str, Any]) -> Any:
        """The training loss of one micro-batch (the mean over its targets)."""
        smoothing = self.recipe.train.label_smoothing
        if self.kept_logits:
            keep = next_token_mask(batch["labels"])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = self.model(**inputs, logits_to_keep=keep)
            return self.task.smoothed_loss(out, batch, smoothing, keep=keep)
        out = self.model(**batch)
        return self.task.smoothed_loss(out, batch, smoothing) if smoothing > 0 else out.loss

    def _sum(self, value: int) -> int:
        if self.acc.num_processes == 1:
            return value
        import torch

        return int(
            self.acc.reduce(torch.tensor(value, device=self.acc.device), reduction="sum").item()
        )

    def _log_train(self, step: int, grad_norm: float | None, seconds: float, bar: Any) -> None:
        st = self.state
        tokens, samples = self._sum(st["window_tokens"]), self._sum(st["window_samples"])
        st["tokens"] += tokens
        st["samples"] += samples
        dt = max(seconds, 1e-9)
        rec = {
            "kind": "train",
            "step": step,
            "epoch": round(step / self.sched.steps_per_epoch, 4),
            "loss": st["window_loss"] / st["window_steps"],
            "lr": self.lr_schedule.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
            "samples_per_s": samples / dt,
            # what the rates are made of (a packed step holds many examples per row)
            "tokens": tokens,
            "samples": samples,
            "seconds": round(dt, 4),
        }
        self._log(rec)
        if tokens:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        else:  # images
            bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_s=f"{rec['samples_per_s']:.1f}")
        st.update(window_loss=0.0, window_steps=0, window_tokens=0, window_samples=0)

    def _log(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)
        if self.recipe.output.report_to:
            values = {
                f"{rec['kind']}/{k}": v
                for k, v in rec.items()
                if isinstance(v, (int, float)) and k not in ("step", "kind")
            }
            self.acc.log(values, step=rec["step"])

    # -- eval ----------------------------------------------------------------------------
    def _evaluate(self, step: int) -> dict[str, Any]:
        import torch

        from launcher.train.tasks import EvalContext

        self.model.eval()
        sums, counts, preds, labels = [], [], [], []
        started = time.time()
        # no inference tensors under DeepSpeed: ZeRO-3 would keep some for the next backward
        deepspeed = self.strategy.kind == "deepspeed"
        with torch.no_grad() if deepspeed else torch.inference_mode():
            for batch in self.eval_loader:
                inputs = {k: v for k, v in batch.items() if k != "labels" or self.task.feeds_labels}
                if self.kept_logits:
                    keep = next_token_mask(batch["labels"])
                    out = self.model(**inputs, logits_to_keep=keep)
                    loss_sum, count, pred = self.task.eval_batch(out, batch, keep=keep)
                else:
                    loss_sum, count, pred = self.task.eval_batch(self.model(**inputs), batch)
                if self.task.generates:
                    pred = self._generate(batch)
                # gather_for_metrics drops the samples repeated to even out the last batch
                sums.append(self.acc.gather_for_metrics(loss_sum.double()).cpu())
                counts.append(self.acc.gather_for_metrics(count.double()).cpu())
                if pred is not None:
                    preds.append(self._gather(pred))
                    labels.append(self._gather(batch["labels"]))
        loss = float(torch.cat(sums).sum() / torch.cat(counts).sum())
        rec: dict[str, Any] = {"kind": "eval", "step": step, "eval_loss": loss}
        ctx = EvalContext(tokenizer=self.tokenizer, label_names=self.data.labels)
        rec.update(self.task.eval_metrics(preds, labels, loss, ctx))
        rec["eval_seconds"] = round(time.time() - started, 3)
        compat.assert_4bit_weights_as_trained(self.model)
        self.model.train()
        self._log(rec)
        shown = ", ".join(
            f"{k}={v:.4f}" for k, v in rec.items() if k not in ("kind", "step", "eval_seconds")
        )
        self.acc.print(f"\n[eval] step {step}: {shown}")
        return rec

    def _gather(self, x: Any) -> Any:
        """Gather one eval batch from every process; rows of tokens differ in length across
        processes, so they are padded (with -100, which metrics skip) first."""
        if x.ndim == 2 and self.acc.num_processes > 1:
            x = self.acc.pad_across_processes(x, dim=1, pad_index=-100)
        return self.acc.gather_for_metrics(x).cpu()

    def _generate(self, batch: dict[str, Any]) -> Any:
        """Generated target ids for BLEU and chrF; padding after EOS reads as -100."""
        g = self.recipe.train.generation
        model = self.acc.unwrap_model(self.model)
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=g.max_new_tokens or self.recipe.data.max_target_length,
            num_beams=g.num_beams,
            do_sample=False,
            # every rank runs the same number of forwards while ZeRO-3/FSDP gather weights
            synced_gpus=self.strategy.shards_params and self.acc.num_processes > 1,
        )
        pad = self.tokenizer.pad_token_id
        return out.masked_fill(out == pad, -100) if pad is not None else out

    def _last_eval(self) -> dict[str, Any] | None:
        evals = [r for r in self.metrics.records if r.get("kind") == "eval"]
        return evals[-1] if evals else None

    def _evaluate_and_watch(self, step: int, *, final: bool = False) -> bool:
        """Evaluate; track the best value (and model); True when early stopping says stop."""
        rec = self._evaluate(step)
        es = self.recipe.train.early_stopping
        if es is None:
            return False
        value = rec[es.metric]
        lower_is_better = es.mode == "min" or (
            es.mode == "auto" and es.metric in self.task.lower_is_better
        )
        best = self.state["best"]
        if best is None:
            better = True
        elif lower_is_better:
            better = value < best - es.min_delta
        else:
            better = value > best + es.min_delta
        if better:
            self.state.update(best=value, best_step=step, bad_evals=0)
            if self._keeps_best():
                self._save_best(step, es.metric, value)
        else:
            self.state["bad_evals"] += 1
        if not final and self.state["bad_evals"] >= es.patience:
            self.acc.print(
                f"early stopping: {es.metric} has not improved for {es.patience} evals "
                f"(best {self.state['best']:.6g} at step {self.state['best_step']})"
            )
            return True
        return False

    def _keeps_best(self) -> bool:
        es = self.recipe.train.early_stopping
        return es is not None and es.restore_best and self.recipe.output.save_model

    def _save_best(self, step: int, metric: str, value: float) -> None:
        """Write the model as RUN/best (whole or not at all: a temp folder, then renames)."""
        tmp, best = self.run_dir / ".best-tmp", self.run_dir / BEST
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self._save_model(tmp)
        if self.main:
            info = {"step": step, "metric": metric, "value": value}
            (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
            old = self.run_dir / ".best-old"
            if best.exists():
                best.rename(old)
            tmp.rename(best)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _check_best_on_resume(self) -> None:
        """The best model saved before the checkpoint must still be RUN/best: a later best of
        an abandoned timeline may have replaced it. Then the tracking starts over."""
        step = self.state.get("best_step")
        if not self._keeps_best() or step is None:
            return
        info = self.run_dir / BEST / "best.json"
        saved = json.loads(info.read_text()).get("step") if info.is_file() else None
        if saved != step:
            self.acc.print(
                f"note: the best model of step {step} is no longer in {self.run_dir / BEST}; "
                "best-model tracking starts over from the next eval"
            )
            self.state.update(best=None, best_step=None, bad_evals=0)

    # -- saving --------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        path = checkpoint.save(
            self.acc, self.run_dir, self.state["step"], self.state, self.recipe.train.keep_last
        )
        self.acc.print(f"\ncheckpoint: {path}")

    def _save_model(self, out: Path) -> None:
        model, state_dict = self.acc.unwrap_model(self.model), self.acc.get_state_dict(self.model)
        save_model(
            model,
            self.tokenizer,
            out,
            is_main=self.main,
            save_fn=self.acc.save,
            state_dict=state_dict,
        )
        self.acc.wait_for_everyone()

    def _save_final(self) -> dict[str, Any] | None:
        """RUN/model: the best evaluated model when early stopping restores it, else the
        last one. Returns what was restored ({step, metric, value}) or None."""
        out, best = self.run_dir / "model", self.run_dir / BEST
        restored = None
        if self._keeps_best() and (best / "best.json").is_file():
            restored = json.loads((best / "best.json").read_text())
        if restored is None:
            self._save_model(out)
            return None
        if self.main:
            shutil.rmtree(out, ignore_errors=True)
            (best / "best.json").unlink()
            best.rename(out)
            self.acc.print(
                f"model/: the best model, step {restored['step']} "
                f"({restored['metric']} {restored['value']:.6g})"
            )
        self.acc.wait_for_everyone()
        return restored

    def _finish(
        self,
        status: str,
        train_time: float,
        throughput: dict[str, float],
        restored: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        records = self.metrics.records
        train_recs = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        # final_eval describes the saved model: the restored best one, or the last
        final = self._last_eval()
        if restored is not None:
            final = next((r for r in evals if r["step"] == restored["step"]), final)
        summary = {
            "status": status,
            "task": self.recipe.task,
            "steps": self.state["step"],
            "total_steps": self.sched.total_steps,
            "epochs": round(self.state["step"] / self.sched.steps_per_epoch, 4),
            "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
            "final_eval": {k: v for k, v in (final or {}).items() if k != "kind"} or None,
            "last_eval": {k: v for k, v in (self._last_eval() or {}).items() if k != "kind"}
            or None,
            "best": (
                {
                    "metric": self.recipe.train.early_stopping.metric,
                    "value": self.state["best"],
                    "step": self.state["best_step"],
                    "model_is_best": restored is not None,
                }
                if self.recipe.train.early_stopping is not None
                else None
            ),
            "dropout_overrides": self.dropout_keys,
            "frozen_params": getattr(self, "frozen", None),
            "wall_time_s": round(time.time() - self.wall_start, 2),
            "train_time_s": round(train_time, 2),
            "tokens_seen": self.state["tokens"],
            "samples_seen": self.state["samples"],
            **throughput,  # of this invocation (a resumed run counts what it ran itself)
            "parameters": self.n_params,
            "quantization": self.quant,
            "trainable_parameters": self.n_trainable,
            "schedule": self.sched.as_dict(),
            "data": {**self.data.stats, **self._stream_stats()},
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "starts": sum(1 for r in records if r.get("kind") == "start"),
            "restarts": max(
                (r.get("restart", 0) for r in records if r.get("kind") == "start"), default=0
            ),
            "model_dir": str(self.run_dir / "model") if (self.run_dir / "model").exists() else None,
            **report.peak_memory_mb(),
            "memory_per_rank": distributed.memory_per_rank(self.acc, self.rss_mb),
        }
        if self.main:
            report.write_summary(self.run_dir, summary)
            report.plot(self.run_dir, records)
        # every rank leaves together and takes the process group down cleanly (a rank that
        # exits while gloo threads still serve another one aborts in C++)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return summary


def _counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, examples) of a micro-batch; packed batches bring their own counts,
    which leave the batch here (the model must not see them)."""
    if "_tokens" in batch:
        return int(batch.pop("_tokens")), int(batch.pop("_samples"))
    if "input_ids" not in batch:  # image classification
        return 0, batch["pixel_values"].shape[0]
    return int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]


def padding_free(recipe: Recipe, device: str) -> bool:
    """Whether packed micro-batches are one row each (data.padding_free, or where attention
    runs per segment: ftl's CPU backend, flash attention's varlen path). Under attention
    that masks a whole row instead, one row of 4 x 512 tokens costs 4x the attention of
    4 rows of 512, so rows of max_length stay the default there."""
    if recipe.data.padding_free is not None:
        return recipe.data.padding_free
    attn = recipe.model.attn_implementation
    if device == "cpu":
        return recipe.train.fast_dropout and attn in (None, "sdpa")
    return attn is not None and attn.startswith("flash")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def train(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run one training job to the end (or to a stop); return its summary."""
    return Trainer(recipe, resume=resume, overwrite=overwrite).fit()
