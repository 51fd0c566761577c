"""Rule-based ("verifiable") rewards on response text: pure functions returning 1.0 or 0.0."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a signed number with an optional "$", thousands commas and decimals: "-3", "$1,000.50", ".5". A comma
# only counts between groups of three digits: "3,5" is 3 then 5 and "1,2,3" a list, never 35 or 123.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# format's default: "#### <number>" at the very end, commas as thousands separators only (FormatRewardSource
# in config.py has the same default)
FORMAT_PATTERN = r"####\s*-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*$"
_MARKER = "####"


def normalize_number(text: str) -> str | None:
    """'$1,000.50' → '1000.5', '72.0' → '72', '-3' → '-3', '.5' → '0.5'; None when it is not a number."""
    cleaned = str(text).strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite():
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "") else out


def extract_final_number(text: str) -> str | None:
    """GSM8K's final answer: the first number after the last "####" when there is one, else the last number
    in the text; normalised (commas, "$" and a trailing "." dropped, "72.0" → "72"). None: no number."""
    cut = text.rfind(_MARKER)
    if cut >= 0:
        found = _NUMBER.search(text, cut + len(_MARKER))
        return normalize_number(found.group()) if found else None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(a, b) -> bool:
    """Numeric equality of two numbers written as text ("1,000" = "1000", "0.50" = ".5", "$18.00" = "18")."""
    x, y = normalize_number(a), normalize_number(b)
    return x is not None and x == y


def gsm8k_reward(response: str, answer) -> float:
    """1.0 when the response's final number (extract_final_number) equals the reference answer."""
    found = extract_final_number(response)
    return float(found is not None and numbers_equal(found, answer))


def exact_reward(response: str, answer) -> float:
    """1.0 when the response, stripped, equals the reference, stripped."""
    return float(response.strip() == str(answer).strip())


def regex_reward(response: str, pattern: str) -> float:
    """1.0 when the pattern is found anywhere in the response (re.search)."""
    return float(re.search(pattern, response) is not None)


def format_reward(response: str, pattern: str = FORMAT_PATTERN) -> float:
    """1.0 when re.search(pattern, response.strip()) finds it; the default (FormatRewardSource's) asks for
    GSM8K's "#### <number>" at the very end."""
    return float(re.search(pattern, response.strip()) is not None)
