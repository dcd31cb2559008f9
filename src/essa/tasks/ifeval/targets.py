"""SFT targets for generated IFEval-like prompts: a canned answer rewritten to satisfy its instructions.

`kw` maps each instruction family of a prompt to its kwargs (google's IFEval key names).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

REPEAT = "combination:repeat_prompt"
_POSTSCRIPTS = ("Have a great day.", "Thanks for reading.", "Talk to you soon.",
                "Let me know what you think.")


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.?!])\s+", text.strip())


def lay_out(kw: dict[str, dict[str, Any]], response: str) -> str:
    """The answer laid out as bullets, sections or highlighted sentences."""
    parts = _sentences(response)
    if "detectable_format:number_bullet_lists" in kw:
        n = kw["detectable_format:number_bullet_lists"]["num_bullets"]
        return "\n".join(f"* {s}" for s in parts[:n])
    if "detectable_format:multiple_sections" in kw:
        k = kw["detectable_format:multiple_sections"]
        n, spliter = k["num_sections"], k["section_spliter"]
        chunks = [parts[i::n] for i in range(n)]
        return "\n\n".join(f"{spliter} {i + 1}\n{' '.join(c)}" for i, c in enumerate(chunks))
    if "detectable_format:number_highlighted_sections" in kw:
        n = kw["detectable_format:number_highlighted_sections"]["num_highlights"]
        parts = [f"*{s}*" if i < n else s for i, s in enumerate(parts)]
    return " ".join(parts)


def render_target(kw: dict[str, dict[str, Any]], title: str, response: str,
                  rng: random.Random) -> str:
    """A completion that satisfies the instructions in `kw` (family -> kwargs)."""
    text = lay_out(kw, response)
    if "detectable_format:title" in kw:
        text = f"<<{title}>>\n\n{text}"
    if REPEAT in kw:
        text = f"{kw[REPEAT]['prompt_to_repeat']}\n\n{text}"
    if "detectable_content:postscript" in kw:
        marker = kw["detectable_content:postscript"]["postscript_marker"]
        text += f"\n\n{marker} {rng.choice(_POSTSCRIPTS)}"
    if "startend:end_checker" in kw:
        text += f"\n\n{kw['startend:end_checker']['end_phrase']}"
    if "detectable_format:json_format" in kw:
        text = json.dumps({"response": text})
    if "change_case:english_lowercase" in kw:
        text = text.lower()
    if "change_case:english_capital" in kw:
        text = text.upper()
    if "punctuation:no_comma" in kw:
        text = text.replace(",", "")
    if "startend:quotation" in kw:
        # A line break after the opening quote keeps the first bullet at the start of a line.
        text = f'"\n{text}"' if "detectable_format:number_bullet_lists" in kw else f'"{text}"'
    return text
