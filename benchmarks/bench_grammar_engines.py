"""llguidance (maxlike's grammar engine) against xgrammar on SmolLM2's tokenizer: JSON-Schema
coverage and host time per token mask, in one run.

    PYTHONPATH=/tmp/xgpkgs .venv/bin/python benchmarks/bench_grammar_engines.py [--json out.json]

xgrammar is not a maxlike dependency (it needs torch at run time); to run this, put it beside the
venv: `.venv/bin/pip install --target /tmp/xgpkgs --no-deps xgrammar apache-tvm-ffi` (torch comes
from the test extra). For each schema and engine: compile time, then --walks random walks (each step
fills the next-token mask, draws a uniformly random allowed token with a fixed seed, and feeds it
back) of at most --steps tokens; the mean mask time per step, and how many finished walks parse and
validate against the schema with `jsonschema` (an engine that ignores a keyword it cannot enforce
produces invalid outputs: that is what coverage counts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SCHEMAS = {
    "nested object": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}, "required": ["b"]}}, "required": ["a"]},
    "array bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    "enum": {"enum": ["red", "green", 7]},
    "number bounds": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 10, "maximum": 20}},
                      "required": ["x"]},
    "string pattern": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
                       "required": ["id"]},
    "string length": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}},
                      "required": ["s"]},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"k": {"type": "boolean"}},
                                                "required": ["k"]}]},
    "$ref / $defs": {"$defs": {"p": {"type": "object", "properties": {"n": {"type": "integer"}},
                                     "required": ["n"]}}, "type": "array", "items": {"$ref": "#/$defs/p"},
                     "minItems": 1},
    "additionalProperties false": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                                   "additionalProperties": False},
    "const": {"type": "object", "properties": {"v": {"const": "fixed"}}, "required": ["v"]},
    "format date": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 2, "uniqueItems": True},
    "if / then": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                  "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    "not": {"not": {"type": "string"}},
}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab, eos):
        from llguidance import LLTokenizer

        self.tok = LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
        self.vocab, self.eos = vocab, eos

    def compile(self, schema):
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if failed:
            raise ValueError("; ".join(messages))
        return grammar

    def walk(self, grammar, rng, steps, times):
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        m, mask, out = LLMatcher(self.tok, grammar), allocate_token_bitmask(1, self.vocab), []
        for _ in range(steps):
            t = time.perf_counter()
            fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - t)
            allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: self.vocab])
            tok = int(rng.choice(allowed))
            if tok == self.eos:
                return out, True
            assert m.consume_token(tok), m.get_error()
            out.append(tok)
            if m.is_stopped():
                return out, True
        return out, False


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab, eos):
        import transformers
        import xgrammar as xgr
        from tokenizers import Tokenizer

        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
            tokenizer.backend_tokenizer.to_str()))
        fast.eos_token_id = eos
        self.info = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(self.info)
        self.vocab, self.eos = vocab, eos

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def walk(self, grammar, rng, steps, times):
        import xgrammar as xgr

        m, mask, out = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, self.vocab), []
        for _ in range(steps):
            t = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t)
            bits = mask[0].numpy().view(np.uint8)
            allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[: self.vocab])
            tok = int(rng.choice(allowed))
            if tok == self.eos:
                return out, True
            assert m.accept_token(tok)
            out.append(tok)
            if m.is_terminated():
                return out, True
        return out, False


def main() -> None:
    import jsonschema

    from maxlike.entrypoints.llm import default_model_path
    from maxlike.weights.loader import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--walks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    vocab, eos = 49152, tokenizer.eos_token_id
    engines = []
    for cls in (LLGuidance, XGrammar):
        t = time.perf_counter()
        try:
            engines.append(cls(tokenizer, vocab, eos))
        except ImportError as e:
            print(f"{cls.name}: not installed ({e}); see the docstring", file=sys.stderr)
            continue
        print(f"{cls.name}: tokenizer ready in {time.perf_counter() - t:.2f} s")
    report = {}
    for label, schema in SCHEMAS.items():
        row = {}
        for engine in engines:
            t = time.perf_counter()
            try:
                grammar = engine.compile(schema)
            except Exception as e:  # noqa: BLE001 - each engine raises its own error types
                row[engine.name] = {"compiles": False, "error": str(e)[:120]}
                continue
            compile_ms = (time.perf_counter() - t) * 1e3
            rng, times, valid, finished = np.random.default_rng(0), [], 0, 0
            for _ in range(args.walks):
                ids, done = engine.walk(grammar, rng, args.steps, times)
                if done:
                    finished += 1
                    try:
                        jsonschema.validate(json.loads(tokenizer.decode(ids)), schema)
                        valid += 1
                    except (json.JSONDecodeError, jsonschema.ValidationError):
                        pass
            row[engine.name] = {"compiles": True, "compile_ms": compile_ms, "finished": finished, "valid": valid,
                                "mask_us_median": statistics.median(times) * 1e6,
                                "mask_us_mean": statistics.fmean(times) * 1e6}
        report[label] = row
        cells = []
        for engine in engines:
            r = row[engine.name]
            cells.append(f"{engine.name}: " + (f"valid {r['valid']}/{r['finished']} finished, compile "
                                               f"{r['compile_ms']:.1f} ms, mask {r['mask_us_median']:.0f} us median"
                                               if r["compiles"] else f"refused ({r['error']})"))
        print(f"{label:28s} " + " | ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
