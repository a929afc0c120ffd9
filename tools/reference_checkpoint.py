"""A Hugging Face checkpoint of a GGUF model made by transformers' own GGUF loader (needs torch, transformers).

Used by the real-model tests and the quality benchmark as the fp32 reference; cached under the
pyllm cache directory so it is built once (about half a minute on 2 cores).
"""

from __future__ import annotations

import os
import shutil


def reference_checkpoint(gguf_path: str, directory: str) -> str:
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import torch
    import transformers

    tmp = directory + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models until the quantizer marks are cleared
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def default_reference_checkpoint() -> str:
    """The reference checkpoint of pyllm's default model (SmolLM2-135M-Instruct)."""
    from pyllm import default_model

    return reference_checkpoint(default_model.fetch_gguf(),
                                os.path.join(default_model.cache_dir(), "test-cache", "smollm2-135m-instruct-hf"))
