"""The LoRA training loop, written out on plain torch so that each step can be checked against a
transformers + peft reference.

One optimiser step takes a global batch of --batch-size examples, the same examples whatever the
number of processes: they are cut into micro-batches of --micro-batch-size, spread over the processes
(torchrun: DistributedDataParallel, gloo on CPU, nccl on GPU) and accumulated. The loss of a step is
the cross-entropy summed over every scored token of the global batch divided by their count, so
splitting the batch differently (processes, micro-batches) gives the same gradient up to rounding.

Data order: the held-out split and each epoch's order are fixed by --seed, so a resumed run sees the
examples an uninterrupted one would. Learning-rate schedules are those of transformers'
get_{linear,cosine,constant}_schedule_with_warmup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..arch import for_hf_config
from ..convert.lora import TOKENIZER_FILES
from ..errors import PyllmError, library_errors
from ..model_cache import partial_dir, remove_own_partials, remove_stale_partials
from .data import DataError, Example, load_records, tokenize_record

STATE_FILE = "training_state.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# arguments a resumed run must share with the run it continues
RESUME_KEYS = ("method", "virtual_tokens", "prompt_init_text", "encoder", "encoder_hidden_size", "prefix_projection",
               "data", "template", "train_on_inputs", "cutoff_len", "tokenizer", "lora_r", "lora_alpha", "rslora",
               "target_modules", "layers", "modules_to_save", "batch_size", "lr", "lr_scheduler", "warmup_steps",
               "weight_decay", "max_grad_norm", "seed", "val_set_size", "total_steps", "data_sha256", "base",
               "base_config_sha256")
# ... except these, which a resumed run may raise: more steps extend the run
EXTENDABLE_KEYS = ("total_steps",)


@dataclass
class TrainResult:
    output: str
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of each optimiser step run here
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    # training losses of the steps before this run (restored from the checkpoint resumed), and the step
    # after which the first of them was taken: train_log.json lists them and `losses` from there
    earlier_losses: list[float] = field(default_factory=list)
    first_step: int = 0


@dataclass
class Processes:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device: str) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):  # torch's message listed its 20 device types, naming no flag
            raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
        # (cuda on a machine without one was "module 'torch._C' has no attribute '_cuda_setDevice'")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch sees no CUDA device (torch {torch.__version__}, built "
                             f"{'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'})")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {device}: pyllm train runs on cpu or cuda")
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
            torch.cuda.set_device(dev)
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, dev)

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def on_rank0(self, what: str, work) -> None:
        """Runs work() on process 0 only, and returns in every process once it is done. When it fails,
        process 0 raises its error and the others a RuntimeError saying so: they waited at a barrier
        for ever when process 0's save failed (a full disk)."""
        error = None
        if self.rank == 0:
            try:
                work()
            except BaseException as e:  # raised below, once every process knows
                error = e
        failed = self.gather(None if error is None else f"{type(error).__name__}: {error}")[0]
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"process 0 failed to {what}: {failed}")

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


MAX_LORA_SCALING = 2.0 ** 64  # |alpha / r|: past it a LoRA update's gradients (squared by AdamW) overflow float32


def check_options(args) -> None:
    """Refuses numeric options outside what a training can use (ValueError naming the option), before
    any data or model is read: NaN, an infinity or a value out of range used to train a step it was not
    asked for (--epochs 0, --max-steps 0 ran the epochs' steps), write an adapter nothing trained
    (--max-steps -3), a NaN one (--lora-alpha nan), one whose update is scaled by 0 (--lora-alpha 0:
    every LoRA gradient is 0, nothing is learned; a negative alpha trains, as in PEFT, and merges), or
    fail later with a library's bare message (--epochs nan: "cannot convert float NaN to integer")."""
    from ..adapters import MAX_VIRTUAL_TOKENS

    def number(flag: str, value, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = True, what: str = "") -> None:
        if value is None:
            return
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            raise ValueError(f"{flag} must be {what}, not {value!r}")

    number("--epochs", args.epochs, 0, low_open=True, what="a positive number")
    number("--max-steps", args.max_steps, 1, what="at least 1")
    float32_max = float(np.finfo(np.float32).max)  # AdamW steps in float32: 1e39 was torch's bare "overflow"
    number("--lr", args.lr, 0, float32_max, low_open=True, what="a positive number a float32 holds")
    number("--lora-r", args.lora_r, 1, what="at least 1")
    number("--lora-alpha", args.lora_alpha, -math.inf, low_open=True, what="a finite number other than 0")
    if args.lora_alpha == 0:
        raise ValueError(f"--lora-alpha must be a finite number other than 0 (the adapter's update is "
                         f"scaled by alpha / r: 0 trains nothing), not {args.lora_alpha!r}")
    if args.lora_r >= 1 and abs(args.lora_alpha) / (math.sqrt(args.lora_r) if args.rslora else args.lora_r) > MAX_LORA_SCALING:
        # (alpha 1e38: the gradients overflowed float32, every step was skipped and an adapter of zeros was
        # written as "trained")
        divisor = "sqrt(r)" if args.rslora else "r"
        raise ValueError(f"--lora-alpha must be at most {MAX_LORA_SCALING:g} x {divisor} in size (the update's scale, "
                         f"alpha / {divisor}), not {args.lora_alpha!r} with r {args.lora_r}: its gradients overflow "
                         "float32 (alpha is usually r to 4 r)")
    number("--lora-dropout", args.lora_dropout, 0, 1, what="at least 0 and below 1")
    number("--weight-decay", args.weight_decay, 0, what="a finite number, at least 0")
    number("--max-grad-norm", args.max_grad_norm, 0, what="a finite number, at least 0 (0 = off)")
    number("--warmup-steps", args.warmup_steps, 0, what="at least 0")
    number("--val-set-size", args.val_set_size, 0, what="a count or a fraction, at least 0")
    number("--eval-steps", args.eval_steps, 0, what="at least 0 (0 = at the start and the end)")
    number("--save-steps", args.save_steps, 0, what="at least 0 (0 = no checkpoints)")
    number("--save-total-limit", getattr(args, "save_total_limit", 0), 0, what="at least 0 (0 = keep all)")
    number("--seed", args.seed, 0, 2 ** 32, what="from 0 to 2**32 - 1 (numpy's seeds)")
    method = getattr(args, "method", "lora")
    for flag, given, wanted in (("--prompt-init-text", getattr(args, "prompt_init_text", ""), "prompt"),
                                ("--prefix-projection", getattr(args, "prefix_projection", False), "prefix"),
                                ("--encoder lstm", getattr(args, "encoder", "mlp") == "lstm", "ptuning"),
                                ("--target-modules", args.target_modules.strip(), "lora"),
                                ("--layers", args.layers.strip(), "lora"), ("--rslora", args.rslora, "lora")):
        if given and method != wanted:  # it was ignored: a run other than the one asked for
            raise ValueError(f"{flag} applies to --method {wanted}, not --method {method}")
    from . import build_parser

    defaults = build_parser()
    projected = method == "ptuning" or (method == "prefix" and getattr(args, "prefix_projection", False))
    # numbers away from the parser's defaults that the method reads not: ignored in silence too
    for flag, dest, applies, wanted in (
            ("-r/--lora-r", "lora_r", method == "lora", "lora"),
            ("--lora-alpha", "lora_alpha", method == "lora", "lora"),
            ("--lora-dropout", "lora_dropout", method == "lora", "lora"),
            ("--virtual-tokens", "virtual_tokens", method != "lora", "prompt, ptuning or prefix"),
            ("--encoder-hidden-size", "encoder_hidden_size", projected, "ptuning, or prefix with --prefix-projection")):
        given = getattr(args, dest, defaults.get_default(dest)) != defaults.get_default(dest)
        if given and not applies:
            raise ValueError(f"{flag} applies to --method {wanted}, not --method {method}"
                             + (" without --prefix-projection" if method == "prefix" and "prefix" in wanted else ""))
    if getattr(args, "save_total_limit", 0) and not args.save_steps:  # it would be ignored
        raise ValueError(f"--save-total-limit {args.save_total_limit} limits the checkpoints --save-steps N "
                         "makes; give --save-steps")
    if args.eval_steps and not args.val_set_size:  # HF Trainer refuses eval steps without an eval set too
        raise ValueError(f"--eval-steps {args.eval_steps} needs held-out examples to take the eval loss on; "
                         "give --val-set-size (a count, or a fraction below 1)")
    if args.target_modules.strip() and not [m for m in args.target_modules.split(",") if m.strip()]:
        raise ValueError(f"--target-modules {args.target_modules!r} names no module; leave it out for the family's "
                         "default")
    if method != "lora":
        number("--virtual-tokens", args.virtual_tokens, 1, MAX_VIRTUAL_TOKENS, high_open=False,
               what=f"from 1 to {MAX_VIRTUAL_TOKENS} (what pyllm runs)")
        from ..formats.packed import SIZE_LIMITS

        most = SIZE_LIMITS["intermediate_size"]  # (1e9 was torch's "tried to allocate 256000000000 bytes")
        number("--encoder-hidden-size", args.encoder_hidden_size, 1, most, high_open=False,
               what=f"from 1 to {most} (formats.packed.SIZE_LIMITS intermediate_size)")


def check_output(output: str) -> None:
    """The output must be new, an empty directory, or one a pyllm train wrote (its adapter with
    train_log.json, or checkpoint-N inside; not a checkpoint itself, nor another tool's adapter): the adapter's files (README.md, adapter_config.json, ...) replaced what was
    there, so `-o .` overwrote a project's README.md and `-o BASE_DIR` mixed an adapter into the base
    model; an existing file was a bare "[Errno 17] File exists" after the whole training. What a run
    stopped while saving leaves (a ".adapter.partial" or "checkpoint-N.partial" directory, or the new
    adapter's files before its adapter_config.json: _save_adapter writes that last) is a pyllm train
    output too: such a directory was refused, so the run could not be started again."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"-o {output} is a file, not a directory; give a new directory for the adapter")
    if os.path.isdir(output):
        names = sorted(os.listdir(output))
        # (a run killed while it saved leaves a partial directory, or the adapter's files without its
        # config: ours, so it may run again)
        ours = [n for n in names if n in ADAPTER_FILES or re.fullmatch(r"checkpoint-\d+", n)
                or re.fullmatch(r"(checkpoint-\d+|\.adapter)(\.\d+\.[^./]+)?\.partial", n)]
        if names and not ours:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(f"-o {output} holds other files ({shown}) that the adapter's (README.md, "
                             "adapter_config.json, ...) would overwrite or mix with; give a new or empty directory, "
                             "or the output of an earlier pyllm train")
        if STATE_FILE in names:  # a checkpoint: its state beside another run's adapter made --resume mix the two
            raise ValueError(f"-o {output} is a checkpoint of a run ({STATE_FILE}); give that run's directory "
                             "with --resume to continue it, or a new directory")
        if any(n in ADAPTER_FILES for n in names) and "train_log.json" not in names and \
                not any(n.startswith(("checkpoint-", ".adapter")) for n in names):
            # another tool's adapter: its weights, model card and tokenizer files were replaced or deleted
            raise ValueError(f"-o {output} holds an adapter that pyllm train did not write (no train_log.json); "
                             "its files would be replaced: give a new or empty directory")


def make_output(output: str) -> str | None:
    """Creates the output directory and writes a file there, once the data has been read: an output
    below a file (`-o notes.txt/adapter`) or where nothing can be written failed when the adapter or
    the first checkpoint was saved, after the whole training. OSError naming -o otherwise. Returns the
    first directory it created (None: output was there), for remove_output to take away again."""
    import tempfile

    created, top = None, os.path.abspath(output)
    while not os.path.lexists(top):
        created, top = top, os.path.dirname(top)
    try:
        os.makedirs(output, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output, prefix=".write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        remove_output(output, created)
        raise OSError(f"-o {output}: the adapter cannot be written there ({e.strerror or e})") from None
    return created


def remove_output(output: str, created: str | None) -> None:
    """Removes this process's partial directories in output (a signal between their creation and the
    `try` that removes them on failure left an empty ".adapter.PID.XXXX.partial") and the directories
    make_output created, when a failed run left them empty (a run that fails leaves no output behind;
    a checkpoint kept to --resume from stays, and its directory)."""
    remove_own_partials(output)
    if created is None:
        return
    path = os.path.abspath(output)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == created:
            return
        path = os.path.dirname(path)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 training is for GPUs; on CPU use float32 or bfloat16")
    return dtype


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the learning rate after `step` optimiser steps (transformers' schedules)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def split_records(records: list, val_set_size: float, seed: int) -> tuple[list, list]:
    """(training, held-out) records; the held-out ones are drawn by a permutation fixed by seed."""
    n = len(records)
    if val_set_size >= 1 and val_set_size != int(val_set_size):  # 2.5 held out 2, in silence
        raise ValueError(f"--val-set-size {val_set_size}: a count of examples is a whole number (a fraction is "
                         "below 1)")
    count = int(val_set_size) if val_set_size >= 1 else int(round(val_set_size * n))
    if count < 0 or count >= n:
        raise ValueError(f"--val-set-size {val_set_size} leaves no training examples out of {n}")
    if val_set_size > 0 and count == 0:  # 0.01 of 40 records: no eval loss, in silence
        raise ValueError(f"--val-set-size {val_set_size} holds out none of the {n} examples; give a count, or a "
                         f"fraction of at least {0.5 / n:.3g}")
    held = set(np.random.RandomState(seed).permutation(n)[:count].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def global_batch(step: int, n_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the examples of optimiser step `step` (whole batches only; each epoch reshuffled)."""
    per_epoch = n_examples // batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n_examples)
    return order[k * batch_size:(k + 1) * batch_size]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors [batch, longest]: input_ids, attention_mask, labels (-100 on padding)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the scored tokens; logits at t predict the token at t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, (v +) t, vocab]
    logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning adds the virtual positions' logits first
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def parse_layers(text: str, count: int) -> list[int] | None:
    """--layers "20-29" or "0,5,9" -> layer indices (None: all layers)."""
    if not text.strip():
        return None
    layers = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            if int(last or first) < int(first):  # ("3-1" was "the model has layers 0-29")
                raise ValueError(f"--layers {text!r}: the range {part.strip()} runs backwards; write it {last}-{first}")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError as e:
        if str(e).startswith("--layers"):
            raise
        raise ValueError(f"--layers {text!r}: expected ranges like 20-29 or a list like 0,5,9") from None
    if not layers or min(layers) < 0 or max(layers) >= count:
        raise ValueError(f"--layers {text!r}: the model has layers 0-{count - 1}")
    return sorted(layers)


def _load_model(args, device: torch.device, dtype: torch.dtype):
    """(tokenizer, PEFT model) with fresh LoRA weights drawn from --seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = args.tokenizer or args.base
    if not any(os.path.isfile(os.path.join(source, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        # (transformers' 5 lines ended "You need to have sentencepiece or tiktoken installed")
        raise PyllmError(f"{source} has no tokenizer (tokenizer.json or tokenizer.model)"
                         + ("" if args.tokenizer else "; give one with --tokenizer DIR"))
    # a damaged model's library messages ("incomplete metadata", KeyError: 'metadata', a reinstall advised)
    # named no file: one line naming the directory
    with library_errors(f"{source}: the tokenizer cannot be loaded", first_line=True):
        tokenizer = AutoTokenizer.from_pretrained(source)
    with _progress_bars(not args.quiet), library_errors(f"{args.base}: the model cannot be loaded", first_line=True):
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    model.config.use_cache = False
    torch.manual_seed(args.seed)
    modules_to_save = [m.strip() for m in args.modules_to_save.split(",") if m.strip()]
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        if not {"embed_tokens", "lm_head"} <= set(modules_to_save):
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings {rows}: "
                             "training new tokens needs --modules-to-save embed_tokens,lm_head")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    method = getattr(args, "method", "lora")
    if method == "lora":
        targets = args.target_modules or ",".join(for_hf_config(model.config.to_dict()).lora_targets)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=[m.strip() for m in targets.split(",") if m.strip()],
                            layers_to_transform=parse_layers(args.layers, model.config.num_hidden_layers),
                            use_rslora=args.rslora, modules_to_save=modules_to_save or None, bias="none",
                            task_type="CAUSAL_LM")
    else:
        if modules_to_save:
            raise ValueError(f"--modules-to-save applies to --method lora; --method {method} trains only its "
                             "virtual tokens")
        config = prompt_learning_config(args, method)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())})
    asked = [m.strip() for m in args.target_modules.split(",") if m.strip()]  # the defaults are the family's
    targetable = lora_target_names(model)
    if method == "lora":
        check_target_kinds(model, asked, targetable)
    model = get_peft_model(model, config)
    if method == "lora":
        check_targets(model, asked, modules_to_save, leaves, targetable)
    return tokenizer, model.to(device)


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """transformers' progress bars shown or not inside the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown and was else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _lora_kinds() -> tuple:
    """The module types a LoRA adapter pyllm merges and runs can target: PEFT also adapts convolutions
    and attention blocks, which pyllm's families do not have."""
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, torch.nn.Embedding, Conv1D


def lora_target_names(model) -> list[str]:
    """The last names of the model's modules --target-modules can name (q_proj, lm_head, ...)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, _lora_kinds())})


def check_target_kinds(model, targets, targetable: list[str]) -> None:
    """Every module a --target-modules name matches (PEFT's rule: the full name, or its last parts)
    must be a linear or embedding layer. PEFT refused a block (`model`, `mlp`, `layers`, `0`) or a norm
    with its whole repr in the message, a screenful naming no valid choice. ValueError listing them."""
    kinds = _lora_kinds()
    # names none of which matches: PEFT's "Target modules {'x'} not found in the base model" (naming
    # neither the flag nor the choices); some that match: check_targets names the rest after PEFT
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if targets and len(missing) == len(targets):
        raise ValueError(f"--target-modules {', '.join(missing)}: no module of the model has this name (target "
                         f"modules: {', '.join(targetable)})")
    for t in targets:
        wrong = next(((n, m) for n, m in model.named_modules()
                      if n and (n == t or n.endswith("." + t)) and not isinstance(m, kinds)), None)
        if wrong is not None:
            raise ValueError(f"--target-modules {t}: '{wrong[0]}' is a {type(wrong[1]).__name__}, not a linear or "
                             f"embedding layer LoRA can adapt (target modules: {', '.join(targetable)})")


def check_targets(model, targets, modules_to_save, leaves: list[str], targetable: list[str]) -> None:
    """Every --target-modules and --modules-to-save name must have matched a module of the model (PEFT
    refuses only a list that matches nothing, and drops the names that match nothing silently: a typo
    trained an adapter without the layers asked for). ValueError naming them and the names they may
    take: targetable (lora_target_names of the base model) and leaves (its modules, for modules_to_save)."""
    targeted = list(getattr(model.base_model, "targeted_module_names", []) or [])
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in targeted)]
    saved = [n[:-len(".modules_to_save")] for n, _ in model.named_modules() if n.endswith(".modules_to_save")]
    missing_saved = [m for m in modules_to_save if not any(n.endswith(m) for n in saved)]
    if missing or missing_saved:
        what = [f"--target-modules {', '.join(missing)}"] if missing else []
        what += [f"--modules-to-save {', '.join(missing_saved)}"] if missing_saved else []
        choices = [f"target modules: {', '.join(targetable)}"] if missing else []
        choices += [f"its modules: {', '.join(leaves)}"] if missing_saved else []
        raise ValueError(f"{' and '.join(what)}: no module of the model has this name ({'; '.join(choices)})")


def prompt_learning_config(args, method: str):
    """PEFT's config for --method prompt (PromptTuningConfig, random or text initialisation), ptuning
    (PromptEncoderConfig, MLP or LSTM encoder) or prefix (PrefixTuningConfig, with or without projection)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if args.virtual_tokens < 1:
        raise ValueError("--virtual-tokens must be at least 1")
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens)
    if method == "prompt":
        if args.prompt_init_text:
            return PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text=args.prompt_init_text,
                                      tokenizer_name_or_path=args.tokenizer or args.base, **common)
        return PromptTuningConfig(**common)
    if method == "ptuning":
        return PromptEncoderConfig(encoder_reparameterization_type=args.encoder.upper(),
                                   encoder_hidden_size=args.encoder_hidden_size, **common)
    if method == "prefix":
        return PrefixTuningConfig(prefix_projection=args.prefix_projection,
                                  encoder_hidden_size=args.encoder_hidden_size, **common)
    raise ValueError(f"unknown --method {method!r} (lora, prompt, ptuning, prefix)")


def position_limit(args, hf_config: dict) -> tuple[int, str] | None:
    """(tokens an example may have, why) for a family with learned absolute positions (GPT-2, OPT):
    a longer example indexed past the position table, torch's bare "index out of range in self" (on a
    GPU a device-side assert). Prompt learning's virtual tokens take positions first. None for rotary
    and ALiBi families, which run past their trained context as transformers does, and for families
    pyllm does not know."""
    try:
        config = for_hf_config(hf_config).config_from_hf(hf_config)
    except PyllmError:
        return None
    if config.position_embedding != "learned":
        return None
    virtual = args.virtual_tokens if getattr(args, "method", "lora") != "lora" else 0
    why = f"the {config.max_position_embeddings} positions {config.architecture} learned"
    return config.max_position_embeddings - virtual, why + (f", less {virtual} virtual tokens" if virtual else "")


# records past which tokenizing them shows a progress bar (a million took 3 minutes without a word)
TOKENIZE_PROGRESS_RECORDS = 2000


def _tokenize(records, tokenizer, args, what: str, say, limit: tuple[int, str] | None, bar) -> list[Example]:
    """The records' examples, those without a response token within --cutoff-len skipped (said); bar: a
    progress bar (progress_bar, maybe disabled) advanced a record at a time, closed here."""
    if args.template == "chat" and not tokenizer.chat_template:
        raise ValueError(f"{args.tokenizer or args.base} has no chat template; use --template alpaca")
    examples = []
    with bar:
        for r in records:
            examples.append(tokenize_record(r, tokenizer, args.template, args.cutoff_len, args.train_on_inputs))
            bar.update(1)
    if limit is not None:
        long = [r.where for r, e in zip(records, examples) if len(e.input_ids) > limit[0]]
        if long:
            raise DataError(f"{len(long)} {what} example(s) have more tokens than {limit[1]} ("
                            f"{_places(long)}); give --cutoff-len {max(limit[0], 0)} or less")
    kept = [e for e in examples if e.label_count > 0]
    if len(kept) < len(examples):
        places = [r.where for r, e in zip(records, examples) if e.label_count == 0]
        say(f"{len(examples) - len(kept)} {what} example(s) have no response token within --cutoff-len "
            f"{args.cutoff_len} and are skipped ({_places(places)})")
    return kept


def _places(wheres: list[str]) -> str:
    """"lines 3, 7" (or "line 1, record 2; line 1, record 5" for records sharing a line) of the first ten
    records (Record.where), and how many more."""
    more = f" and {len(wheres) - 10} more" if len(wheres) > 10 else ""
    if all("," not in w for w in wheres):
        return "lines " + ", ".join(w[len("line "):] for w in wheres[:10]) + more
    return "; ".join(wheres[:10]) + more


def _run_config(args, total_steps: int, data_sha256: str) -> dict:
    """The settings a resumed run must share with its checkpoint (RESUME_KEYS); data_sha256: the SHA-256 of
    the data's bytes as load_records read them."""
    values = dict(vars(args), total_steps=total_steps, data=os.path.abspath(args.data),
                  data_sha256=data_sha256, base=os.path.abspath(args.base),
                  base_config_sha256=_config_sha256(os.path.join(args.base, "config.json")))
    return {k: values.get(k) for k in RESUME_KEYS}


def _config_sha256(path: str) -> str | None:
    """The SHA-256 of a model's config.json as JSON, less the keys that name its copy rather than the model
    (_name_or_path, transformers_version): a checkpoint resumed on another base must be refused."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()


def _checkpoints(output: str) -> list[tuple[int, str]]:
    found = []
    if os.path.isdir(output):
        for name in os.listdir(output):
            m = re.fullmatch(r"checkpoint-(\d+)", name)
            if m and os.path.exists(os.path.join(output, name, STATE_FILE)):
                found.append((int(m.group(1)), os.path.join(output, name)))
    return sorted(found)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# Deprecations one library warns the other about (peft calling transformers' old names), raised at
# every run though nothing the user or pyllm calls is deprecated: two FutureWarnings with tracebacks'
# file lines before the first step (peft 0.21 with transformers 5)
LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated", r"`past_key_values` is deprecated")


def train(args, log=None) -> TrainResult:
    """Runs the training the arguments describe (see pyllm/train/__init__.py); log: where messages
    and the progress bar go (default: the current sys.stderr)."""
    import warnings

    with warnings.catch_warnings():
        for message in LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        return _train(args, log)


def _train(args, log=None) -> TrainResult:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..progress import progress_bar

    log = log or sys.stderr
    started = time.perf_counter()
    procs = Processes.start(args.device)
    if procs.rank != 0:
        quiet_warnings()  # every process would print the same library warnings: rank 0 alone does
    trained = None
    written, created = False, None
    try:
        check_options(args)
        check_output(args.output)
        # transformers takes any other name for a model on the Hub: "couldn't connect to huggingface.co"
        if not os.path.isfile(os.path.join(args.base, "config.json")):
            raise FileNotFoundError(f"the base model {args.base} is not a Hugging Face model directory (no config.json)")
        if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
            raise FileNotFoundError(f"--tokenizer {args.tokenizer} is not a directory")
        dtype = resolve_dtype(args.dtype, procs.device)
        micro, world = args.micro_batch_size, procs.world
        for flag, value in (("--batch-size", args.batch_size), ("--micro-batch-size", micro)):
            if value <= 0:  # (0 read "--batch-size 0 must be a multiple of --micro-batch-size 4", which it is)
                raise ValueError(f"{flag} must be at least 1, not {value}")
        if args.batch_size % (micro * world):
            raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {micro} "
                             f"x {world} process(es)")
        accumulation = args.batch_size // (micro * world)
        if args.cutoff_len < 2:
            raise ValueError("--cutoff-len must be at least 2 tokens")
        notes, data_sha256 = [], []
        train_records, val_records = split_records(load_records(args.data, notes, data_sha256), args.val_set_size,
                                                   args.seed)
        for note in notes if procs.rank == 0 else ():
            print(f"pyllm train: {note}", file=log)
        created = make_output(args.output)
        tokenizer, model = _load_model(args, procs.device, dtype)
        def say(message: str) -> None:
            if procs.rank == 0:
                print(f"pyllm train: {message}", file=log)

        limit = position_limit(args, model.config.to_dict())
        width = getattr(model.config, "hidden_size", None)
        if getattr(args, "method", "lora") == "lora" and isinstance(width, int) and args.lora_r > width:
            # (-r 100000 on a 64-wide model: 35 s a step and a 782 MB adapter, said nothing)
            say(f"warning: --lora-r {args.lora_r} exceeds the model's width ({width}): a rank past a layer's "
                "smaller side adds no capacity, only memory and time")
        trained_positions = getattr(model.config, "max_position_embeddings", None)
        virtual = args.virtual_tokens if getattr(args, "method", "lora") != "lora" else 0
        if limit is None and isinstance(trained_positions, int) and args.cutoff_len + virtual > trained_positions:
            # rotary and ALiBi families run past their trained context (as transformers does), but
            # learn little there; pyllm run / perplexity warn the same way for --ctx
            say(f"warning: --cutoff-len {args.cutoff_len}{f' + {virtual} virtual tokens' if virtual else ''} "
                f"exceeds the {trained_positions} tokens the model was trained on; positions beyond them are untrained")
        def tokenizing(records) -> object:
            return progress_bar(len(records), "tokenizing", "record", not args.quiet and procs.rank == 0
                                and len(records) > TOKENIZE_PROGRESS_RECORDS, log)

        train_set = _tokenize(train_records, tokenizer, args, "training", say, limit, tokenizing(train_records))
        val_set = _tokenize(val_records, tokenizer, args, "held-out", say, limit, tokenizing(val_records))
        if val_records and not val_set:  # (it trained without an eval loss, the skip note its only sign)
            say(f"warning: none of the {len(val_records)} held-out example(s) has a response token within "
                f"--cutoff-len {args.cutoff_len}: the run has no eval loss (a larger --val-set-size or --cutoff-len)")
        if not train_set:  # (was "0 training examples are fewer than one batch (--batch-size 32)")
            raise DataError(f"no training example has a response token within --cutoff-len {args.cutoff_len}; "
                            "give a larger --cutoff-len")
        if len(train_set) < args.batch_size:
            raise DataError(f"{len(train_set)} training examples are fewer than one batch (--batch-size "
                            f"{args.batch_size})")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        steps_per_epoch = len(train_set) // args.batch_size
        total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
        if args.warmup_steps >= total_steps:  # the learning rate climbs from 0 on every step (a run of one
            # step learned nothing, and said "trained 1 step")
            say(f"warning: --warmup-steps {args.warmup_steps} covers all {total_steps} steps of the run: the "
                "learning rate stays below --lr throughout"
                + (" (0 on a run of one step: nothing is learned)" if total_steps == 1 else ""))

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(args.lr_scheduler, s, args.warmup_steps, total_steps))
        scaler = torch.amp.GradScaler(procs.device.type, enabled=dtype == torch.float16)
        run_config = _run_config(args, total_steps, data_sha256[0])
        result = TrainResult(os.path.abspath(args.output), total_steps)

        start = 0
        if args.resume:
            found = _checkpoints(args.output)
            path = found[-1][1] if args.resume == "latest" and found else args.resume
            if path == "latest":
                raise FileNotFoundError(f"--resume: no checkpoint in {args.output} (a run keeps them with "
                                        "--save-steps N)")
            if not os.path.exists(os.path.join(path, STATE_FILE)):
                raise FileNotFoundError(f"--resume: {path} is not a checkpoint (no {STATE_FILE})")
            with library_errors(f"--resume: {os.path.join(path, STATE_FILE)} cannot be read"):
                state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
                saved = state["config"]
            # (checkpoints of pyllm before data_sha256 did not record the data's content)
            # (a checkpoint resumed on another base of other shapes was a screen of torch's "size mismatch"
            # lines, and on one of the same shapes went on in silence: the base model is a setting too)
            differ = [("the data file's content (edited since the checkpoint)" if k == "data_sha256" else
                       f"the base model's config.json (another model: {saved.get('base')} -> {args.base})"
                       if k == "base_config_sha256" else f"{k} {saved.get(k)!r} -> {v!r}")
                      for k, v in run_config.items()
                      if saved.get(k) != v and k not in EXTENDABLE_KEYS
                      and (k not in ("data_sha256", "base_config_sha256", "base") or k in saved)
                      # the content decides where it was recorded: a moved or copied data file was refused
                      and (k != "data" or "data_sha256" not in saved) and k != "base"]
            if differ:
                raise ValueError(f"--resume: {path} was made with other settings: {'; '.join(differ)}")
            if saved.get("base", run_config["base"]) != run_config["base"]:
                # the same configuration elsewhere: a moved copy, or a model of the same shapes (its weights are
                # not compared): said, as merging an adapter into a base of another name is
                say(f"warning: {path} was trained on the base model {saved['base']}, resumed on {run_config['base']} "
                    "(the same config.json)")
            before = state["config"].get("total_steps")
            if total_steps < state["step"]:
                raise ValueError(f"--resume: {path} is at step {state['step']}, past the {total_steps} steps asked for")
            if before != total_steps:
                # fewer steps than the checkpoint's run (but not fewer than it has done) shorten it: this
                # said "extending the run from 670 to 669 steps"
                how = "extending" if before is None or total_steps > before else "shortening"
                say(f"{how} the run from {before} to {total_steps} steps (the learning-rate schedule now ends "
                    f"at step {total_steps})")
            if "trainable" in state:  # every trained tensor as it was; also prompt encoders (P-tuning, prefix
                # projection), which the adapter file does not hold: for a projected prefix it holds the computed
                # prefix [virtual, layers x 2 x hidden], which did not load into the embedding it comes from
                model.load_state_dict(state["trainable"], strict=False)
            else:  # a checkpoint of an older pyllm
                set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors"),
                                                           device=str(procs.device)))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            rng = state["rng"][procs.rank] if len(state["rng"]) == world else state["rng"][0]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and procs.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], procs.device)
            start = state["step"]
            result.eval_losses = [tuple(e) for e in state["eval_losses"]]
            # (checkpoints of pyllm before "losses" kept none: the log starts at the step resumed)
            result.earlier_losses = [float(x) for x in state.get("losses", [])]
            result.first_step = int(state.get("first_step", 0)) if "losses" in state else start
            say(f"resuming from {path} (step {start} of {total_steps})" + (
                # (it went on to "trained 0 steps", saying neither why nor how to train more)
                "; the run is complete: nothing left to train (a larger --max-steps extends it)"
                if start == total_steps else ""))

        trained = model
        if world > 1:
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)

        def evaluate() -> float | None:
            if not val_set:
                return None
            model.eval()
            total = count = 0.0
            with torch.no_grad():
                mine = list(range(procs.rank, len(val_set), world))
                for i in range(0, len(mine), micro):
                    chunk = [val_set[j] for j in mine[i:i + micro]]
                    total += summed_loss(model, collate(chunk, pad_id, procs.device)).item()
                    count += sum(e.label_count for e in chunk)
            model.train()
            total, count = procs.sum(total, count)
            return total / count

        def save_checkpoint(step: int) -> None:
            rng = procs.gather(_rng_state(procs.device))

            def save() -> None:
                final = os.path.join(args.output, f"checkpoint-{step}")
                # its own CHECKPOINT.PID.XXXX.partial (model_cache.partial_dir): a fixed checkpoint-N.partial was
                # shared by two runs into one output, and one left by a killed run stayed; those go now
                remove_stale_partials(final)
                shutil.rmtree(final + ".partial", ignore_errors=True)  # an older pyllm's, left by a killed run
                tmp = partial_dir(final)
                try:
                    model.save_pretrained(tmp)
                    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
                    torch.save({"step": step, "config": run_config, "trainable": trainable,
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                                "eval_losses": result.eval_losses, "first_step": result.first_step,
                                "losses": result.earlier_losses + result.losses}, os.path.join(tmp, STATE_FILE))
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                limit = getattr(args, "save_total_limit", 0)
                if limit:  # the oldest go once the new one is in place (transformers' save_total_limit)
                    for _, old in _checkpoints(args.output)[:-limit]:
                        if old != final:
                            shutil.rmtree(old, ignore_errors=True)

            procs.on_rank0(f"save checkpoint-{step}", save)

        def record_eval(step: int) -> None:
            loss = evaluate()
            if loss is not None:
                result.eval_losses.append((step, loss))
                say(f"step {step}: eval loss {loss:.4f}")

        if start == 0:
            record_eval(0)
        model.train()
        bar = progress_bar(total_steps, "training", "step", not args.quiet and procs.rank == 0, log, initial=start)
        for step in range(start, total_steps):
            batch = global_batch(step, len(train_set), args.batch_size, args.seed)
            scored = sum(train_set[i].label_count for i in batch)
            mine = batch[procs.rank * accumulation * micro:(procs.rank + 1) * accumulation * micro]
            step_loss = 0.0
            for k in range(accumulation):
                inputs = collate([train_set[i] for i in mine[k * micro:(k + 1) * micro]], pad_id, procs.device)
                last = k == accumulation - 1
                with contextlib.nullcontext() if last or world == 1 else trained.no_sync():
                    loss_sum = summed_loss(trained, inputs)
                    # DDP averages gradients over processes; scaling by world makes that a sum
                    scaler.scale(loss_sum * (world / scored)).backward()
                step_loss += loss_sum.item()
            if args.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            (step_loss,) = procs.sum(step_loss)
            result.losses.append(step_loss / scored)
            check_finite(model, step + 1, result.losses[-1])
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
            done = step + 1
            if args.eval_steps and done % args.eval_steps == 0 and done < total_steps:
                record_eval(done)
            if args.save_steps and done % args.save_steps == 0:
                save_checkpoint(done)
        bar.close()
        if args.save_steps and total_steps % args.save_steps and start < total_steps:
            # the last step too, as transformers' Trainer saves: `--resume --max-steps MORE` extended a run
            # of 8 steps with --save-steps 5 from step 5, training steps 6-8 again
            save_checkpoint(total_steps)
        if not result.eval_losses or result.eval_losses[-1][0] != total_steps:
            record_eval(total_steps)
        procs.on_rank0("write the adapter",
                       lambda: _save_adapter(model, tokenizer if args.tokenizer else None, args.output, result))
        written = True
        say(f"wrote the adapter to {result.output}")
        say(summary_line(result, time.perf_counter() - started))
        collapse = collapse_warning(result, len(tokenizer))
        if collapse:
            say(collapse)
        # (it was given `trained`, by then the model: the --ctx a long prompt-learning adapter needs was never said)
        say(usage_line(args, result.output, trained_positions if isinstance(trained_positions, int) else None))
        # the DistributedDataParallel wrapper goes while every process is still here: freed after the
        # group is destroyed and a peer has exited, it hangs in gloo's destructor
        trained = None  # noqa: F841
        procs.barrier()
        return result
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI's SystemExit 143)
        if procs.rank == 0 and not written:  # what was kept, and how to go on (after the progress bar's line)
            print(f"\npyllm train: interrupted: {interrupted_note(args.output)}", file=log)
        raise
    finally:
        trained = None  # noqa: F841
        if not written and procs.rank == 0:
            remove_output(args.output, created)
        procs.stop()


def interrupted_note(output: str) -> str:
    """What an interrupted run leaves in output (saves are whole or absent: a partial directory is
    removed) and how to continue it."""
    found = _checkpoints(output)
    if found:
        return (f"the adapter was not written; the latest checkpoint is {found[-1][1]} (step {found[-1][0]}): "
                "run the same command with --resume to continue from it")
    return "the adapter was not written and no checkpoint was kept (--save-steps N keeps some to --resume from)"


def check_finite(model, step: int, loss: float) -> None:
    """Refuses a run whose loss or adapter stopped being finite (diverged: too high a learning rate, an
    overflow) before anything of the step is saved: such a run wrote a NaN adapter with exit 0. The
    adapter is what PEFT saves (the trainable weights; for P-tuning and prefix projection the prompt
    embeddings its encoder computes, which can overflow from finite weights). Every process checks the
    same values, so all stop together."""
    from peft import get_peft_model_state_dict

    bad = None if math.isfinite(loss) else f"the training loss is {loss}"
    if bad is None:
        with torch.no_grad():
            saved = get_peft_model_state_dict(model) if hasattr(model, "peft_config") else {}
            values = list(saved.items()) + [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            for name, value in values:
                if not torch.isfinite(value.detach()).all():
                    bad = f"the trainable weight {name} holds NaN or infinite values"
                    break
    if bad is not None:
        raise PyllmError(f"training diverged at step {step}: {bad}; nothing was saved from this step "
                         "(lower --lr, or keep --max-grad-norm on)")


def usage_line(args, output: str, trained_positions: int | None = None) -> str:
    """How to run the adapter just written: the convert and run commands. An adapter trained on the Alpaca
    prompt (--template alpaca, the default) answers that prompt, not the model's chat template, which
    `pyllm run` and `pyllm serve` apply unless told otherwise: the commands say --chat-template alpaca
    (the built-in template that writes the training's prompt token for token). Virtual tokens and
    --cutoff-len past the context pyllm run takes by default (the model's trained positions, at most
    llm.DEFAULT_CONTEXT) add --ctx: 300 virtual tokens on a 256-position model failed every prompt."""
    import shlex

    from ..llm import DEFAULT_CONTEXT

    base, out = shlex.quote(args.base), shlex.quote(output)
    template = " --chat-template alpaca" if args.template == "alpaca" else ""
    needed = getattr(args, "virtual_tokens", 0) + args.cutoff_len
    if getattr(args, "method", "lora") != "lora" and trained_positions and needed > min(trained_positions,
                                                                                          DEFAULT_CONTEXT):
        template += f" --ctx {needed}"
    if getattr(args, "method", "lora") == "lora":
        return (f"to run it: pyllm convert {base} --lora {out} -o tuned.pllm, then "
                f"pyllm run tuned.pllm{template} -p PROMPT")
    from ..adapters import check_name

    try:
        name = check_name(os.path.basename(os.path.abspath(output)))
    except ValueError:
        name = "task"
    return (f"to run it: pyllm convert {base} --adapter {shlex.quote(f'{name}={output}')} -o tasks.pllm, then "
            f"pyllm run tasks.pllm --adapter {name}{template} -p PROMPT")


def summary_line(result: TrainResult, seconds: float) -> str:
    """"trained N steps in T s; final training loss L (mean of the last k steps: M); eval loss E"."""
    def steps(n: int) -> str:  # ("trained 1 steps")
        return f"{n} step{'' if n == 1 else 's'}"

    parts = [f"trained {steps(len(result.losses))} in {seconds:.1f} s"]
    if result.losses:
        last = result.losses[-10:]
        parts.append(f"final training loss {result.losses[-1]:.4f} (mean of the last {steps(len(last))} "
                     f"{sum(last) / len(last):.4f})")
    if result.eval_losses:
        step, loss = result.eval_losses[-1]
        parts.append(f"eval loss {loss:.4f} at step {step}")
    return "; ".join(parts)


def collapse_warning(result: TrainResult, vocab_size: int) -> str | None:
    """A warning when the run ended at the loss of uniform guessing over the vocabulary (ln V, within 5%)
    from well below it: every value finite, so the diverged-run check passed, and the adapter written
    makes the model's every prediction uniform (--lr 1e6 without --max-grad-norm exited 0 that way)."""
    earlier = result.earlier_losses + result.losses
    if not result.losses or vocab_size < 2:
        return None
    uniform = math.log(vocab_size)
    last = result.losses[-max(1, min(10, len(result.losses) // 4)):]  # the run's end, not its start
    final = sum(last) / len(last)
    if final >= 0.95 * uniform and min(earlier) < 0.8 * uniform:
        where = "that of" if final <= 1.05 * uniform else "above that of"  # (16.03 was called uniform's 10.80)
        return (f"warning: the training loss ended at {final:.4f}, {where} uniform guessing over the {vocab_size} "
                f"tokens (ln {vocab_size} = {uniform:.4f}), from {min(earlier):.4f}: the run diverged and the adapter "
                "predicts nothing (lower --lr, or keep --max-grad-norm on)")
    return None


def quiet_warnings() -> None:
    """Silences Python warnings and transformers' logged warnings in this process."""
    import warnings

    warnings.simplefilter("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is needed for training anyway
        pass


def _save_adapter(model, tokenizer, output: str, result: TrainResult) -> None:
    """adapter_config.json + adapter_model.safetensors (+ the tokenizer of an extended vocabulary) and
    train_log.json, each file replaced only once written in full. An earlier adapter's config goes
    first and the new one comes last, so a run stopped between the files leaves a directory that
    no loader takes for an adapter, never new weights beside an old config (same shapes, another
    lora_alpha: a wrongly scaled adapter without an error)."""
    os.makedirs(output, exist_ok=True)
    staging = os.path.join(output, ".adapter")  # written in .adapter.PID.XXXX.partial (see save_checkpoint)
    remove_stale_partials(staging)
    shutil.rmtree(staging + ".partial", ignore_errors=True)  # an older pyllm's, left by a killed run
    tmp = partial_dir(staging)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "train_log.json"), "w", encoding="utf-8") as f:
            json.dump({"steps": result.steps, "first_step": result.first_step,
                       "losses": result.earlier_losses + result.losses, "eval_losses": result.eval_losses}, f,
                      indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    config = os.path.join(output, "adapter_config.json")
    if os.path.isfile(config):
        os.remove(config)
    written = sorted(os.listdir(tmp))
    for name in TOKENIZER_FILES:  # an earlier run's tokenizer (--tokenizer) went with an adapter trained without
        # one: a vocabulary of other size than the new adapter's embeddings, refused by convert and merge
        if name not in written and os.path.isfile(os.path.join(output, name)):
            os.remove(os.path.join(output, name))
    for name in sorted(written, key=lambda n: n == "adapter_config.json"):  # the config last
        os.replace(os.path.join(tmp, name), os.path.join(output, name))
    os.rmdir(tmp)
