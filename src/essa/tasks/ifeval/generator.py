"""The offline IFEval-like prompt generator: an everyday request plus verifiable instructions.

A request from `request_bank` gets 1..`max_instructions` non-conflicting instructions whose
natural-language text is appended to it; kwargs follow google's IFEval. Each prompt carries an
SFT target (`targets.render_target`) that satisfies its instructions: kwargs that depend on the
answer's length or wording are read off the finished target.
"""

from __future__ import annotations

import copy
import functools
import random
import re
from typing import Any, Callable

from essa.tasks.base import Example
from essa.tasks.ifeval.checks import IfevalItem, count_sentences, count_words, instruction_holds
from essa.tasks.ifeval.request_bank import Request
from essa.tasks.ifeval.targets import REPEAT, lay_out, render_target

_END_PHRASES = ("Any other questions?", "Is there anything else I can help with?",
                "Let me know if you have any questions.", "Hope this helps.")
_FORBIDDEN_CANDIDATES = ("very", "really", "just", "thing", "good", "great", "nice", "also",
                         "maybe", "always", "never", "today", "happy", "time", "lot", "many")
_STOPWORDS = {"about", "after", "again", "before", "being", "could", "every", "their",
              "there", "these", "those", "would", "which", "while", "where", "other",
              "should", "thank", "please", "something", "through", "because", "cannot"}

# Each generator family: how its text reads, given its kwargs. Kwargs follow google's IFEval.
_TEXTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "punctuation:no_comma": lambda k: "Do not use any commas in your response.",
    "change_case:english_lowercase": lambda k: (
        "Your entire response should be in English and in all lowercase letters. "
        "No capital letters are allowed."),
    "change_case:english_capital": lambda k: (
        "Your entire response should be in English and in all capital letters."),
    "detectable_format:number_bullet_lists": lambda k: (
        f"Your answer must contain exactly {k['num_bullets']} bullet points. "
        "Use markdown bullet points such as: * This is a point."),
    "startend:end_checker": lambda k: (
        f"Finish your response with this exact phrase: {k['end_phrase']} "
        "No other words should follow this phrase."),
    "startend:quotation": lambda k: "Wrap your entire response with double quotation marks.",
    "keywords:existence": lambda k: (
        f"Include the {_plural('keyword', k['keywords'])} {_join(k['keywords'], 'and')} "
        "in the response."),
    "keywords:forbidden_words": lambda k: (
        f"Do not include the {_plural('word', k['forbidden_words'])} "
        f"{_join(k['forbidden_words'], 'or')} in the response."),
    "length_constraints:number_words": lambda k: (
        f"Answer with {k['relation']} {k['num_words']} words."),
    "length_constraints:number_sentences": lambda k: (
        f"Your response should contain {k['relation']} {k['num_sentences']} sentences."),
    "detectable_format:title": lambda k: (
        "Your answer must contain a title wrapped in double angular brackets such as "
        "<<poem of joy>>."),
    "detectable_content:postscript": lambda k: (
        "At the end of your response please explicitly add a postscript starting with "
        f"{k['postscript_marker']}"),
    "detectable_format:number_highlighted_sections": lambda k: (
        f"Highlight at least {k['num_highlights']} {_plural('section', k['num_highlights'])} "
        "in your answer with markdown such as *highlighted section*."),
    "detectable_format:multiple_sections": lambda k: (
        f"Your response must have {k['num_sections']} sections. Mark the beginning of each "
        f"section with {k['section_spliter']} X such as {k['section_spliter']} 1."),
    "detectable_format:json_format": lambda k: (
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."),
    "combination:repeat_prompt": lambda k: (
        "First repeat the request word for word without change, then give your answer "
        "(1. do not say any words or characters before repeating the request; 2. the request "
        "you need to repeat does not include this sentence)"),
}
GENERATOR_FAMILIES: tuple[str, ...] = tuple(_TEXTS)
# Kwargs read off the finished target (so the target satisfies them). These never combine with
# repeat_prompt (the library's conflict table forbids it), whose target repeats the prompt text.
_MEASURED = ("keywords:forbidden_words", "length_constraints:number_words",
             "length_constraints:number_sentences")
_LANGDETECT_FAMILIES = {"change_case:english_lowercase", "change_case:english_capital"}
# Pairs the library allows but whose markdown interferes (a highlighted or section line would
# count as a bullet; section markers are case-sensitive).
_EXTRA_CONFLICTS = (
    ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"),
    ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections"),
    ("detectable_format:multiple_sections", "change_case:english_lowercase"),
    ("detectable_format:multiple_sections", "change_case:english_capital"),
)


def _plural(word: str, items: Any) -> str:
    count = items if isinstance(items, int) else len(items)
    return word if count == 1 else word + "s"


def _join(words: list[str], conj: str) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" {conj} {words[-1]}"


@functools.lru_cache(maxsize=None)
def conflicts() -> dict[str, frozenset[str]]:
    """Symmetric conflicts among the generator families: the library's table plus ours."""
    from if_verifiable.ifeval import instructions_registry as registry

    table = registry.conflict_make(copy.deepcopy(registry.INSTRUCTION_CONFLICTS))
    out = {f: set(table[f]) & set(GENERATOR_FAMILIES) for f in GENERATOR_FAMILIES}
    for a, b in _EXTRA_CONFLICTS:
        out[a].add(b)
        out[b].add(a)
    return {f: frozenset(c) for f, c in out.items()}


def draw_instructions(rng: random.Random, max_instructions: int) -> list[str]:
    """1..max_instructions distinct, mutually compatible families; repeat_prompt goes last."""
    ids: list[str] = []
    for _ in range(rng.randint(1, max_instructions)):
        allowed = [f for f in GENERATOR_FAMILIES
                   if f not in ids and not any(f in conflicts()[g] for g in ids)]
        if not allowed:
            break
        ids.append(rng.choice(allowed))
    return sorted(ids, key=lambda f: f == REPEAT)


def _keywords(response: str) -> list[str]:
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", response)}
    return sorted(w for w in words if len(w) >= 5 and w not in _STOPWORDS)


def _structural_kwargs(rng: random.Random, family: str, response: str) -> dict[str, Any]:
    """Kwargs fixed before the target is written."""
    if family == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.choice([2, 3])}
    if family == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(["Section", "SECTION"]),
                "num_sections": rng.choice([2, 3])}
    if family == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.choice([1, 2])}
    if family == "startend:end_checker":
        return {"end_phrase": rng.choice(_END_PHRASES)}
    if family == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(["P.S.", "P.P.S"])}
    if family == "keywords:existence":
        return {"keywords": rng.sample(_keywords(response), rng.choice([1, 2]))}
    return {}


def _measured_kwargs(rng: random.Random, family: str, target: str) -> dict[str, Any]:
    """Kwargs chosen from the finished target, so it satisfies them with a small margin."""
    if family == "keywords:forbidden_words":
        absent = [w for w in _FORBIDDEN_CANDIDATES
                  if not re.search(rf"\b{w}\b", target, flags=re.IGNORECASE)]
        return {"forbidden_words": rng.sample(absent, rng.choice([1, 2]))}
    if family == "length_constraints:number_words":
        n = count_words(target)
        upper = [x for x in (30, 40, 50, 60, 80, 100, 150, 200) if x > n][:2]
        if upper and rng.random() < 0.75:  # mostly upper bounds: short answers suit a small model
            return {"relation": "less than", "num_words": rng.choice(upper)}
        return {"relation": "at least",
                "num_words": rng.choice([x for x in (5, 10, 15, 20, 25, 30) if x <= n][-2:])}
    if family == "length_constraints:number_sentences":
        n = count_sentences(target)
        if rng.random() < 0.6:
            return {"relation": "less than", "num_sentences": rng.choice([n + 1, n + 2])}
        return {"relation": "at least", "num_sentences": rng.choice(sorted({max(1, n - 1), n}))}
    return {}


def make_example(rng: random.Random, bank: tuple[Request, ...],
                 max_instructions: int = 2, source: str = "generated") -> Example:
    """One IFEval-like prompt from `bank`, with an SFT target that satisfies it.

    The case checkers also require langdetect to read the text as English, and langdetect
    sometimes misreads short upper-case text; such drafts are checked and redrawn.
    """
    while True:
        example = _draft(rng, bank, max_instructions, source)
        ids = set(example.answer.instruction_ids) & _LANGDETECT_FAMILIES
        if all(instruction_holds(f, example.target) for f in ids):
            return example


def _draft(rng: random.Random, bank: tuple[Request, ...],
           max_instructions: int, source: str) -> Example:
    request, title, response = rng.choice(bank)
    ids = draw_instructions(rng, max_instructions)
    kw = {f: _structural_kwargs(rng, f, response) for f in ids if f != "keywords:existence"}
    if "keywords:existence" in ids:
        # Keywords come from the laid-out answer: bullets keep only some of its sentences.
        kw["keywords:existence"] = _structural_kwargs(rng, "keywords:existence",
                                                      lay_out(kw, response))
    kw = {f: kw[f] for f in ids}
    texts = {f: _TEXTS[f](kw[f]) for f in ids if f not in _MEASURED}
    if REPEAT in kw:
        before = [request] + [texts[f] for f in ids if f != REPEAT]
        kw[REPEAT] = {"prompt_to_repeat": " ".join(before)}
    target = render_target(kw, title, response, rng)
    for f in ids:
        if f in _MEASURED:
            kw[f] = _measured_kwargs(rng, f, target)
            texts[f] = _TEXTS[f](kw[f])
    prompt = " ".join([request] + [texts[f] for f in ids])
    item = IfevalItem.build(source, ids, [kw[f] for f in ids])
    return Example(prompt=prompt, answer=item, target=target,
                   meta={"source": source, "request": request})

