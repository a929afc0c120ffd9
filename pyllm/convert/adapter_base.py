"""Does an adapter belong to the base it is merged into or stored with? adapter_config.json names the
model it was trained on (base_model_name_or_path); the base names itself by its config's _name_or_path
or its directory. When both are known and differ, the conversion goes on with a warning, for LoRA and
prompt-learning adapters alike: an adapter trained on SmolLM2-135M used with SmolLM2-135M-Instruct gives
a model nobody trained, but PEFT loads it without a word, names differ for harmless reasons (a local
copy, a renamed directory), and the tensors' shapes, which are checked, tell a model of another shape
(another hidden size, layer or kv-head count is always an error)."""

from __future__ import annotations

import os
import sys

from .checkpoint import present


def adapter_config_path(directory: str, what: str) -> str:
    """directory/adapter_config.json, once directory is a non-empty path to a directory holding it as a
    regular file (FileNotFoundError saying which is not so; what: "LoRA adapter", "adapter"). An empty
    path (`--adapter name=`, `--lora ''`) read the current directory's name as ''; a directory named
    adapter_config.json was a bare "[Errno 21] Is a directory"."""
    if not directory:
        raise FileNotFoundError(f"the {what} directory is an empty path; give the PEFT adapter directory")
    if not os.path.isdir(directory):
        if os.path.isfile(directory) and directory.lower().endswith(".gguf"):  # llama.cpp's adapter files
            raise FileNotFoundError(f"{what} {directory} is a GGUF file; pyllm reads adapters in PEFT's format: give "
                                    "the directory holding adapter_config.json and adapter_model.safetensors")
        raise FileNotFoundError(f"{what} {directory} is not a directory")
    path = os.path.join(directory, "adapter_config.json")
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a directory, not the adapter's configuration file")
    if present(path) and not os.path.isfile(path):  # a FIFO, a device: "has no adapter_config.json"
        raise FileNotFoundError(f"{path} is not a regular file, not the adapter's configuration file")
    if not os.path.isfile(path):
        # PEFT's save_pretrained puts every adapter but "default" in a subdirectory named after it
        try:  # (not a hidden one: pyllm train's .adapter.PID.XXXX.partial, left by a killed run, was offered)
            inside = sorted(n for n in os.listdir(directory)
                            if not n.startswith(".") and os.path.isfile(os.path.join(directory, n, "adapter_config.json")))
        except OSError:
            inside = []
        if inside:
            shown = ", ".join(os.path.join(directory, n) for n in inside[:5]) + (" ..." if len(inside) > 5 else "")
            raise FileNotFoundError(f"{directory} has no adapter_config.json, but its subdirectories hold PEFT "
                                    f"adapters (saved under their names): give one of {shown}")
        raise FileNotFoundError(f"{directory} has no adapter_config.json: is it a PEFT adapter directory?")
    return path


def adapter_weights_path(directory: str) -> str:
    """directory/adapter_model.safetensors (LoRA and prompt-learning adapters alike): FormatError for
    an adapter saved only as adapter_model.bin (a pickle, never read), FileNotFoundError without either."""
    weights = os.path.join(directory, "adapter_model.safetensors")
    if not present(weights):
        if present(os.path.join(directory, "adapter_model.bin")):
            from ..formats.safetensors import FormatError

            raise FormatError(f"{directory}: adapter_model.bin (a PyTorch pickle) is not read; save the adapter "
                              "with safe_serialization=True (PEFT's default) to get adapter_model.safetensors")
        raise FileNotFoundError(f"{directory} has no adapter_model.safetensors")
    return weights


def _name(value: str) -> str:
    """The comparable part of a model id or path: its last component, lowercased."""
    return os.path.basename(os.path.normpath(value.strip())).lower()


def base_names(base_dir: str) -> set[str]:
    """The names the base answers to: its directory's name and its config's _name_or_path."""
    names = {_name(os.path.abspath(base_dir))}
    from .checkpoint import _read_json

    try:
        declared = _read_json(os.path.join(base_dir, "config.json")).get("_name_or_path")
    except (OSError, ValueError):  # (FormatError, bounded size, is a ValueError)
        declared = None
    if isinstance(declared, str) and declared.strip():
        names.add(_name(declared))
    return names


def other_base(adapter_config: dict, base_dir: str) -> str | None:
    """The model an adapter (LoRA or prompt learning) says it was trained on, when that is not the
    Hugging Face directory base_dir; None when it is, or when the adapter does not say."""
    trained_on = adapter_config.get("base_model_name_or_path")
    if not isinstance(trained_on, str) or not trained_on.strip():
        return None
    if _name(trained_on) in (".", "..", "/", ""):  # trained as `pyllm train .` (PEFT writes the path as given):
        return None  # relative to a directory the adapter does not record, it names no model (it warned)
    if os.path.abspath(trained_on) == os.path.abspath(base_dir) or _name(trained_on) in base_names(base_dir):
        return None
    return trained_on


def other_base_warning(adapter_config: dict, adapter_dir: str, base_dir: str, kind: str = "LoRA") -> str | None:
    """The warning when the adapter says it was trained on another model than base_dir, else None
    (also when the adapter does not say). kind: "LoRA" (merged into the base) or "prompt-learning"
    (stored beside it)."""
    trained_on = other_base(adapter_config, base_dir)
    if trained_on is None:
        return None
    names = base_names(base_dir)
    used = "merged into" if kind == "LoRA" else "run on"
    # (names cut to 200 characters: the file's and the base config's are any length, and were printed whole)
    return (f"warning: the {kind} adapter {adapter_dir} was trained on {trained_on!r:.200}, but the base {base_dir} is "
            f"{' / '.join(f'{n!r:.200}' for n in sorted(names))}; {used} another model it is unlikely to work")


def warn_if_other_base(adapter_config: dict, adapter_dir: str, base_dir: str, log=None, kind: str = "LoRA") -> None:
    """Prints other_base_warning on log (default stderr) when there is one."""
    message = other_base_warning(adapter_config, adapter_dir, base_dir, kind)
    if message:
        print(f"pyllm: {message}", file=log or sys.stderr)
