"""How well a simulated model answers: the class of a prompt, and whether one answer is poor.

A profile's ``quality`` gives, per class of prompt, the share of that class's prompts a model
answers well (a class not given: 1.0). Which answers are the poor ones is not random: a hash of
(model, prompt text, choice index) is compared with the rate, so the same request always gets
the same verdict, while over many prompts the poor share matches ``1 - rate``. Lowering a rate
only adds poor answers: a prompt poor at 0.6 is poor at 0.2 too.

A poor answer is detectable exactly the way a cascade's verifier looks for one: plain text opens
with an uncertainty phrase (``POOR_OPENERS``) and is a third of the usual length; a good maths or
reasoning answer ends with the line ``FINAL_ANSWER`` and a poor one never does. JSON and log
probabilities degrade too (``structured.poor_json_text``, the simulator's logprobs).

The classifier is a few keyword and regex rules over the last user message, first match wins,
in the order of ``CLASS_RULES``. It is a simulator's stand-in for a model's strengths, kept
apart from the router's own classification on purpose: the router is what gets evaluated.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

# A poor answer is this share of the profile's usual length, but never fewer words than this
# (room for the longest opener and a few words after it).
POOR_LENGTH_SHARE = 1 / 3
POOR_MIN_TOKENS = 12
# The uncertainty or refusal phrase a poor plain-text answer opens with, picked by the hash.
POOR_OPENERS = (
    "I'm not sure, but",
    "I cannot be certain, but",
    "I'm sorry, I can't fully answer that.",
    "I don't know for sure, but",
)
# Every phrase a poor answer may open with, and more: what a good answer never contains (the
# prompt quoted in a good answer has these masked).
HEDGES = re.compile(
    r"\b(?:not\s+(?:sure|certain|able)|can[\u2019']?t|cannot|can\s+not|sorry|afraid|"
    r"don[\u2019']?t\s+know|do\s+not\s+know|unsure|uncertain|unable|won[\u2019']?t\s+be\s+able|"
    r"as\s+an\s+ai)\b",
    re.IGNORECASE,
)
# The last line of a good maths or reasoning answer, a fixed token a "must match" rule can test.
FINAL_ANSWER = "Final answer: 42"
_FINAL_ANSWER_RE = re.compile(r"\bfinal\s+answer\b", re.IGNORECASE)
_MASK = "…"
# How much of each end of a long message the classifier reads.
CLASSIFY_EDGE_CHARS = 4000


class PromptClass(StrEnum):
    MATHS = "maths"
    REASONING = "reasoning"
    CODING = "coding"
    EXTRACTION = "extraction"
    CLASSIFICATION = "classification"
    SUPPORT = "support"
    WRITING = "writing"
    CHIT_CHAT = "chit_chat"
    OTHER = "other"


FINAL_ANSWER_CLASSES = frozenset({PromptClass.MATHS, PromptClass.REASONING})


def _rate(what: str) -> float:
    return Field(default=1.0, ge=0, le=1, description=f"Share of {what} answered well.")


class QualityRates(BaseModel):
    """Share of each class's prompts a model answers well; a class not given is 1.0."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    maths: float = _rate("maths prompts (equations, word problems, proofs)")
    reasoning: float = _rate("logic puzzles, syllogisms, planning and trade-offs")
    coding: float = _rate("coding prompts (write, debug, review code or SQL)")
    extraction: float = _rate("extraction prompts (values pulled out of a text)")
    classification: float = _rate("classification prompts (label, tag, sentiment)")
    support: float = _rate("customer-support questions")
    writing: float = _rate("writing prompts (emails, posts, summaries, rewrites)")
    chit_chat: float = _rate("greetings and small talk")
    other: float = _rate("prompts no rule matches")

    def rate(self, prompt_class: PromptClass) -> float:
        rate: float = getattr(self, prompt_class.value)
        return rate


def _rule(*patterns: str, flags: int = re.IGNORECASE) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns), flags)


# First match wins, in this order: a coding prompt may hold arithmetic, a maths prompt may say
# "explain each step", a writing task may mention an order or a delivery, a support question may
# start with "hi". Keywords are matched as whole words, case-insensitively. Every gap between two
# parts of a rule is bounded, so a long prompt is searched in linear time (an unbounded ".*"
# between two parts is quadratic on a prompt that repeats the first part).
CLASS_RULES: tuple[tuple[PromptClass, re.Pattern[str]], ...] = (
    (
        PromptClass.CODING,
        _rule(
            r"```",
            r"\b(?:write|implement|create|define|code|fix|debug|refactor|review|design)\s+"
            r"(?:an?\s+|the\s+|this\s+|my\s+|some\s+)?(?:\w+\s+){0,3}"
            r"(?:functions?|methods?|class|program|script|query|regex|unit\s+tests?|api|cli|"
            r"schema|endpoints?)\b",
            r"\b(?:python|javascript|typescript|java|golang|rust|kotlin|haskell|ruby|php|"
            r"bash|sql|html|css|regexp?|numpy|pandas|react|django|f-string)\b",
            r"\bc(?:#|\+\+)(?!\w)|\bin\s+go\b",
            r"\b(?:compiles?|compiler|segfaults?|stack\s*trace|traceback|borrow\s+checker|"
            r"time\s+complexity|big-?o|recursion|linked\s+list|binary\s+(?:tree|search)|"
            r"lru\s+cache|source\s+code|code\s+review|this\s+code|my\s+code|worker\s+pool)\b",
        ),
    ),
    (
        PromptClass.MATHS,
        _rule(
            # an equation or a sum: "3x + 7 = 22", "x^2", "12 * 7", "5 - 3"
            r"\d\s*[a-z]?\s*[+*\u00d7÷^=]\s*\(?-?\d",
            r"\d\s+[-\u2212/]\s+\d",
            r"\b[a-z]\s*\^\s*\d",
            r"[∫√∑π²³]",
            r"\b(?:solve|equations?|integrals?|integrate|derivatives?|derivation|differentiate|"
            r"calculus|algebra|geometry|trigonometry|theorem|prove\s+that|proof|probability|"
            r"arithmetic|factori[sz]e|divisible|divisors?|remainder|square\s+root|logarithm|"
            r"polynomial|fractions?|irrational|primes?\s+numbers?|prime\s+factors?|gcd|lcm|"
            r"eigen\w*|matrix|matrices|compounded|apr|how\s+many\s+ways|expected\s+(?:value|"
            r"number)|minimi[sz]e|maximi[sz]e|how\s+old|calculate)\b",
            # a word problem: three numbers, then a question about a quantity
            r"\A(?>(?:\D*+\d++){3})[\s\S]{0,500}?\b(?:how\s+(?:much|many|long|far|old)|"
            r"what\s+did)\b",
        ),
    ),
    (
        PromptClass.REASONING,
        _rule(
            # a syllogism: two quantified statements ("all bloops are ... some razzies are")
            r"\b(?:all|some|no|every)\s+\w+\s+(?:are|is)\b.{0,300}"
            r"\b(?:all|some|no|every|any)\s+\w+\s+(?:are|is|be|have|own)\b",
            r"\b(?:logic|logical|logically|puzzle|riddle|deduce|deduction|syllogism|infer|"
            r"inference|implies|paradox|contradiction|necessarily|knights?|knaves?|liars?|"
            r"truthful|tells?\s+the\s+truth|argu(?:e|es|ment)|conclusion|conclude|therefore|"
            r"does\s+it\s+follow|exactly\s+one\s+of|must\s+be\s+true|is\s+it\s+possible|"
            r"trade-?offs?|pros\s+and\s+cons|second-order|build\s+or\s+buy|root\s+cause|"
            r"explanations|constraints?|prioriti[sz]e|choosing\s+between|should\s+we|"
            r"(?:taller|shorter|older|younger)\s+than)\b",
            r"\bmust\s+(?:\w+\s+){1,3}be\b",
        ),
    ),
    (
        PromptClass.EXTRACTION,
        _rule(
            r"\b(?:extract|pull\s+out|pull\s+the|pick\s+out|parse)\b",
            r"\b(?:as|into|in)\s+json\b|\bjson\s+with\b",
            r"\b(?:list|find|get|give\s+me)\s+(?:all|every|each|the)\s+(?:\w+\s+)?"
            r"(?:names?|dates?|emails?|email\s+addresses|phone\s+numbers?|amounts?|"
            r"addresses|entities|ids?|iban|numbers?)\s+(?:in|from|mentioned)\b",
            r"\bfrom\s+this\s+(?:line|signature|message|text|email|note|sentence|listing)\b",
            r"\b(?:in|from)(?:\s+this)?\s*:\s*[\"'\u201c\u2018]",
            r"\b(?:what|which)(?:'s|\s+is|\s+are)?\s+(?:the\s+)?(?:\w+\s+)?"
            r"(?:number|date|email|address|amount|total|id|sku)\b[^?]{0,200}"
            r"\b(?:in|from|mentioned)\b",
        ),
    ),
    (
        PromptClass.CLASSIFICATION,
        _rule(
            r"\b(?:classify|classification|categori[sz]e|categories|category|sentiment|"
            r"label\s+(?:this|these|each|the)|tag\s+(?:this|these|each|the)|intent|toxic|"
            r"spam|fake|priority|urgency|star\s+rating|positive\s+or\s+negative|"
            r"yes\s+or\s+no|yes/no)\b",
            r"\bwhich\s+(?:team|queue|department|language|topic|category)\b",
            # "formal or informal? \"...\"": a short choice, then the text to label
            r"^[^\"'\u201c?:]{0,60}\bor\b[^\"'\u201c?:]{0,40}[?:]\s*[\"'\u201c]",
        ),
    ),
    (
        PromptClass.WRITING,
        _rule(
            r"\b(?:write|draft|compose|rewrite|rephrase|paraphrase|proofread|polish|"
            r"summari[sz]e|shorten|translate|tailor)\b",
            r"\b(?:essay|poem|haiku|short\s+story|blog\s+post|linkedin\s+post|tweet|"
            r"slogans?|tagline|toast|speech|product\s+description|cover\s+letter|newsletter|"
            r"press\s+release|headline|caption|faq\s+entry|out-of-office)\b",
            r"\bmake\s+(?:this|it)\s+(?:\w+\s+){0,3}(?:shorter|longer|friendlier|clearer|"
            r"more|less|sound)\b",
            r"\bturn\s+(?:this|these)\b.{0,200}\binto\s+(?:a|an)\s+(?:\w+\s+)?(?:paragraph|email|"
            r"post|letter|summary)\b",
        ),
    ),
    (
        PromptClass.SUPPORT,
        _rule(
            r"\bhow\s+(?:do|can|should)\s+i\b",
            r"\b(?:password|pasword|reset|log\s*in|sign\s*in|account|refund|refunded|billing|"
            r"invoices?|subscription|cancel|cancelled|canceled|orders?|ordered|delivery|"
            r"delivered|shipping|ship|shipped|shipment|parcel|package|tracking|checkout|"
            r"charged|charge|fee|promo|voucher|booking|warranty|claim|plan|exchange|crash(?:es)?|"
            r"banned|ticket|downgrade|upgrade|store|customer\s+service|support|"
            r"not\s+working|doesn[\u2019']?t\s+work|won[\u2019']?t\s+work)\b",
            r"\b(?:my|our)\s+(?:\w+\s+)?(?:card|balance|statement|payment|credit|bill)\b",
        ),
    ),
    (
        PromptClass.CHIT_CHAT,
        _rule(
            r"^\W*(?:hi|hello|hey|hiya|howdy|yo|bonjour|hola|good\s+(?:morning|afternoon|"
            r"evening|night)|cheers|lol|haha|nice|great|perfect|ok|happy\s+\w+day)\b",
            r"\b(?:thanks?|thank\s+you|bye|how\s+are\s+you|how'?s\s+it\s+going|"
            r"what'?s\s+up|who\s+are\s+you|your\s+name|have\s+a\s+name|are\s+you\s+a|"
            r"tell\s+me\s+a\s+(?:joke|fun\s+fact)|fun\s+fact|you'?re\s+funny|bored|favou?rite|"
            r"recommend)\b",
            # a short factual question: "What's the capital of Australia?"
            r"^\W*(?:what|what'?s|whats|who|when|where|which|how|is|are|do|does)\b.{0,60}$",
        ),
    ),
)


def classify(text: str) -> PromptClass:
    """The class of a prompt (the last user message's text): the first rule that matches.

    A long message is classified by its head and tail (``CLASSIFY_EDGE_CHARS`` of each), where
    the request usually is, so a pasted document costs no more than a question."""
    if len(text) > 2 * CLASSIFY_EDGE_CHARS:
        text = f"{text[:CLASSIFY_EDGE_CHARS]}\n{text[-CLASSIFY_EDGE_CHARS:]}"
    for prompt_class, pattern in CLASS_RULES:
        if pattern.search(text):
            return prompt_class
    return PromptClass.OTHER


@dataclass(frozen=True)
class Verdict:
    """Whether one answer (one choice) is poor, and the opener a poor one starts with."""

    prompt_class: PromptClass
    poor: bool
    opener: str  # meaningful only when poor


def judge(
    model: str, prompt: str, variant: int, prompt_class: PromptClass, rates: QualityRates
) -> Verdict:
    """The verdict on choice ``variant`` of ``model``'s answer to ``prompt``: poor when the
    hash's draw in [0, 1) is at or above the class's rate (so a rate of 0 is always poor)."""
    digest = hashlib.sha256(f"{model}\0{prompt}\0{variant}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    opener = POOR_OPENERS[digest[8] % len(POOR_OPENERS)]
    return Verdict(prompt_class, draw >= rates.rate(prompt_class), opener)


def poor_length(output_tokens: int) -> int:
    """Tokens of a poor answer for a profile whose answers are ``output_tokens`` long."""
    return min(output_tokens, max(POOR_MIN_TOKENS, math.ceil(output_tokens * POOR_LENGTH_SHARE)))


def shape_words(words: Sequence[str], verdict: Verdict, final_line: bool) -> list[str]:
    """The simulated words as a good or poor answer, as many words as given.

    Poor: the opener, then the words (a "final answer" the prompt quotes masked). Good: the
    words with any hedge the prompt quotes masked and, when ``final_line`` and the class asks
    for one, the last words replaced by the line ``FINAL_ANSWER``.
    """
    if not words:
        return []
    if verdict.poor:
        body = _masked(_FINAL_ANSWER_RE, " ".join(words)).split(" ")
        return [*verdict.opener.split(), *body][: len(words)]
    shaped = _masked(HEDGES, " ".join(words)).split(" ")
    tail = FINAL_ANSWER.split()
    tail[0] = "\n" + tail[0]  # its own line; still one token per word
    if final_line and verdict.prompt_class in FINAL_ANSWER_CLASSES and len(shaped) > len(tail):
        shaped = [*shaped[: len(shaped) - len(tail)], *tail]
    return shaped


def _masked(pattern: re.Pattern[str], text: str) -> str:
    # Each word of a match becomes one mask, so the word count (the token count) is unchanged.
    return pattern.sub(lambda m: re.sub(r"\S+", _MASK, m.group()), text)
