"""Decode speed with a JSON schema enforced (llguidance) against unconstrained decoding.

    python benchmarks/structured_overhead.py [model.pllm] [-t THREADS] [-r REPS] [-n TOKENS]

The grammar's mask for the next token is computed in a worker thread while the engine runs the
current step (pyllm/structured.py), so the constrained rate should stay within a few percent of the
unconstrained one. Both runs use the same prompt, greedy decoding, and the model's default
template; the rate is GenerationStats.decode_tokens_per_second (median over the repetitions).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import pyllm
from pyllm.default_model import default_model_path

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 12},
        "rating": {"enum": ["good", "bad", "neutral"]},
        "details": {"type": "object", "properties": {"year": {"type": "integer"}, "summary": {"type": "string"}},
                    "required": ["year", "summary"]},
    },
    "required": ["title", "tags", "rating", "details"],
}
MESSAGES = [{"role": "user", "content": "Describe the film Casablanca as JSON with a title, many tags, a rating "
                                        "and details."}]


def rate(llm, tokens: int, **options) -> tuple[float, int]:
    llm.chat(MESSAGES, max_new_tokens=tokens, temperature=0, **options)
    stats = llm.last_stats
    return stats.decode_tokens_per_second, stats.generated_tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-n", "--tokens", type=int, default=128)
    args = p.parse_args()
    llm = pyllm.LLM(args.model or default_model_path(), n_threads=args.threads)
    fmt = {"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}}
    rate(llm, 8)  # warm-up (and llguidance's tokenizer, built once)
    rate(llm, 8, response_format=fmt)
    free, constrained = [], []
    for _ in range(args.repetitions):  # alternating, so that drift affects both alike
        free.append(rate(llm, args.tokens))
        constrained.append(rate(llm, args.tokens, response_format=fmt))
    f = statistics.median(r for r, _ in free)
    c = statistics.median(r for r, _ in constrained)
    print(f"{llm.path}, {llm.n_threads} threads, {args.repetitions} repetitions (median decode t/s)")
    print(f"unconstrained: {f:.1f} t/s ({statistics.median(n for _, n in free):.0f} tokens)")
    print(f"JSON schema:   {c:.1f} t/s ({statistics.median(n for _, n in constrained):.0f} tokens)")
    print(f"ratio:         {c / f:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
