"""Deterministic policy rules: a deny list, personal data that the evidence does not hold,
and no other tenant's data (record ids that exist only in another tenant's records).

E-mail addresses, phone numbers, postal addresses and national id numbers (US SSN, UK NINO)
may appear in an output only when the evidence (every retrieved chunk's text) contains the
same value, compared after normalisation (lower case; digits only for numbers). Messages
mask the value, since reasons are stored in the audit trail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from schemas.stages import Reason
from tasks.validators.rules import ValidatorRules

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_PHONE = re.compile(r"(?<![\w.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{1,4}[\s.-])"
                    r"(?:\d{2,4}[\s.-]){0,2}\d{4}(?![\w-])")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Record ids as systems of record write them: INC-2057, TKT-104, CHG-88123.
RECORD_ID = re.compile(r"\b[A-Z][A-Z0-9]{1,9}-\d{2,8}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])")
_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b")
_STREET = (r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|"
           r"Place|Pl|Parkway|Pkwy|Highway|Hwy|Terrace|Square|Sq")
# Case matters: "1200 Harbor Street" is an address, "2 weeks in any way" is not.
_ADDRESS = re.compile(rf"\b\d{{1,6}}\s+(?:[A-Z][a-z]+\.?\s+){{1,4}}(?:{_STREET})\b\.?"
                      rf"|\bP\.?\s?O\.?\s+Box\s+\d+\b")


@dataclass(frozen=True)
class PiiKind:
    name: str
    label: str  # for messages: "a phone number"
    find: Callable[[str], list[str]]
    normalise: Callable[[str], str]


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def _folded(value: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", value.lower()).split())


def _phones(text: str) -> list[str]:
    found = []
    for match in _PHONE.finditer(text):
        value = match.group(0).strip()
        # spaces alone separate years and counts too ("2020 2024"): those need a leading "+"
        separated = value.startswith("+") or re.search(r"[-.()]", value)
        if (separated and 7 <= len(_digits(value)) <= 15 and not _ISO_DATE.match(value)
                and not _SSN.fullmatch(value)):
            found.append(value)
    return found


PII: dict[str, PiiKind] = {k.name: k for k in (
    PiiKind("email", "an e-mail address", _EMAIL.findall, str.lower),
    PiiKind("phone", "a phone number", _phones, _digits),
    PiiKind("postal_address", "a postal address", lambda t: [m.group(0) for m in _ADDRESS.finditer(t)],
            _folded),
    PiiKind("national_id", "a national id number",
            lambda t: _SSN.findall(t) + _NINO.findall(t), lambda v: _digits(v) or _folded(v)),
)}


@dataclass(frozen=True)
class PolicyFindings:
    reasons: list[Reason]
    leaked: list[str]  # the offending values, to be masked in every other reason too

    def redact(self, message: str) -> str:
        """Mask each leaked value, and the pieces of it other reasons quote: its digit runs,
        an e-mail's local part ("1200 Harbor does not appear there"), and what follows a
        `key:` or `key=` (a credential's secret: "it names hunter2hunter2")."""
        for value in sorted(self.leaked, key=len, reverse=True):
            message = message.replace(value, _mask(value))
            pieces = (re.findall(r"\d{3,}", value) + re.findall(r"^[^@\s]{3,}(?=@)", value)
                      + re.findall(r"[:=]\s*(\S{4,})", value))
            for piece in sorted(pieces, key=len, reverse=True):
                message = message.replace(piece, "…")
        return message


def record_identifiers(text: str) -> list[str]:
    """The record ids a text names, each once, in order."""
    return _unique(RECORD_ID.findall(text))


def check_policy(text: str, evidence: Iterable[str], rules: ValidatorRules,
                 unheld: Iterable[str] = ()) -> PolicyFindings:
    """Deny-list hits, personal data not found in the evidence, and record ids the tenant
    does not hold (`unheld`) that the evidence does not name either, each once."""
    reasons, leaked = [], []
    sources = list(evidence)
    for value in _unique(unheld):
        if any(value in record_identifiers(source) for source in sources):
            continue  # its sources name it: "the ticket system has no ticket INC-2999"
        reasons.append(_reason("unknown_record", f"The answer names {value}, which is neither a "
                               "record of this tenant nor in its sources; remove it."))
    for rule in rules.deny:
        for hit in _unique(m.group(0) for m in rule.pattern.finditer(text)):
            reasons.append(_reason("denied_term", f"The answer contains {rule.why} ({_mask(hit)}); "
                                   "remove it."))
            leaked.append(hit)
    for name in rules.pii:
        kind = PII[name]
        found = _unique(kind.find(text))
        if not found:
            continue
        known = {value for source in sources for value in _known_values(name, source)}
        for value in found:
            if not _in_evidence(kind, value, known):
                reasons.append(_reason(f"pii_{name}", f"The answer contains {kind.label} "
                                       f"({_mask(value)}) that is not in the sources; remove it."))
                leaked.append(value)
    return PolicyFindings(reasons, leaked)


@lru_cache(maxsize=8192)  # the same chunks come back request after request
def _known_values(name: str, source: str) -> frozenset[str]:
    """The normalised values of one kind that a source holds (an address: the whole source too)."""
    kind = PII[name]
    values = {kind.normalise(v) for v in kind.find(source)}
    return frozenset(values | {kind.normalise(source)} if name == "postal_address" else values)


def _in_evidence(kind: PiiKind, value: str, known: set[str]) -> bool:
    wanted = kind.normalise(value)
    if kind.name == "postal_address":
        return any(wanted in k for k in known)
    if kind.name == "phone":  # "+1 555 0177" is "1-555-0177" and "555-0177"
        return any(k.endswith(wanted) or wanted.endswith(k) for k in known if min(len(k), len(wanted)) >= 7)
    return wanted in known


def forbidden_output(answer_class: str) -> Reason:
    return _reason("output_forbidden", f"A request of class {answer_class!r} must have no output "
                   "text; return nothing.")


def _mask(value: str) -> str:
    """Keep the last few characters only: 'a phone number (…0177)'."""
    value = " ".join(value.split())
    return "…" + value[-4:] if len(value) > 6 else "…"


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _reason(code: str, message: str) -> Reason:
    return Reason(validator="policy", code=code, message=message)
