"""Converters into pyllm's packed format. `convert_checkpoint` is what `pyllm convert` runs."""

from .pipeline import ConversionReport, convert_checkpoint, resolve_quant

__all__ = ["ConversionReport", "convert_checkpoint", "resolve_quant"]
