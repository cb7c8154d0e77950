"""Generate long chain-of-thought sessions with each packaged instruct model, once, for the reports.

Why. Wong et al. found secondary sinks in the model's *own* long reasoning traces on math
problems (2.5k-16k tokens, generated with vLLM). The project's built-in reasoning texts are
written by hand; these traces are written by the models themselves, from problems written for
this project (``PROBLEMS`` below), so the analyses see the distribution the paper studied.

Why sessions. A small model answers one problem in 270-410 tokens and stops (measured with
this script's single-problem version: SmolLM2-135M 271-338 tokens, Qwen2.5-Coder-0.5B 406), far
short of the thousands of tokens the paper analyses. A *session* is one conversation in which
the user poses the problems one after another ("Next problem: ...") and the model answers each
in turn, every answer conditioned on the whole conversation so far; the session ends once it
holds ``--target-tokens`` tokens (or the model's context is full). The trace is the whole
conversation as the model saw it: chat template, problems and its own answers.

Decoding (fixed, stored in the output's header line): sampling with temperature 0.6 and top-p
0.95 (DeepSeek-R1's recommended settings, which Wong et al.'s vLLM runs are likely to have
used; their exact settings are not published), seed ``--seed + 1000 * session + turn`` per
turn, at most ``--max-new-tokens`` per answer, the model's chat template where it has one
(SmolLM2, Qwen2.5), a plain "Problem / Solution" transcript otherwise (Gemma 3 270M's GGUF
carries no template). Session ``s`` takes the problems in turn starting at problem ``s``, and
poses them a second time if it is still short after all of them.
Generation uses transformers' ``generate`` on the plain Hugging Face model read from
sinkscope's offline cache, default (SDPA) attention, with one KV cache per session kept across
turns (only the new user turn is prefilled).

    python scripts/generate_traces.py --model smollm2-135m --target-tokens 1024 1024 1024 1024 1024 8192

(one session per target; the file is rewritten after every session, and a re-run with the same
settings, or with more targets after the same ones, keeps the sessions already there, so an
interrupted run resumes and a file can be extended)

    python scripts/generate_traces.py --model qwen2.5-coder-0.5b --system empty --target-tokens ...

(the control sessions: the same problems, decoding and seeds with an empty system message,
written to ``<model>.empty-system.jsonl``; chat models only)

writes ``circuits/data/traces/<model>.jsonl``: a header line (settings, versions, date), then one
line per session: id, the problems posed, every turn (tokens, finish reason, seconds), the
whole conversation's ``token_ids`` (what the analyses read, exactly) and its text.
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
from circuits.parts import NEXT_PROBLEM, PLAIN_ANSWER_END, PLAIN_TURN  # noqa: E402 (the layout circuits.parts reads back)

OUT = Path(__file__).resolve().parents[1] / "circuits" / "data" / "traces"
SYSTEM = "You are a careful math tutor. Think step by step, check your work, and end with the final answer."
#: ``--system``: the system message of the sessions (``empty``: the control sessions, which tell the prompt's sinks from the model's own)
SYSTEM_PROMPTS = {"project": SYSTEM, "empty": ""}
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
    "A cyclist rides 36 km at 18 km/h and returns the same way at 12 km/h. What is her average speed for the whole trip? "
    "Explain why it is not 15 km/h.",
    "A tank is filled by one pipe in 6 hours and by a second pipe in 9 hours; a drain empties it in 12 hours. With both "
    "pipes open and the drain open, how long does it take to fill the empty tank?",
    "Find all whole numbers n between 1 and 50 for which n squared plus n plus 41 is not a prime number.",
    "A class of 30 students took a test. The boys averaged 72 and the girls averaged 81, and the class average was 77.4. "
    "How many boys and how many girls are in the class?",
    "A ladder 10 m long leans against a wall with its foot 6 m from the wall. The foot slides 2 m further out. How far "
    "down the wall does the top slide?",
    "What is the remainder when 7 to the power 100 is divided by 13? Show the pattern of remainders you use.",
    "A rectangle has perimeter 46 cm and diagonal 17 cm. Find its length and width.",
    "Three friends share a bill. Ann pays twice what Ben pays, and Cal pays 8 dollars more than Ben. Together they pay "
    "92 dollars. How much does each pay?",
    "A number leaves remainder 2 when divided by 3, remainder 3 when divided by 5, and remainder 2 when divided by 7. "
    "What is the smallest such positive number?",
    "A car's value falls by 15 percent each year. After how many full years is it worth less than half of its price "
    "when new?",
    "In a sequence each term is the sum of the two before it. The 3rd term is 7 and the 6th term is 31. Find the first "
    "two terms.",
    "A farmer has 120 m of fence to make a rectangular pen against a long barn wall, fencing only three sides. What "
    "dimensions give the largest area, and what is that area?",
    "How many ways can 5 different books be arranged on a shelf if two particular books must not stand next to each "
    "other?",
    "A boat goes 24 km downstream in 2 hours and takes 3 hours to come back upstream. Find the speed of the boat in "
    "still water and the speed of the current.",
    "The digits of a two-digit number add up to 11. Reversing the digits gives a number 27 larger. What is the number?",
    "A box contains 4 red and 6 blue balls. Two balls are drawn without replacement. What is the probability that they "
    "are the same colour?",
]


def conversation_ids(tokenizer, problems: list[str], answers: list[str], system: str = SYSTEM) -> list[int]:
    """The conversation's tokens: every problem so far with the answers given; while the last
    problem has no answer yet, up to the generation prompt of the model's next answer, else the
    whole conversation (the stored trace). ``system`` is the system message's text; an empty one
    is still passed as a message, since a template inserts its own default system prompt when
    the message is absent (Qwen2.5's and SmolLM2's both do)."""
    pending = len(answers) < len(problems)
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}]
        for i, problem in enumerate(problems):
            messages.append({"role": "user", "content": problem if i == 0 else NEXT_PROBLEM.format(problem=problem)})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=pending, tokenize=True, return_dict=False))
    text = ""
    for i, problem in enumerate(problems):
        text += PLAIN_TURN.format(number=i + 1, problem=problem)
        if i < len(answers):
            text += answers[i].strip() + PLAIN_ANSWER_END
    return tokenizer(text, add_special_tokens=True).input_ids


def reuse(cache, cached: list[int], ids: list[int]):
    """Keep the cache's longest prefix that the new conversation shares (at least one token of
    ``ids`` must stay uncached for ``generate``); ``None`` when nothing can be kept."""
    if cache is None:
        return None
    common = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        common += 1
    keep = min(common, len(ids) - 1, cache.get_seq_length())
    if keep <= 0:
        return None
    cache.crop(keep - cache.get_seq_length())  # transformers 5: a negative count of tokens to remove
    return cache


def session(hf, tokenizer, index: int, args, n_ctx: int) -> dict:
    from transformers import DynamicCache  # noqa: E402 (after load_model built the cache)

    # every problem once, then again from the start (posed as a second look) if the session is still short
    order = [PROBLEMS[(index + j) % len(PROBLEMS)] for j in range(len(PROBLEMS))]
    order += [f"Let's look again at an earlier one, a different way. {p}" for p in order]
    problems, answers, turns = [], [], []
    cache, cached = None, []
    target = min(args.target_tokens[index], n_ctx)
    configured = hf.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    for turn, problem in enumerate(order):
        problems.append(problem)
        ids = conversation_ids(tokenizer, problems, answers, args.system_text)
        room = min(args.max_new_tokens, n_ctx - len(ids))
        if room < 16:
            problems.pop()
            break
        cache = reuse(cache, cached, ids) or DynamicCache()
        torch.manual_seed(args.seed + 1000 * index + turn)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), past_key_values=cache, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=room, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                              return_dict_in_generate=True)
        seq = out.sequences[0].tolist()
        cache, cached = out.past_key_values, seq
        new = seq[len(ids):]
        finished = bool(new) and new[-1] in eos
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
        turns.append({"problem": problem, "prompt_tokens": len(ids), "new_tokens": len(new), "finish": "eos" if finished else "length",
                      "seconds": round(time.perf_counter() - start, 1)})
        print(f"{args.model} session {index} turn {turn}: {len(ids)} + {len(new)} tokens ({turns[-1]['finish']}), {turns[-1]['seconds']} s", flush=True)
        if len(seq) >= target:
            break
    ids = conversation_ids(tokenizer, problems, answers, args.system_text)[:n_ctx]
    return {"id": index, "problems": problems, "turns": turns, "n_tokens": len(ids), "token_ids": ids,
            "text": tokenizer.decode(ids), "seconds": round(sum(t["seconds"] for t in turns), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--target-tokens", type=int, nargs="+", default=[1024, 1024, 1024, 1024, 1024, 8192],
                        help="one session per value: it ends once the conversation holds that many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="per answer")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: decoding one token at a time is latency-bound, and on a shared machine "
                             "two threads waiting on each other ran 19 x slower than alone)")
    parser.add_argument("--system", choices=SYSTEM_PROMPTS, default="project",
                        help="the system message: the project's tutor prompt, or an empty one (the control sessions, "
                             "written to <model>.empty-system.jsonl); a model without a chat template has no system message")
    args = parser.parse_args()
    args.system_text = SYSTEM_PROMPTS[args.system]
    torch.set_num_threads(args.threads)
    # The bridge wraps its HF model's modules in place (its attention re-implemented, no KV
    # cache), so generation uses a plain transformers model read from the same cache.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402 (after load_model built the cache)

    bridge = load_model(args.model)  # builds the offline cache on first use
    n_ctx = int(bridge.cfg.n_ctx)
    del bridge
    folder = cache_root() / args.model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.system != "project" and not tokenizer.chat_template:
        parser.error(f"{args.model} has no chat template, so no system message to change (--system {args.system})")
    settings = {k: getattr(args, k) for k in ("model", "target_tokens", "max_new_tokens", "temperature", "top_p", "seed", "system")}
    header = {
        "schema": "sinkscope.traces/2", "settings": settings, "system_prompt": args.system_text, "context": n_ctx,
        "date": dt.date.today().isoformat(), "versions": {p: version(p) for p in ("torch", "transformers")},
        "torch_threads": torch.get_num_threads(),
        "decoding": "multi-turn session; sampling (temperature, top-p), seed + 1000 * session + turn; KV cache kept across turns; "
                    "an answer ends at eos or max_new_tokens; the session ends at target_tokens or the context",
        "bos": "as the model's own tokenizer / chat template produce it",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / (f"{args.model}.jsonl" if args.system == "project" else f"{args.model}.{args.system}-system.jsonl")
    rows = []
    if path.is_file():  # resume: keep the sessions a run with the same settings already wrote
        old_header, *old_rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        old = old_header.get("settings", {})
        old = {"system": "project", **old}  # files written before --system existed used the project's prompt
        same = {k: v for k, v in old.items() if k != "target_tokens"} == {k: v for k, v in settings.items() if k != "target_tokens"}
        if same and old.get("target_tokens") == settings["target_tokens"][: len(old.get("target_tokens", []))]:
            rows = old_rows[: len(args.target_tokens)]
    for s in range(len(rows), len(args.target_tokens)):
        rows.append(session(hf, tokenizer, s, args, n_ctx))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [header, *rows]) + "\n")
        tmp.replace(path)
        print(f"wrote {path}: " + ", ".join(f"{r['n_tokens']} tokens" for r in rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
