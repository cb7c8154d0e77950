"""Generate chain-of-thought traces with each packaged instruct model, once, for the reports.

Why. Wong et al. found secondary sinks in the model's *own* long reasoning traces on math
problems (2.5k-16k tokens, generated with vLLM). The project's built-in reasoning texts are
written by hand; these traces are written by the models themselves, from problems written for
this project (``PROBLEMS`` below), so the analyses see the distribution the paper studied.

Decoding (fixed, stored in the output's header line): sampling with temperature 0.6 and top-p
0.95 (DeepSeek-R1's recommended settings, which Wong et al.'s vLLM runs are likely to have
used; their exact settings are not published), a per-problem seed, up to ``--max-new-tokens``
new tokens, the model's chat template where it has one (SmolLM2, Qwen2.5), a plain
"Problem / Solution" prompt otherwise (Gemma 3 270M's GGUF carries no template). Generation
uses transformers' ``generate`` with its KV cache and default (SDPA) attention on the plain
Hugging Face model read from sinkscope's offline cache.

    python scripts/generate_traces.py --model smollm2-135m [--max-new-tokens 3072] [--problems 6]

writes ``circuits/data/traces/<model>.jsonl``: a header line (settings, versions, date), then one
line per problem: id, problem, prompt, generated text, token counts, finish reason, seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.models import cache_root, load_model  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "circuits" / "data" / "traces"
SYSTEM = "You are a careful math tutor. Think step by step, check your work, and end with the final answer."
PROBLEMS = [
    "A bakery sells muffins in boxes of 6 and boxes of 15. A school orders exactly 159 muffins and wants as few boxes as "
    "possible. How many boxes of each size should it order, and how many boxes is that in total?",
    "Two trains leave towns that are 420 km apart at 9:00, heading towards each other. One travels at 85 km/h, the other "
    "at 65 km/h. The slower train stops for 20 minutes at a station on the way. At what time do they meet, and how far "
    "from the faster train's town?",
    "The sum of three consecutive odd numbers is 4 more than twice the largest of them. Find the three numbers, and check "
    "the answer.",
    "A garden is a rectangle 18 m by 12 m with a path of equal width all around the inside edge. The planted area inside "
    "the path is 160 square metres. How wide is the path?",
    "A jar holds red, blue and green marbles in the ratio 3:5:4. After 12 blue marbles are removed and 6 green marbles "
    "are added, the ratio of blue to green is 1:1. How many marbles of each colour were in the jar at first?",
    "How many positive integers below 1000 are divisible by 6 or by 15 but not by 10? Explain the counting carefully.",
    "A shop raises the price of a coat by 25 percent, then puts it on sale at 20 percent off the new price. A customer "
    "also has a coupon for 10 dollars off the sale price and pays 71 dollars. What was the original price?",
    "The average of five test scores is 82. The highest score is 97 and the lowest is 64. The remaining three scores are "
    "consecutive even numbers. What are they?",
]


def prompt_ids(tokenizer, problem: str) -> list[int]:
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = f"Problem: {problem}\n\nSolution: Let's think step by step.\n"
    return tokenizer(text, add_special_tokens=True).input_ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", type=int, default=len(PROBLEMS))
    parser.add_argument("--max-new-tokens", type=int, default=3072)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The bridge wraps its HF model's modules in place (its attention re-implemented, no KV
    # cache), so generation uses a plain transformers model read from the same cache.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402 (after load_model built the cache)

    load_model(args.model)  # builds the offline cache on first use
    folder = cache_root() / args.model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = {k: getattr(args, k) for k in ("model", "max_new_tokens", "temperature", "top_p", "seed")}
    header = {
        "schema": "sinkscope.traces/1", "settings": settings, "system_prompt": SYSTEM,
        "date": dt.date.today().isoformat(), "versions": {p: version(p) for p in ("torch", "transformers")},
        "decoding": "sampling (temperature, top-p), seed + problem index per problem, KV cache, eos or max_new_tokens",
    }
    rows = []
    for i, problem in enumerate(PROBLEMS[: args.problems]):
        ids = prompt_ids(tokenizer, problem)
        torch.manual_seed(args.seed + i)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=True, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, len(ids):].tolist()
        finished = bool(new) and new[-1] == tokenizer.eos_token_id
        rows.append({
            "id": i, "problem": problem, "prompt": tokenizer.decode(ids), "text": tokenizer.decode(new, skip_special_tokens=True),
            "prompt_tokens": len(ids), "new_tokens": len(new), "finish": "eos" if finished else "length",
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(f"{args.model} problem {i}: {len(new)} new tokens ({rows[-1]['finish']}), {rows[-1]['seconds']} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.model}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [header, *rows]) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
