"""LoRA adapters (PEFT format) merged into a Hugging Face base checkpoint, in float32, without torch.

An adapter directory holds adapter_config.json and adapter_model.safetensors. Its tensors are named
after the PEFT-wrapped model, "base_model.model." + the base module's name, then:
  X.lora_A.weight [r, in], X.lora_B.weight [out, r]   LoRA on a linear layer X: W' = W + s * B @ A
  X.lora_B.bias [out]                                  lora_bias=True: b' = b + s * bias
  X.lora_embedding_A [r, vocab], X.lora_embedding_B [hidden, r]   LoRA on an embedding: E' = E + s * (B @ A)^T
  X.base_layer.weight / X.base_layer.bias, X.weight / X.bias,     trained copies that replace the base
  X.modules_to_save.weight                                        tensor (modules_to_save, bias="all",
                                                                  saved embedding layers)
  X.original_module.weight                                        the base module as it was (ignored)
s = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha come from rank_pattern / alpha_pattern
when a pattern matches the module name (PEFT's rule: the first key K with re.match(rf"(.*\\.)?({K})$")).
fan_in_fan_out only matters for layers stored [in, out] (GPT-2's Conv1D); PEFT turns it off for
the nn.Linear layers of LLaMA models, and so does this merge.

Tied embeddings: while lm_head and embed_tokens share one tensor, a trained replacement of it (a saved
embedding layer) changes both. A LoRA on one of them trained on that module alone: PEFT wraps the
module, and the other keeps reading the shared base tensor (the adapter's forward, what training
measured). So the merge unties them: the LoRA's delta goes to its module only, and the other gets the
base tensor as its own copy. PEFT's merge_and_unload writes the delta into the shared parameter
instead, which changes both and gives another model (its warning: "ensure_weight_tying"; an adapter
trained with that option holds lm_head LoRA tensors its target_modules do not name, and is refused).
modules_to_save gives a module its own trained copy, and from then on the two are separate.

Adapters are applied in the order given, each onto the result of the previous ones. A resized
vocabulary (modules_to_save on embed_tokens and lm_head, as Chinese-LLaMA's 49953 tokens) needs the
adapter directory to carry its tokenizer, which then replaces the base's.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import stat

import numpy as np

from ..errors import file_kind
from ..formats.safetensors import FormatError, PlannedTensor, SafetensorsFile, write_atomic
from ..quant import F16_MAX, f32_to_bf16_bits
from .adapter_base import adapter_config_path, adapter_weights_path, warn_if_other_base
from .checkpoint import Checkpoint, _read_json, load_float32, present, read_chat_template, read_tokenizer

PEFT_PREFIX = "base_model.model."
# PEFT's LoraConfig defaults (peft 0.x: r=8, lora_alpha=8), used for an adapter_config.json that leaves
# them out, as PeftModel.from_pretrained does (tests/test_lora_merge.py checks them against peft)
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
UNSUPPORTED_OPTIONS = {  # adapter_config.json keys whose non-empty values this merge cannot reproduce
    "use_dora": "DoRA (use_dora) adapters", "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    # LoRA variants whose update is not scaling * B @ A on every token (PEFT refuses to merge the first two)
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens: the update applies only from the "
                               "invocation tokens on)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_qalora": "QA-LoRA (use_qalora: LoRA on group-pooled inputs)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


# PEFT's rule: the first rank_pattern / alpha_pattern key K with re.match(PATTERN_RULE.format(K), module)
PATTERN_RULE = r"(.*\.)?({})$"
# keys of module-name characters only ("model.layers.0.self_attn.q_proj", "q_proj"): matched here, in
# polynomial time; any other key is matched in a child process with a deadline (match_patterns)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]*")
_PLAIN_WORK = 1 << 20  # (key, module) pairs of plain keys matched here; more go to the child too
_MATCH_CHILD = ("import json, re, sys\n"
                "keys, modules, rule = json.load(sys.stdin)\n"
                "json.dump([next((i for i, k in enumerate(keys) if re.match(rule.format(k), m)), -1) for m in modules], "
                "sys.stdout)\n")


def pattern_key(patterns, module: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to a module, as PEFT chooses it (no bound on the
    time a key takes: match_patterns for keys from a file)."""
    for key in patterns:
        if re.match(PATTERN_RULE.format(key), module):
            return key
    return None


def match_patterns(patterns, modules: list[str], what: str, rule: str = PATTERN_RULE) -> dict[str, str | None]:
    """pattern_key(patterns, m) for each module m (the first key K with re.match(rule.format(K), m)), keys
    from a file: a key other than a plain module name (or more pairs than _PLAIN_WORK) is matched in a
    child Python stopped after limits.MAX_ADAPTER_PATTERN_SECONDS (LimitError naming `what` past it: a
    key like "(.|.)*x" backtracked for hours, and re cannot be interrupted from another thread)."""
    import subprocess
    import sys

    from ..errors import LimitError
    from ..limits import MAX_ADAPTER_PATTERN_SECONDS

    keys = list(patterns)
    if not keys:
        return dict.fromkeys(modules)
    if all(_PLAIN_KEY.fullmatch(k) for k in keys) and len(keys) * len(modules) <= _PLAIN_WORK:
        return {m: next((k for k in keys if re.match(rule.format(k), m)), None) for m in modules}
    try:
        child = subprocess.run([sys.executable, "-I", "-S", "-c", _MATCH_CHILD], capture_output=True, text=True,
                               input=json.dumps([keys, modules, rule]), timeout=MAX_ADAPTER_PATTERN_SECONDS)
    except subprocess.TimeoutExpired:
        raise LimitError(f"{what}: matching its regular expressions against the adapter's {len(modules)} module "
                         f"names took more than {MAX_ADAPTER_PATTERN_SECONDS:g} s (limits.MAX_ADAPTER_PATTERN_SECONDS): "
                         "a key that backtracks without end?") from None
    if child.returncode != 0:
        raise FormatError(f"{what}: its regular expressions cannot be matched "
                          f"({child.stderr.strip().splitlines()[-1:] or child.returncode})")
    return {m: keys[i] if i >= 0 else None for m, i in zip(modules, json.loads(child.stdout))}


FULL_MATCH_RULE = r"(?:{})\Z"  # re.match(FULL_MATCH_RULE.format(K), m): re.fullmatch(K, m)
# PEFT's layer index of a module name: the first number after a layers_pattern segment, or after any
# segment when layers_pattern is empty (peft.tuners.tuners_utils.check_target_module_exists)
_ANY_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _names(cfg: dict, key: str, where: str) -> str | list[str] | None:
    """adapter_config.json's target_modules / exclude_modules / layers_pattern: null, a string or a list of
    strings (FormatError otherwise)."""
    value = cfg.get(key)
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise FormatError(f"{where} {key} must be a string, a list of strings or null, got {value!r:.80}")


def targeted_modules(cfg: dict, modules: list[str], where: str) -> set[str]:
    """The modules among `modules` (base module names, "model.layers.0.self_attn.q_proj") that PEFT's LoRA
    wraps by adapter_config.json's target_modules, exclude_modules, modules_to_save, layers_to_transform
    and layers_pattern, with PEFT's rules (peft 0.x, tuners_utils.check_target_module_exists): a string is
    a regular expression matched in full, a list holds names matched whole or as a dotted suffix (only
    these are filtered by layers_to_transform). target_modules null or "all-linear": every module, less
    the exclusions (PEFT then takes its default for the model type, or the model's linear layers, which
    this does not check). Regular expressions from the file are matched with match_patterns' deadline.
    FormatError for values of the wrong type."""
    targets, excluded = _names(cfg, "target_modules", where), _names(cfg, "exclude_modules", where)
    layers, pattern = cfg.get("layers_to_transform"), _names(cfg, "layers_pattern", where)
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise FormatError(f"{where} layers_to_transform must be a layer index, a list of them or null, got "
                          f"{layers!r:.80}")

    def matched(names, module_names: list[str], key: str) -> set[str]:
        if isinstance(names, str):  # a regular expression, matched in full
            return {m for m, k in match_patterns([names], module_names, f"{where} {key}", FULL_MATCH_RULE).items() if k}
        listed = set(names or ())
        return {m for m in module_names if m in listed or any(".".join(m.split(".")[i:]) in listed
                                                               for i in range(1, m.count(".") + 1))}

    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        chosen = set(modules)  # (all-linear: PEFT's list of the model's linear layers, not known here)
    else:
        chosen = matched(targets, modules, "target_modules")
        # PEFT filters by layer only the modules a list names by a dotted suffix, not whole ones nor a regex's
        by_suffix = set() if isinstance(targets, str) else chosen - set(targets)
        if layers not in (None, []) and by_suffix:
            wanted = {layers} if isinstance(layers, int) else set(layers)
            patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
            if any(not _PLAIN_KEY.fullmatch(p) for p in patterns):
                raise FormatError(f"{where} layers_pattern {pattern!r:.80} is not a module name (pyllm matches "
                                  "layers_pattern as plain module-name text)")
            patterns = [p for p in patterns if p]

            def index(m: str) -> int | None:
                found = next((f for f in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", m) for p in patterns) if f),
                             None) if patterns else _ANY_LAYER.match(m)
                return int(found["idx"]) if found else None

            chosen -= {m for m in by_suffix if index(m) not in wanted}
    chosen -= matched(excluded, modules, "exclude_modules") if excluded else set()
    saved = cfg.get("modules_to_save") or []  # (checked to be a list of names by LoraAdapter)
    saved_rule = r"(^|.*\.){}($|\..*)"
    chosen -= {m for m, k in match_patterns(saved, sorted(chosen), f"{where} modules_to_save", saved_rule).items() if k}
    return chosen


@dataclasses.dataclass
class LoraModule:
    """The low-rank update of one base module."""

    module: str  # base module name, e.g. "model.layers.0.self_attn.q_proj"
    a: np.ndarray  # [r, in] (embedding: [r, vocab])
    b: np.ndarray  # [out, r] (embedding: [hidden, r])
    scaling: float
    embedding: bool
    bias: np.ndarray | None = None  # [out], lora_bias=True
    transposed: bool = False  # the base weight is stored [in, out] (a Conv1D layer: fan_in_fan_out)

    @property
    def target(self) -> str:
        return self.module + ".weight"

    def target_shape(self) -> tuple[int, int]:
        flip = self.embedding or self.transposed
        return (self.a.shape[1], self.b.shape[0]) if flip else (self.b.shape[0], self.a.shape[1])

    def delta(self) -> np.ndarray:
        """scaling * B @ A in float32, laid out as the base weight ([out, in]; [vocab, hidden] for an
        embedding; [in, out] for a Conv1D weight)."""
        with np.errstate(over="ignore", invalid="ignore"):  # past float32's range: inf, refused with the
            # tensor's and the adapter's names by the converter's finite check (numpy's warning named nothing)
            d = (self.b.astype(np.float32) @ self.a.astype(np.float32)) * np.float32(self.scaling)
        return np.ascontiguousarray(d.T) if self.embedding or self.transposed else d


def check_lora_numbers(cfg: dict, where: str) -> None:
    """Ranks (r, rank_pattern values) must be positive integers and alphas (lora_alpha,
    alpha_pattern values) finite numbers: FormatError otherwise, before any division by them. Zero
    or negative alphas are legal, as in PEFT (scaling = alpha / r: 0 merges nothing, < 0 subtracts);
    null is refused (PEFT fails on it too)."""
    def bad(key, value, what):
        return FormatError(f"{where}: adapter_config.json {key} must be {what}, not {value!r:.60}")

    def finite(value) -> bool:  # (an integer of 400 digits raised OverflowError converting to float)
        try:
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
        except OverflowError:
            return False

    def rank(key, value):
        if not finite(value) or value != int(value) or value <= 0:
            raise bad(key, value, "a positive integer")

    def alpha(key, value):
        if not finite(value):
            raise bad(key, value, "a finite number (within a float's range)")

    if "r" in cfg:
        rank("r", cfg["r"])
    if "lora_alpha" in cfg:
        alpha("lora_alpha", cfg["lora_alpha"])
    for key, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        patterns = cfg.get(key)
        if isinstance(patterns, dict):
            for module, value in patterns.items():
                check(f"{key}[{module!r}]", value)


class LoraAdapter:
    """A PEFT LoRA adapter directory, read with numpy."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        self.config = _read_json(adapter_config_path(self.dir, "LoRA adapter"))
        self._check_config()
        weights = adapter_weights_path(self.dir)
        self.weights = weights  # the file named by messages about its tensors
        self.modules: dict[str, LoraModule] = {}  # by base module name
        self.replacements: dict[str, np.ndarray] = {}  # base tensor name -> trained copy
        self.replacement_names: dict[str, str] = {}  # base tensor name -> its trained copy's name in the file
        self.saved_modules: set[str] = set()  # tensors of modules_to_save (own copies, not in-place)
        with SafetensorsFile(weights) as f:
            self._read(f)
        if not self.modules and not self.replacements:
            raise FormatError(f"{weights}: no LoRA tensors")

    def _check_config(self) -> None:
        check_lora_numbers(self.config, self.dir)
        cfg = self.config
        if cfg.get("peft_type", "LORA") != "LORA":
            from ..adapters import PEFT_TYPES

            # the other direction (--adapter given a LoRA directory) names --lora
            hint = ("; a prompt-learning adapter is stored beside the weights with pyllm convert --adapter"
                    if cfg.get("peft_type") in PEFT_TYPES else "")
            raise FormatError(f"{self.dir}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter{hint}")
        if cfg.get("task_type") not in (None, "CAUSAL_LM"):
            raise FormatError(f"{self.dir}: task_type {cfg.get('task_type')!r}; only CAUSAL_LM adapters apply "
                              "to a causal language model")
        for key, what in UNSUPPORTED_OPTIONS.items():
            if cfg.get(key):
                raise FormatError(f"{self.dir}: {what} cannot be merged by pyllm")
        for key, default in PEFT_DEFAULTS.items():  # absent: PEFT's default; given: check_lora_numbers checked it
            cfg.setdefault(key, default)
        if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):  # ("false" was true)
            raise FormatError(f"{self.dir}: adapter_config.json use_rslora must be true, false or null, got "
                              f"{cfg['use_rslora']!r:.60}")
        saved = cfg.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
            raise FormatError(f"{self.dir}: adapter_config.json modules_to_save must be a list of module names or "
                              f"null, got {saved!r:.80}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(cfg.get(key) or {}, dict):
                raise FormatError(f"{self.dir}: adapter_config.json {key} must be an object")
            for pattern in cfg.get(key) or {}:  # pattern_key's re.match said only "error: missing ), ..."
                try:
                    re.compile(PATTERN_RULE.format(pattern))
                except (re.error, RecursionError, OverflowError) as e:  # (parens 5,000 deep; a{99999999999})
                    raise FormatError(f"{self.dir}: adapter_config.json {key} key {pattern!r:.60} is not a regular "
                                      f"expression ({type(e).__name__}: {str(e):.100})") from None

    def _scaling(self, module: str, rank: int, where: str, keys: dict) -> float:
        """keys: the rank_pattern and alpha_pattern key of each module (match_patterns)."""
        cfg = self.config
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        key = keys["rank_pattern"][module]
        expected = ranks[key] if key is not None else cfg["r"]
        if rank != expected:
            raise FormatError(f"{where}: lora_A has rank {rank} but adapter_config.json gives {module} rank {expected}")
        key = keys["alpha_pattern"][module]
        alpha = alphas[key] if key is not None else cfg["lora_alpha"]
        return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    def _read(self, f: SafetensorsFile) -> None:
        parts: dict[str, dict[str, np.ndarray]] = {}
        saved = set(self.config.get("modules_to_save") or [])
        for full in f.tensors:
            if not full.startswith(PEFT_PREFIX):
                raise FormatError(f"{f.path}: tensor '{full}' is not named like a PEFT adapter tensor "
                                  f"('{PEFT_PREFIX}...')")
            name = full[len(PEFT_PREFIX):]
            if "lora_magnitude_vector" in name:
                raise FormatError(f"{f.path}: '{full}' belongs to a DoRA adapter, which pyllm cannot merge")
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)",
                             name)
            if m:
                parts.setdefault(m.group(1), {})[m.group(2)] = load_float32(f, full)
                continue
            if ".original_module." in name:
                continue  # the untrained base module, saved beside its trained copy (resized embeddings)
            if re.search(r"lora_|\.default\.", name):
                raise FormatError(f"{f.path}: tensor '{full}' is of a kind pyllm does not know how to merge")
            target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            value = load_float32(f, full)
            if target in self.replacements and not np.array_equal(self.replacements[target], value):
                raise FormatError(f"{f.path}: holds two different trained copies of '{target}'")
            self.replacements[target] = value
            self.replacement_names[target] = full
            module = target.rsplit(".", 1)[0]
            names = module.split(".")  # (its dotted suffixes looked up: a scan of a long list per tensor took hours)
            if any(".".join(names[k:]) in saved for k in range(len(names))):
                self.saved_modules.add(target)
        # a module PEFT would not wrap: PEFT drops its tensors (and refuses target_modules that match none), so
        # merging them gave another model than PeftModel.from_pretrained (a file whose config says otherwise)
        targeted = targeted_modules(self.config, list(parts), f"{self.dir}: adapter_config.json")
        stray = sorted(set(parts) - targeted)
        if parts and not targeted:
            raise FormatError(f"{self.dir}: adapter_config.json's target_modules {self.config.get('target_modules')!r:.80} "
                              f"(with its exclude_modules and layers_to_transform) match none of the {len(parts)} modules "
                              "the adapter's tensors are for (PEFT refuses such an adapter)")
        if stray:
            raise FormatError(f"{f.path}: holds LoRA tensors for {stray[0]}" + (f" and {len(stray) - 1} other modules"
                              if len(stray) > 1 else "") + ", which adapter_config.json's target_modules, exclude_modules, "
                              "modules_to_save and layers_to_transform leave out (PEFT would not apply them): the "
                              "tensors and the configuration disagree")
        keys = {key: match_patterns(self.config.get(key) or {}, list(parts),
                                    f"{self.dir}: adapter_config.json {key}") for key in ("rank_pattern", "alpha_pattern")}
        for module, p in parts.items():
            where = f"{f.path}: {module}"
            embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
            a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if embedding else \
                (p.get("lora_A.weight"), p.get("lora_B.weight"))
            if a is None or b is None or a.ndim != 2 or b.ndim != 2:
                raise FormatError(f"{where}: needs both a 2-D lora_A and lora_B (found {sorted(p)})")
            if a.shape[0] != b.shape[1]:
                raise FormatError(f"{where}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}: their ranks differ")
            self.modules[module] = LoraModule(module, a, b, self._scaling(module, a.shape[0], where, keys), embedding,
                                              p.get("lora_B.bias"))

    def has_tokenizer(self) -> bool:
        return any(present(os.path.join(self.dir, n)) for n in ("tokenizer.json", "tokenizer.model"))


class LoraMergedSource:
    """A conversion source: a Hugging Face checkpoint with LoRA adapters merged into its weights in float32.

    It offers Checkpoint's interface (config, has, load, tokenizer, ...), so the converter quantizes
    merged weights exactly as it would a plain checkpoint's. Everything is checked on opening."""

    def __init__(self, base: Checkpoint, adapters: list[LoraAdapter]):
        self.base, self.adapters = base, adapters
        self.dir = base.dir
        self.arch = base.arch
        self.embedding, self.lm_head = base.arch.hf_embedding, base.arch.hf_lm_head
        EMBED, LM_HEAD = self.embedding, self.lm_head
        tied = base.config.tie_word_embeddings
        # the ops on each tensor, adapter by adapter: ("set", array) or ("add", LoraModule)
        self._ops: dict[str, list] = {}
        shapes = {n: tuple(base.shape(n)) for n in base.names()}
        if tied and LM_HEAD not in shapes:
            shapes[LM_HEAD] = shapes[EMBED]
        shared = tied  # lm_head and embed_tokens are one tensor
        matrices = sorted({n.rsplit(".", 1)[0] for n in shapes if n.endswith(".weight") and len(shapes[n]) == 2})
        for adapter in adapters:
            own = adapter.saved_modules & {EMBED, LM_HEAD}
            for name, value in adapter.replacements.items():
                self._check_target(adapter, name, shapes)
                self._check_replacement(adapter, name, value, shapes[name])
                for n in self._aliases(name, shared and name not in own):
                    self._ops.setdefault(n, []).append(("set", value))
                    shapes[n] = value.shape
            for lora in adapter.modules.values():
                # a LoRA on one of the tied pair trained on that module alone (see the module's docstring)
                untie = shared and lora.target in (EMBED, LM_HEAD)
                lora.transposed = any(lora.module.endswith("." + m) for m in base.arch.conv1d_modules)
                self._check_target(adapter, lora.target, shapes)
                if lora.target_shape() != tuple(shapes[lora.target]):
                    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if lora.embedding else \
                        ("lora_A.weight", "lora_B.weight")
                    raise FormatError(
                        f"{adapter.weights}: tensors '{PEFT_PREFIX}{lora.module}.{a_name}' and '.{b_name}' "
                        f"(A {list(lora.a.shape)}, B {list(lora.b.shape)}) make an update of shape "
                        f"{list(lora.target_shape())} but the weight it merges into ({base.where(lora.target)}) is "
                        f"{list(shapes[lora.target])}: was the adapter trained on another model?")
                bias = lora.module + ".bias"
                if lora.bias is not None and (bias not in shapes or tuple(shapes[bias]) != lora.bias.shape):
                    raise FormatError(f"{adapter.weights}: {lora.module} has lora_bias, but the base module has "
                                      f"{'no bias' if bias not in shapes else f'a bias of shape {list(shapes[bias])}'}")
                for n in self._aliases(lora.target, shared and not untie and lora.target not in own):
                    self._ops.setdefault(n, []).append(("add", lora))
                if lora.bias is not None:
                    self._ops.setdefault(bias, []).append(("bias", lora))
                if untie:
                    shared = False
            self._check_coverage(adapter, matrices)
            if own:
                shared = False
        self.tied = shared
        vocab = shapes[EMBED][0]
        if not shared and shapes[LM_HEAD][0] != vocab:
            raise FormatError(f"the adapters make embed_tokens {vocab} tokens but lm_head {shapes[LM_HEAD][0]}: "
                              "a resized vocabulary needs both in modules_to_save")
        self.config = dataclasses.replace(base.config, vocab_size=vocab, tie_word_embeddings=shared)
        self.hf_config = dict(base.hf_config, vocab_size=vocab, tie_word_embeddings=shared)
        self._shapes = shapes
        self.tokenizer_dir = next((a.dir for a in reversed(adapters) if a.has_tokenizer()), base.dir)
        if vocab != base.config.vocab_size and self.tokenizer_dir == base.dir:
            raise FormatError(f"the adapters resize the vocabulary from {base.config.vocab_size} to {vocab} tokens "
                              "but carry no tokenizer (tokenizer.json or tokenizer.model in the adapter directory)")
        self.config.validate()

    def _check_coverage(self, adapter: LoraAdapter, matrices: list[str]) -> None:
        """Every module of the base that the adapter's target_modules name has its LoRA tensors: an adapter
        trained on a model of 2 layers merged into one of 3 with a warning about names only, its LoRA in
        2 of the 3 layers (PEFT loads it with those modules' LoRA at zero, warning of missing keys).
        target_modules null or "all-linear" name no list to check against."""
        targets = adapter.config.get("target_modules")
        if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
            return
        named = targeted_modules(adapter.config, matrices, f"{adapter.dir}: adapter_config.json")
        missing = sorted(named - set(adapter.modules) - {n.rsplit(".", 1)[0] for n in adapter.replacements},
                         key=lambda m: [int(x) if x.isdigit() else x for x in m.split(".")])
        if missing:
            raise FormatError(f"{adapter.weights}: no LoRA tensors for {missing[0]}" +
                              (f" and {len(missing) - 1} other modules" if len(missing) > 1 else "") +
                              f", which adapter_config.json's target_modules name in the base model {self.base.dir} "
                              f"({self.base.config.num_hidden_layers} layers): was the adapter trained on another "
                              "model (fewer layers)?")

    def _aliases(self, name: str, shared: bool) -> tuple[str, ...]:
        if shared and name in (self.embedding, self.lm_head):
            return self.embedding, self.lm_head
        return (name,)

    def _check_target(self, adapter: LoraAdapter, name: str, shapes: dict) -> None:
        if name not in shapes:
            layers = self.base.config.num_hidden_layers
            raise FormatError(f"{adapter.dir}: adapter tensor for '{name}' has no counterpart in the base model "
                              f"{self.base.dir} ({self.base.config.architecture}, {layers} layers): "
                              "was the adapter trained on another model?")

    def _check_replacement(self, adapter: LoraAdapter, name: str, value: np.ndarray, shape) -> None:
        """A trained copy (modules_to_save, a bias) must have the shape of the tensor it replaces; only the
        embeddings' and lm_head's rows may differ (a resized vocabulary). `pyllm merge` wrote a copy of
        another model's shape into a checkpoint whose config.json disagrees, exit 0."""
        got, expected = tuple(value.shape), tuple(shape)
        resized = name in (self.embedding, self.lm_head) and len(got) == 2 and got[1:] == expected[1:]
        if got != expected and not resized:
            raise FormatError(f"{adapter.weights}: tensor '{adapter.replacement_names.get(name, name)}', the trained "
                              f"copy of '{name}', has shape {list(got)} but the base model's is {list(expected)}: "
                              "was the adapter trained on another model?")

    def has(self, name: str) -> bool:
        return name in self._shapes and (name != self.lm_head or not self.tied)

    def names(self):
        return (n for n in self._shapes if self.has(n))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    def where(self, name: str) -> str:
        """The base checkpoint's file and tensor of `name`, and the adapters merged into it."""
        source = self.embedding if name == self.lm_head and not self.base.has(self.lm_head) else name
        merged = [a.weights for a in self.adapters if name in a.replacements or
                  any(m.target == name for m in a.modules.values())]
        return self.base.where(source) + (f" (with {', '.join(merged)} merged)" if merged else "")

    def load(self, name: str) -> np.ndarray:
        """The merged tensor in float32."""
        source = self.embedding if name == self.lm_head and not self.base.has(self.lm_head) else name
        w = self.base.load(source)
        for op, value in self._ops.get(name, []):
            if op == "set":
                w = value.astype(np.float32)
            elif op == "add":
                w = w + value.delta()
            else:
                w = w + value.bias * np.float32(value.scaling)
        return w

    def native_format(self, name: str) -> None:
        return None

    def tokenizer(self):
        spec, blob = read_tokenizer(self.tokenizer_dir)
        from ..tokenizer import Tokenizer

        # the largest id + 1, as the converter and pyllm.LLM count (get_vocab_size counts tokens: 403 of them,
        # one with id 5000, passed a 402-row embedding)
        size = Tokenizer(spec, blob).vocab_size
        if size > self.config.vocab_size:
            raise FormatError(f"the tokenizer of {self.tokenizer_dir} has {size} tokens but the merged model's "
                              f"embeddings only {self.config.vocab_size}")
        return spec, blob

    def chat_template(self) -> str:
        return read_chat_template(self.tokenizer_dir) or self.base.chat_template()

    def generation_defaults(self) -> dict:
        return self.base.generation_defaults()

    def close(self) -> None:
        self.base.close()


def merged_source(source, adapter_dirs, log=None) -> LoraMergedSource:
    """The conversion source with the adapters merged (closes the source if they do not fit it); an
    adapter of another base is a warning on log (default stderr)."""
    try:
        if not isinstance(source, Checkpoint):
            raise FormatError("--lora needs a Hugging Face base directory (the float weights the adapter was "
                              "trained on); a GGUF file holds already-quantized weights")
        seen: dict[str, str] = {}
        for d in adapter_dirs:
            real = os.path.realpath(os.fspath(d))
            if real in seen:
                raise FormatError(f"LoRA adapter {os.fspath(d)} is given twice (as {seen[real]} before): merging it "
                                 "again would double its update; give each adapter once")
            seen[real] = os.fspath(d)
        adapters = [LoraAdapter(d) for d in adapter_dirs]
        for adapter in adapters:
            warn_if_other_base(adapter.config, adapter.dir, source.dir, log)
        return LoraMergedSource(source, adapters)
    except BaseException:
        source.close()
        raise


HF_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def write_merged_checkpoint(base_dir: str, adapter_dirs, output: str, dtype: str = "f32") -> str:
    """`pyllm merge`: the base with the adapters merged, written as a Hugging Face directory
    (model.safetensors, config.json, generation_config.json, tokenizer files). The directory appears
    only once complete."""
    if dtype not in HF_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(HF_DTYPES)})")
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        what = "is a directory that is not empty" if os.path.isdir(output) else "exists (the output is a directory)"
        raise FileExistsError(f"{output} {what}; pick a new output path")
    from ..model_cache import partial_dir, remove_stale_partials

    source = merged_source(Checkpoint(base_dir), adapter_dirs)
    tmp = None
    try:
        source.tokenizer()  # refuses a tokenizer larger than the merged vocabulary
        # the files copied beside the weights, regular files (checked before the work): shutil.copyfile copied
        # a tokenizer.model or chat_template.jinja leading to /dev/zero until the disk was full
        candidates = [(os.path.join(source.tokenizer_dir, n), n) for n in TOKENIZER_FILES]
        candidates.append((os.path.join(base_dir, "generation_config.json"), "generation_config.json"))
        copies = [(path, name) for path, name in candidates if present(path)]
        for path, _ in copies:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise FormatError(f"{path} is {file_kind(mode)}, not a regular file")
        # written in a directory of this merge's own (OUTPUT.PID.XXXX.partial): a fixed OUTPUT.partial was
        # emptied by a second merge to the same output while the first wrote in it; those of killed merges go
        remove_stale_partials(output)
        tmp = partial_dir(output)
        def produce(name):
            def run():
                w = source.load(name)
                if dtype == "bf16":
                    return f32_to_bf16_bits(w)
                if dtype == "f16":  # past its range: inf in the file, said "holds NaN or infinite values ... check
                    # the source weights" after numpy's cast warning; convert's message names the range
                    largest = float(np.abs(w).max(initial=0.0))
                    if largest > F16_MAX:
                        raise FormatError(f"{source.where(name)}: the merged weights reach {largest:.3g}, beyond "
                                          f"the float16 range ({F16_MAX:g}): merge with --dtype bf16 or f32")
                    return w.astype(np.float16)
                return w
            return run

        plans = [PlannedTensor(n, HF_DTYPES[dtype], source.shape(n), produce(n)) for n in sorted(source.names())]
        write_atomic(os.path.join(tmp, "model.safetensors"), {"format": "pt"}, plans)
        hf_config = dict(source.hf_config, dtype={"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype])
        hf_config.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, ensure_ascii=False)
        for path, name in copies:
            shutil.copyfile(path, os.path.join(tmp, name))
        try:
            os.rename(tmp, output)  # (replaces an empty directory, never a file or a non-empty one)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            raise FileExistsError(f"{output} appeared while the merge was written (another merge or program "
                                  "wrote it); it is left as it is: pick a new output path") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        source.close()
    return output
