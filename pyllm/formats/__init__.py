"""File formats: the safetensors container, pyllm's packed model file, GGUF import."""
