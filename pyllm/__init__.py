"""pyllm: a quantized LLM runtime for Python.

    llm = pyllm.LLM("model.pllm")
    print(llm.generate("The capital of France is", max_new_tokens=16))
"""

__version__ = "0.1.0"

from .llm import LLM  # noqa: E402

__all__ = ["LLM", "__version__"]
