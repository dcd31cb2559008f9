"""Glue to `if-verifiable`'s IFEval and IFBench checkers: scoring one completion, and the counts
they use.

The checkers give the same verdict on every machine, whether or not nltk's punkt_tab data is
installed (see `_prepare_checkers`). The library counts sentences with nltk's trained punkt model
and word-tokenizes (`change_case:capital_word_frequency`) after a punkt sentence pass; both need
that data, which no install step provides, and a machine without it used to score differently.
So the checkers never read nltk data:
- sentences (`length_constraints:number_sentences`) come from an untrained
  `PunktSentenceTokenizer()`. It knows no abbreviations: "Dr. Smith arrived. He sat down." is
  three sentences here, two for IFEval's reference tokenizer with punkt data, so an IFEval score
  published with that data may differ slightly from ours.
- words are nltk's Treebank tokens of the whole text, without the sentence pass.
- `length_constraints:number_words` counts runs of word characters, as the library does.
langdetect, used by the case and language checkers, is seeded so a reward is deterministic. So is
Python's `random` while a completion is scored: a checker whose kwargs are missing or invalid draws
them at random (IFEval's letter_frequency with the letter "!" or "#", 2 of its 541 prompts, scored
the same completion 0 or 1 from one run to the next); the caller's random state is restored after.

IFBench's checkers (`IfevalItem.benchmark == "ifbench"`) get the same word tokens. Its module
downloads nltk data when imported; here that download is switched off (no network at run time),
and the two IFBench instructions whose verdict needs data no install step provides (a stopword
corpus, a part-of-speech tagger: `IFBENCH_NEEDS_NLTK_DATA`) are left out of the benchmark by
the loader rather than scored differently on different machines.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from if_verifiable import EvaluationScores


# IFBench instructions whose checkers read nltk data (stopwords corpus, perceptron POS tagger).
IFBENCH_NEEDS_NLTK_DATA = frozenset({"ratio:stop_words", "words:start_verb"})


@dataclass(frozen=True)
class IfevalItem:
    """What a reward needs: instruction ids, their kwargs (as JSON: stays hashable) and the
    benchmark whose checkers they name."""

    key: str
    instruction_ids: tuple[str, ...]
    kwargs_json: str
    benchmark: str = "ifeval"

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        return json.loads(self.kwargs_json)

    @classmethod
    def build(cls, key: Any, ids: list[str], kwargs: list[dict[str, Any]],
              benchmark: str = "ifeval") -> IfevalItem:
        return cls(str(key), tuple(ids), json.dumps(kwargs), benchmark)


@functools.lru_cache(maxsize=None)
def _prepare_checkers() -> None:
    """Make the library's checkers deterministic and independent of nltk data; runs once per process."""
    import langdetect
    from if_verifiable.ifeval import instructions_util

    # langdetect samples n-grams at random unless seeded: unseeded, a reward could flip.
    langdetect.DetectorFactory.seed = 0
    # Always, not only where punkt_tab is missing: installed data would change the verdicts.
    # Only the if_verifiable.ifeval module is redirected; nltk itself stays untouched.
    instructions_util._get_sentence_tokenizer = _untrained_sentence_tokenizer
    instructions_util.nltk = _NltkWithoutPunkt()


@functools.lru_cache(maxsize=None)
def _prepare_ifbench_checkers() -> None:
    """Import IFBench's checkers without their nltk download and with the same word tokens."""
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # its module fetches nltk data when imported
    try:
        from if_verifiable.ifbench import instructions_registry, instructions_util  # noqa: F401
    finally:
        nltk.download = download
    instructions_util._get_sentence_tokenizer = _untrained_sentence_tokenizer
    instructions_util.nltk = _NltkWithoutPunkt()


@functools.lru_cache(maxsize=None)
def _untrained_sentence_tokenizer() -> Any:
    import nltk

    return nltk.tokenize.PunktSentenceTokenizer()


class _NltkWithoutPunkt:
    """nltk, except that word_tokenize skips its punkt sentence pass (it would read punkt_tab)."""

    def __getattr__(self, name: str) -> Any:
        import nltk

        return getattr(nltk, name)

    @staticmethod
    def word_tokenize(text: str, language: str = "english",
                      preserve_line: bool = False) -> list[str]:
        import nltk

        return nltk.word_tokenize(text, language=language, preserve_line=True)


@functools.lru_cache(maxsize=4096)
def evaluate(completion: str, item: IfevalItem, prompt: str) -> EvaluationScores:
    """IFEval's four scores (partial/binary x strict/loose) of one completion.

    Cached: evaluation asks for the reward and the extra metrics of the same completion.
    """
    from if_verifiable import IFBenchSample, IFEvalSample, evaluate_output_for_sample

    _prepare_checkers()
    if item.benchmark == "ifbench":
        _prepare_ifbench_checkers()
    sample_type = IFBenchSample if item.benchmark == "ifbench" else IFEvalSample
    sample = sample_type(key=item.key, prompt=prompt,
                         instruction_id_list=list(item.instruction_ids), kwargs=item.kwargs)
    with _seeded_random(f"{item.benchmark}/{item.key}"):
        _, scores = evaluate_output_for_sample(item.benchmark, sample, completion)
    return scores


@contextlib.contextmanager
def _seeded_random(seed: str) -> Iterator[None]:
    """Python's global `random` seeded by `seed` inside, the caller's state restored after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@functools.lru_cache(maxsize=4096)
def instruction_holds(family: str, text: str) -> bool:
    """Whether `text` follows the kwarg-free instruction `family` (e.g. a case instruction)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    _prepare_checkers()
    checker = INSTRUCTION_DICT[family](family)
    checker.build_description()
    return bool(checker.check_following(text))


def known_instruction_ids(benchmark: str = "ifeval") -> set[str]:
    if benchmark == "ifbench":
        _prepare_ifbench_checkers()
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as IFBENCH

        return set(IFBENCH)
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return set(INSTRUCTION_DICT)


def count_words(text: str) -> int:
    """Words as the number_words checker counts them."""
    from if_verifiable.ifeval import instructions_util

    _prepare_checkers()
    return instructions_util.count_words(text)


def count_sentences(text: str) -> int:
    """Sentences as the number_sentences checker counts them."""
    from if_verifiable.ifeval import instructions_util

    _prepare_checkers()
    return instructions_util.count_sentences(text)
