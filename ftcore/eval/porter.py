"""Porter stemmer as rouge-score runs it: NLTK's `PorterStemmer()` in its default NLTK_EXTENSIONS mode.

Porter (1980), "An algorithm for suffix stripping", plus Martin Porter's later changes
(`bli -> ble`, `logi -> log`, words of one or two letters left alone) and NLTK's own
(a table of irregular forms, `ies`/`ied` on four-letter words, `y -> i` only after a
consonant, `alli` first, `fulli`, a two-letter `*o` stem). Pure Python, no nltk.

Vocabulary of the paper, used in the comments below:
    c / v   consonant / vowel; `y` is a consonant at the start or after a vowel, else a vowel
    m       the measure of a stem: the number of `vc` runs in `[C](VC){m}[V]`
    *v*     the stem contains a vowel
    *d      the word ends with a double consonant
    *o      the stem ends consonant-vowel-consonant, the last not w, x or y
"""

from functools import lru_cache
from itertools import pairwise

_VOWELS = frozenset("aeiou")

# NLTK_EXTENSIONS irregular forms, looked up before any rule.
_IRREGULAR = {
    "sky": "sky", "skies": "sky",
    "dying": "die", "lying": "lie", "tying": "tie",
    "news": "news",
    "inning": "inning", "innings": "inning",
    "outing": "outing", "outings": "outing",
    "canning": "canning", "cannings": "canning",
    "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed",
}  # fmt: skip


def _consonant_flags(word: str) -> list[bool]:
    """True per position where `word` has a consonant (y: consonant unless after a consonant)."""
    flags: list[bool] = []
    for ch in word:
        if ch in _VOWELS:
            flags.append(False)
        elif ch == "y":
            flags.append(not flags or not flags[-1])
        else:
            flags.append(True)
    return flags


def _measure(stem: str) -> int:
    """m: how many times a vowel is directly followed by a consonant."""
    flags = _consonant_flags(stem)
    return sum(1 for a, b in pairwise(flags) if not a and b)


def _has_vowel(stem: str) -> bool:
    return not all(_consonant_flags(stem))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _consonant_flags(word)[-1]


def _ends_cvc(stem: str) -> bool:
    """*o, with NLTK's extension that a two-letter stem `vc` also counts."""
    flags = _consonant_flags(stem)
    if len(stem) >= 3:
        return flags[-3] and not flags[-2] and flags[-1] and stem[-1] not in "wxy"
    return len(stem) == 2 and not flags[0] and flags[1]


def _m_positive(stem: str) -> bool:
    return _measure(stem) > 0


def _m_above_one(stem: str) -> bool:
    return _measure(stem) > 1


def _apply_first_rule(word: str, rules) -> str:
    """The first rule whose suffix `word` ends with decides: replace it if its condition holds on the
    stem, else keep `word` unchanged (later rules are not tried)."""
    for suffix, replacement, condition in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition(stem) else word
    return word


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:  # NLTK: dies -> die (but flies -> fli)
        return word[:-1]
    for suffix, replacement in (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")):
        if word.endswith(suffix):
            return word[: -len(suffix)] + replacement
    return word


def _step1b(word: str) -> str:
    if word.endswith("ied"):  # NLTK: died -> die, spied -> spi
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):  # (m>0) EED -> EE, and no other rule for -eed words
        return word[:-1] if _m_positive(word[:-3]) else word
    for suffix in ("ed", "ing"):  # (*v*) ED -> ; (*v*) ING ->
        if word.endswith(suffix) and _has_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    # Tidy the stem so that later steps see e.g. conflate, hop, file.
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if _ends_double_consonant(stem):
        return stem if stem[-1] in "lsz" else stem[:-1]
    if _measure(stem) == 1 and _ends_cvc(stem):
        return stem + "e"
    return stem


def _step1c(word: str) -> str:
    """NLTK: y -> i only after a consonant that is not the whole stem (happy -> happi, enjoy, by)."""
    if word.endswith("y") and len(word) > 2 and _consonant_flags(word[:-1])[-1]:
        return word[:-1] + "i"
    return word


_STEP2_RULES = [
    ("ational", "ate", _m_positive),
    ("tional", "tion", _m_positive),
    ("enci", "ence", _m_positive),
    ("anci", "ance", _m_positive),
    ("izer", "ize", _m_positive),
    ("bli", "ble", _m_positive),  # Martin's change of the paper's abli -> able
    ("alli", "al", _m_positive),
    ("entli", "ent", _m_positive),
    ("eli", "e", _m_positive),
    ("ousli", "ous", _m_positive),
    ("ization", "ize", _m_positive),
    ("ation", "ate", _m_positive),
    ("ator", "ate", _m_positive),
    ("alism", "al", _m_positive),
    ("iveness", "ive", _m_positive),
    ("fulness", "ful", _m_positive),
    ("ousness", "ous", _m_positive),
    ("aliti", "al", _m_positive),
    ("iviti", "ive", _m_positive),
    ("biliti", "ble", _m_positive),
    ("fulli", "ful", _m_positive),  # NLTK
    ("logi", "log", lambda stem: _m_positive(stem + "l")),  # NLTK: the l counts, so geologi -> geolog
]


def _step2(word: str) -> str:
    # NLTK: alli -> al is tried first, and its result goes through step 2 again.
    if word.endswith("alli") and _m_positive(word[:-4]):
        return _step2(word[:-2])
    return _apply_first_rule(word, _STEP2_RULES)


_STEP3_RULES = [
    ("icate", "ic", _m_positive),
    ("ative", "", _m_positive),
    ("alize", "al", _m_positive),
    ("iciti", "ic", _m_positive),
    ("ical", "ic", _m_positive),
    ("ful", "", _m_positive),
    ("ness", "", _m_positive),
]

# Order matters: the first matching suffix decides (replacement keeps "ement" from falling to "ent").
_STEP4_RULES = [
    (suffix, "", _m_above_one)
    for suffix in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")
]
_STEP4_RULES.append(("ion", "", lambda stem: _m_above_one(stem) and stem[-1] in "st"))
_STEP4_RULES += [(suffix, "", _m_above_one) for suffix in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")]


def _step5(word: str) -> str:
    # 5a: (m>1) E -> ; (m=1 and not *o) E ->
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            word = stem
    # 5b: (m>1 and *d and *L) -> single letter
    if word.endswith("ll") and _m_above_one(word[:-1]):
        word = word[:-1]
    return word


@lru_cache(maxsize=2**16)
def stem(word: str) -> str:
    """Stem one word exactly as `nltk.stem.porter.PorterStemmer().stem(word)` does (lowercases first)."""
    lowered = word.lower()
    if lowered in _IRREGULAR:
        return _IRREGULAR[lowered]
    if len(word) <= 2:
        return lowered
    w = _step1a(lowered)
    w = _step1b(w)
    w = _step1c(w)
    w = _step2(w)
    w = _apply_first_rule(w, _STEP3_RULES)
    w = _apply_first_rule(w, _STEP4_RULES)
    return _step5(w)
